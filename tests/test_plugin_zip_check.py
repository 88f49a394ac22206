"""The plugin ZIP passes the offline checks of plugins.qgis.org's validator (scripts/check_plugin_zip.py),
and the checker refuses what the repository refuses (so a passing ZIP means something)."""
import importlib.util
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


package = _load("package")
check = _load("check_plugin_zip")


@pytest.fixture(scope="module")
def plugin_zip(tmp_path_factory):
    """The lean plugin ZIP exactly as `make package` writes it (same file list and writer)."""
    return package.write_zip(tmp_path_factory.mktemp("zip") / "menet_qgis-test.zip", package.plugin_files())


def _rewritten(source, target, drop=(), add=()):
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for item in old.infolist():
            if item.filename not in drop:
                new.writestr(item, old.read(item))
        for name, data in add:
            new.writestr(name, data)
    return target


def test_the_plugin_zip_passes_the_repository_offline_checks_and_carries_the_licence(plugin_zip):
    assert check.problems(plugin_zip) == []
    with zipfile.ZipFile(plugin_zip) as z:
        licence = z.read("menet_qgis/LICENSE").decode()
    assert "GNU GENERAL PUBLIC LICENSE" in licence and "Version 2" in licence and "any later version" in licence
    assert licence == (ROOT / "LICENSE").read_text()


@pytest.mark.integration
def test_only_the_release_urls_stand_between_the_zip_and_a_public_release(plugin_zip):
    """tracker/repository say 'none yet' (no public repository exists); --release says exactly that."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_plugin_zip.py"), "--release", str(plugin_zip)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert sorted(proc.stderr.splitlines()) == sorted(
        f"check_plugin_zip: {key} must be a reachable http(s) URL, got 'none yet: no public release (see README.md)'"
        for key in ("tracker", "repository"))


@pytest.mark.parametrize("drop,add,expected", [
    (("menet_qgis/LICENSE",), (), "menet_qgis/LICENSE is missing"),
    ((), (("menet_qgis/core/__pycache__/engine.cpython-311.pyc", b"x"),), "compiled Python in the archive"),
    ((), (("menet_qgis/../evil.py", b"x"),), "path information in the archive"),
    ((), (("other/readme.txt", b"x"),), "the archive must hold one plugin folder"),
])
def test_the_checker_refuses_what_the_repository_refuses(plugin_zip, tmp_path, drop, add, expected):
    bad = _rewritten(plugin_zip, tmp_path / "bad.zip", drop, add)
    assert any(expected in p for p in check.problems(bad)), check.problems(bad)


def test_metadata_without_a_required_key_is_refused(plugin_zip, tmp_path):
    with zipfile.ZipFile(plugin_zip) as z:
        metadata = z.read("menet_qgis/metadata.txt").decode()
    stripped = "\n".join(l for l in metadata.splitlines() if not l.startswith("email="))
    bad = _rewritten(plugin_zip, tmp_path / "bad.zip", ("menet_qgis/metadata.txt",),
                     (("menet_qgis/metadata.txt", stripped),))
    assert check.problems(bad) == ["metadata.txt lacks email"]
