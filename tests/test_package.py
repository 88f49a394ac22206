"""make package (scripts/package.py, called directly: minimal systems have no make): a plugin ZIP the QGIS
repository accepts, the model as a separate verified asset, and an offline ZIP with the model inside."""
import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT, qgis_process

MODEL = ROOT / "resources" / "models" / "menet_coasts_v2.pt"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "package.py"), "--dist", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def version():
    return next(l.split("=", 1)[1] for l in (ROOT / "metadata.txt").read_text().splitlines()
                if l.startswith("version="))


def test_plugin_zip_has_no_weights_and_fits_the_repository_limit(dist):
    lean = dist / f"menet_qgis-{version()}.zip"
    assert lean.stat().st_size <= 25_000_000
    with zipfile.ZipFile(lean) as z:
        names = set(z.namelist())
        assert z.testzip() is None
        metadata = z.read("menet_qgis/metadata.txt").decode()
    assert {"menet_qgis/__init__.py", "menet_qgis/metadata.txt", "menet_qgis/resources/icon.svg",
            "menet_qgis/processing/provider.py", "menet_qgis/core/engine.py",
            "menet_qgis/environment_installer.py", "menet_qgis/model_store.py",
            "menet_qgis/requirements/cpu-light.txt", "menet_qgis/requirements/cpu.txt",
            "menet_qgis/requirements/cuda.txt", "menet_qgis/resources/models/menet_coasts_v2.pt.sha256",
            "menet_qgis/resources/models/mangrove_mask.model3"} <= names
    assert all(n.startswith("menet_qgis/") for n in names)
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pt", ".onnx")) or "/tests/" in n]
    for key in ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email", "repository"):
        assert f"\n{key}=" in "\n" + metadata, f"metadata.txt lacks {key}"


def test_model_asset_and_its_sha256(dist):
    if not MODEL.is_file():
        pytest.skip("no default model in this checkout")
    asset = dist / "menet_coasts_v2.pt"
    digest = sha256(asset.read_bytes())
    assert asset.read_bytes() == MODEL.read_bytes()
    assert (dist / "menet_coasts_v2.pt.sha256").read_text() == f"{digest}  menet_coasts_v2.pt\n"
    assert digest == (MODEL.parent / "menet_coasts_v2.pt.sha256").read_text().split()[0]


def test_offline_zip_carries_the_model(dist):
    if not MODEL.is_file():
        pytest.skip("no default model in this checkout")
    with zipfile.ZipFile(dist / f"menet_qgis-{version()}-with-model.zip") as z:
        with zipfile.ZipFile(dist / f"menet_qgis-{version()}.zip") as lean:
            assert set(z.namelist()) - set(lean.namelist()) == {"menet_qgis/resources/models/menet_coasts_v2.pt"}
        assert sha256(z.read("menet_qgis/resources/models/menet_coasts_v2.pt")) == sha256(MODEL.read_bytes())


def test_installed_plugin_zip_loads_in_qgis_and_points_to_the_model_folder(dist, qgis_env, tmp_path):
    """Unzipped into a fresh plugin folder the way 'Install from ZIP' does, the provider loads in qgis_process,
    and with no model in the plugin the default model is the one 'Install model' puts in the profile."""
    plugins = tmp_path / "plugins"
    with zipfile.ZipFile(dist / f"menet_qgis-{version()}.zip") as z:
        z.extractall(plugins)
    env = dict(qgis_env, QGIS_PLUGINPATH=str(plugins), MENET_HOME=str(tmp_path / "home"))
    listed = qgis_process(["list"], env, timeout=300)
    assert "menet:installdependencies" in listed.stdout and "menet:installmodel" in listed.stdout, listed.stderr
    probe = subprocess.run([sys.executable, "-c", "from menet_qgis.resources import default_model_path as d; "
                            "print(d())"], cwd=plugins, env=dict(os.environ, MENET_HOME=str(tmp_path / "home")),
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == str(tmp_path / "home" / "models" / "menet_coasts_v2.pt"), probe.stderr
