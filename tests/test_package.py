"""make package (scripts/package.py, called directly: minimal systems have no make): a plugin ZIP the QGIS
repository accepts, the model as a separate verified asset (.onnx that runs without torch, and the .pt), and an
offline ZIP with the .onnx inside."""
import hashlib
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import rasterio

from helpers import ROOT, SCENE, crop_scene, qgis_process, read, release_toolchain

MODEL = ROOT / "resources" / "models" / "menet_coasts_v2.pt"
ASSET = "menet_coasts_v2.onnx"
SHIPPED_ASSET_SHA256 = ROOT / "resources" / "models" / f"{ASSET}.sha256"
#: Largest |Δp| allowed between the fp16-stored asset and torch fp32 on the .pt (measured: about 1e-5;
#: the stored weights are exactly the .pt's, so only the runtimes' summation order differs).
ASSET_TOLERANCE = 1e-4


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, str(ROOT / "scripts" / "package.py"), "--dist", str(out), "--export-python",
               sys.executable] + ([] if release_toolchain() else ["--any-asset-hash"])
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
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
            "menet_qgis/processing/provider.py", "menet_qgis/core/inference/engine.py",
            "menet_qgis/environment_installer.py", "menet_qgis/model_store.py",
            "menet_qgis/requirements/cpu-light.txt", "menet_qgis/requirements/cpu.txt",
            "menet_qgis/requirements/cuda.txt", "menet_qgis/resources/models/menet_coasts_v2.pt.sha256",
            f"menet_qgis/resources/models/{ASSET}.sha256", "menet_qgis/resources/models/mangrove_mask.model3"} <= names
    with zipfile.ZipFile(lean) as z:  # the plugin ships the asset's hash: Install model checks the download
        assert z.read(f"menet_qgis/resources/models/{ASSET}.sha256") == SHIPPED_ASSET_SHA256.read_bytes()
        if (ROOT / "LICENSE").is_file():
            assert z.read("menet_qgis/LICENSE") == (ROOT / "LICENSE").read_bytes()
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


def test_onnx_asset_is_the_shipped_hash_and_no_bigger_than_the_pt(dist):
    """The export is deterministic: this build's bytes are the ones whose sha256 the plugin ships."""
    if not MODEL.is_file():
        pytest.skip("no default model in this checkout")
    asset = dist / ASSET
    digest = sha256(asset.read_bytes())
    assert (dist / f"{ASSET}.sha256").read_text() == f"{digest}  {ASSET}\n"
    assert asset.stat().st_size <= MODEL.stat().st_size
    if not release_toolchain():
        pytest.skip("torch/onnx here are not the release's (Makefile): the export's bytes differ")
    assert digest == SHIPPED_ASSET_SHA256.read_text().split()[0]


def test_offline_zip_carries_the_onnx_asset(dist):
    if not MODEL.is_file():
        pytest.skip("no default model in this checkout")
    with zipfile.ZipFile(dist / f"menet_qgis-{version()}-with-model.zip") as z:
        with zipfile.ZipFile(dist / f"menet_qgis-{version()}.zip") as lean:
            assert set(z.namelist()) - set(lean.namelist()) == {f"menet_qgis/resources/models/{ASSET}"}
        assert sha256(z.read(f"menet_qgis/resources/models/{ASSET}")) == sha256((dist / ASSET).read_bytes())


TORCH_BLOCKER = "raise ImportError('torch blocked: this engine has no torch')\n"


@pytest.fixture(scope="module")
def torch_fp32_map(tmp_path_factory):
    """(a real 480 x 480 crop of scene_2020, 45 % mangrove, torch fp32's map of it with the .pt)."""
    if not MODEL.is_file() or not SCENE.is_file():
        pytest.skip("no default model or real scene in this checkout")
    work = tmp_path_factory.mktemp("asset_maps")
    crop = crop_scene(work / "crop.tif", 1344, 2208, 480, 480)
    proc = subprocess.run([sys.executable, "-m", "menet_qgis", "predict", crop, "--model", MODEL, "--out-dir",
                           work / "torch", "--runtime", "torch", "--precision", "fp32", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return crop, work / "torch" / "crop_probability.tif"


@pytest.mark.data
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_the_asset_maps_a_real_scene_without_torch_as_torch_fp32_does(dist, runtime, torch_fp32_map, tmp_path):
    """The asset alone, in a Python where torch cannot be imported, maps a real crop of scene_2020 in ONNX
    Runtime and in OpenVINO; the map equals torch fp32's on the .pt within ASSET_TOLERANCE, no pixel
    changing class at the model's threshold."""
    from menet_qgis.core.inference import runtimes
    if not runtimes.installed(runtime):
        pytest.skip(f"{runtime} not installed")
    crop, want_path = torch_fp32_map
    work = tmp_path
    blocker = work / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(TORCH_BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = work / runtime
    proc = subprocess.run([sys.executable, "-m", "menet_qgis", "predict", crop, "--model", dist / ASSET,
                           "--out-dir", out, "--runtime", runtime], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert f"device: CPU, {runtime} " in proc.stderr and "precision fp32: " in proc.stderr
    with rasterio.open(want_path) as ds:
        threshold = float(ds.tags()["MENET_THRESHOLD"])
    want, got = read(want_path)[0], read(out / "crop_probability.tif")[0]
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isfinite(want).mean() > 0.5
    valid = np.isfinite(want)
    mangrove = want[valid] >= threshold
    assert 0.2 < mangrove.mean() < 0.8  # the crop holds both classes
    assert np.abs(got[valid] - want[valid]).max() <= ASSET_TOLERANCE
    assert ((got[valid] >= threshold) == mangrove).all()



def test_installed_plugin_zip_loads_in_qgis_and_points_to_the_model_folder(dist, qgis_env, tmp_path):
    """Unzipped into a fresh plugin folder the way 'Install from ZIP' does, the provider loads in qgis_process,
    and with no model in the plugin the default model is the asset 'Install model' puts in the profile."""
    plugins = tmp_path / "plugins"
    with zipfile.ZipFile(dist / f"menet_qgis-{version()}.zip") as z:
        z.extractall(plugins)
    env = dict(qgis_env, QGIS_PLUGINPATH=str(plugins), MENET_HOME=str(tmp_path / "home"))
    listed = qgis_process(["list"], env, timeout=300)
    assert "menet:installdependencies" in listed.stdout and "menet:installmodel" in listed.stdout, listed.stderr
    probe = subprocess.run([sys.executable, "-c", "from menet_qgis.model_store import default_model_path as d; "
                            "print(d())"], cwd=plugins, env=dict(os.environ, MENET_HOME=str(tmp_path / "home")),
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == str(tmp_path / "home" / "models" / ASSET), probe.stderr
