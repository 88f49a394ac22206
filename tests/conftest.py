"""Shared fixtures (small checkpoints made here, the plugin staged for qgis_process) and each test's category."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import ROOT, SCENE

sys.path.insert(0, str(ROOT))

# Each test's category (pytest.ini says what each means; `make test-fast` runs `-m "unit and not data"`): its
# file's, unless the test carries another category marker itself.  `data` comes on top: from the file, from a
# marker, or from using a fixture in DATA_FIXTURES.  tests/test_test_categories.py fails on a file missing here.
CATEGORIES = ("unit", "integration", "gui", "training")
FILE_CATEGORIES = {
    "test_assessment.py": "unit",
    "test_batch.py": "integration data",
    "test_channels.py": "unit",
    "test_child_process.py": "integration",
    "test_composite.py": "unit",
    "test_cloud_masking.py": "integration data",
    "test_cli.py": "integration",
    "test_cloud_detector.py": "unit",
    "test_desktop_gui.py": "gui",
    "test_desktop_gui_product.py": "gui data",
    "test_distributed.py": "integration",
    "test_engine.py": "integration",
    "test_environment_installer.py": "integration",
    "test_faults.py": "integration",
    "test_faults_batch.py": "integration",
    "test_faults_installers.py": "integration",
    "test_faults_inputs.py": "integration",
    "test_faults_models.py": "integration",
    "test_faults_outputs.py": "unit",
    "test_faults_protocol.py": "integration",
    "test_faults_training.py": "unit",
    "test_flips.py": "unit",
    "test_layout.py": "unit",
    "test_model.py": "unit",
    "test_model_store.py": "unit",
    "test_multisource.py": "unit",
    "test_options.py": "unit",
    "test_package.py": "integration",
    "test_plugin_zip_check.py": "unit",
    "test_processing.py": "unit",
    "test_products.py": "integration data",
    "test_qgis_process.py": "integration",
    "test_qt6_ready.py": "unit",
    "test_runtimes.py": "integration",
    "test_sentinel2_product.py": "unit",
    "test_stac_search.py": "integration data",
    "test_study_scripts.py": "integration data",
    "test_test_categories.py": "unit",
    "test_tiling.py": "unit",
    "test_training.py": "unit",
    "test_training_clouds.py": "unit",
    "test_user_path.py": "integration",
    "test_worker.py": "integration",
}
# Fixtures that skip without the real data beside the checkout (../shared/data).
DATA_FIXTURES = {"scene", "real_crop"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        own = [mark.name for mark in item.iter_markers() if mark.name in CATEGORIES]
        for name in FILE_CATEGORIES.get(item.path.name, "").split():
            if name == "data" or not own:
                item.add_marker(name)
        if DATA_FIXTURES.intersection(item.fixturenames):
            item.add_marker("data")


@pytest.fixture(scope="session")
def untrained_path(tmp_path_factory) -> Path:
    """An untrained ME-Net checkpoint (random weights, seed 0) in fp16, as shipped models are."""
    from menet_qgis.core.model import checkpoint
    path = tmp_path_factory.mktemp("models") / "untrained.pt"
    checkpoint.save(checkpoint.new_bundle(seed=0), path, half=True)
    return path


@pytest.fixture(scope="session")
def bundle(untrained_path):
    from menet_qgis.core.model import checkpoint
    return checkpoint.load(untrained_path)


@pytest.fixture(scope="session")
def qgis_env(tmp_path_factory) -> dict:
    """Environment for a qgis_process subprocess that loads this checkout as a plugin."""
    base = tmp_path_factory.mktemp("qgis")
    plugin = base / "plugins" / "menet_qgis"
    plugin.mkdir(parents=True)
    for item in list((ROOT / "menet_qgis").iterdir()) + [ROOT / "metadata.txt", ROOT / "resources"]:
        if item.name != "__pycache__":
            (plugin / item.name).symlink_to(item)
    runtime = base / "runtime"
    runtime.mkdir(mode=0o700)
    site = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix + "/")]  # the venv's
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", QGIS_PLUGINPATH=str(base / "plugins"),
               XDG_DATA_HOME=str(base / "profile"), XDG_RUNTIME_DIR=str(runtime),
               QGIS_CUSTOM_CONFIG_PATH=str(base / "profile"), QGIS_OPTIONS_PATH=str(base / "profile"),
               PYTHONPATH=os.pathsep.join(site + [os.environ.get("PYTHONPATH", "")]))
    from helpers import qgis_process
    enabled = qgis_process(["plugins", "enable", "menet_qgis"], env)
    assert enabled.returncode == 0, enabled.stdout + enabled.stderr
    return env


@pytest.fixture
def scene():
    if not SCENE.is_file():
        pytest.skip(f"real Sentinel-2 scene not available at {SCENE}")
    return SCENE


@pytest.fixture(scope="session")
def menet_provider(qgis_processing):
    """Register the provider the way the plugin's initProcessing does."""
    from menet_qgis.plugin import MENetPlugin
    plugin = MENetPlugin(None)
    plugin.initProcessing()
    yield plugin.provider
    plugin.unload()


@pytest.fixture
def cli(capfd):
    """The CLI's ``main`` in this process (same code as ``python -m menet_qgis`` without importing torch
    again for every case: this 2-core machine would need minutes); captures the file descriptors, so
    anything GDAL prints on its own stderr shows up too."""
    import subprocess

    from menet_qgis.cli import main

    def run(*args):
        capfd.readouterr()
        status = main([str(a) for a in args])
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, status, out, err)
    return run
