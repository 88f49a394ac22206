"""`pip install .` and `menet batch --scheduler` against a real Dask cluster: a `dask scheduler` and two
`dask worker` processes (the venv's own `dask` command, on loopback, each in its own process group).

Started from a folder without menet_qgis, the cluster is refused in one line naming the scheduler and
workers and what they have, before any scene is submitted.  Given the package `pip install .` built
(PYTHONPATH = the install folder), it maps every scene, the `menet` command of that install as the
client.  Small synthetic rasters and the untrained test model keep it to about a minute on 2 cores."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import rasterio

from helpers import ROOT, write_s2

DASK = Path(sys.executable).with_name("dask")
pytestmark = pytest.mark.skipif(not DASK.is_file(), reason=f"no dask command beside {sys.executable}")
VERSION = next(line.split("=", 1)[1].strip() for line in (ROOT / "metadata.txt").read_text().splitlines()
               if line.startswith("version="))


def environment(pythonpath=()):
    """This test's environment with PYTHONPATH = ``pythonpath`` plus the venv's site (which the Makefile
    puts there), never the checkout: the cluster sees menet_qgis only where a test puts it."""
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and not (Path(p) / "menet_qgis").exists()]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(p) for p in pythonpath] + kept))


@contextmanager
def dask_cluster(folder: Path, pythonpath=(), worker_pythonpaths=None):
    """A scheduler and two single-threaded workers started in ``folder`` with ``pythonpath`` (the workers
    with ``worker_pythonpaths``, one each, when given); yields the scheduler's address."""
    folder.mkdir(parents=True, exist_ok=True)
    address_file = folder / "scheduler.json"
    started = []

    def start(name, path, *args):
        log = open(folder / f"{name}.log", "w")
        started.append(subprocess.Popen([str(DASK), *args], cwd=folder, env=environment(path), stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True))
        log.close()

    try:
        start("scheduler", pythonpath, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", str(address_file))
        deadline = time.monotonic() + 60
        while not address_file.exists():
            assert time.monotonic() < deadline and started[0].poll() is None, (folder / "scheduler.log").read_text()
            time.sleep(0.2)
        time.sleep(0.2)  # written in one go, but give it a moment
        address = json.loads(address_file.read_text())["address"]
        for i, path in enumerate(worker_pythonpaths or [pythonpath] * 2, 1):
            start(f"worker{i}", path, "worker", "--scheduler-file", str(address_file), "--nthreads", "1",
                  "--no-dashboard", "--name", f"worker{i}")
        from distributed import Client
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in started:  # the nanny and its worker process: the whole group
            with_signal(proc, signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with_signal(proc, signal.SIGKILL)
                proc.wait()


def with_signal(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """menet_qgis as `pip install .` installs it (the wheel setup.py builds), into a folder of its own."""
    target = tmp_path_factory.mktemp("installed")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    return [write_s2(folder / "north.tif", 128, 160, seed=1), write_s2(folder / "south.tif", 96, 128, seed=2)]


def batch_args(scenes, out, model, address):
    return ["batch", *map(str, scenes), "--out-dir", str(out), "--model", str(model), "--scheduler", address,
            "--runtime", "torch", "--window", "64", "--overlap", "0", "--batch-size", "4", "--no-progress"]


def test_pip_install_gives_the_package_and_the_menet_command(installed, tmp_path):
    package = installed / "menet_qgis"
    assert (package / "metadata.txt").read_text() == (ROOT / "metadata.txt").read_text()
    assert (package / "requirements" / "cpu-light.txt").is_file()
    assert (package / "resources" / "models" / "menet_coasts_v2.onnx.sha256").is_file()
    assert not list(package.rglob("*.pt")) and not list(package.rglob("*.onnx"))
    proc = subprocess.run([str(installed / "bin" / "menet"), "--version"], cwd=tmp_path, capture_output=True,
                          text=True, env=environment([installed]), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"menet_qgis {VERSION}", proc.stdout + proc.stderr


def test_a_cluster_without_menet_qgis_is_refused_in_one_line_before_any_scene(scenes, untrained_path, tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    with dask_cluster(tmp_path / "cluster") as address:
        cluster_up = time.monotonic() - started
        proc = subprocess.run([sys.executable, "-m", "menet_qgis", *batch_args(scenes, out, untrained_path, address)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(f"cluster up in {cluster_up:.1f} s, refused in {time.monotonic() - started - cluster_up:.1f} s "
          "(both with the cluster's shutdown)")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    line = proc.stderr.strip()
    workers = re.search(r"the scheduler and workers (tcp://[\d.:]+), (tcp://[\d.:]+) have no menet_qgis", line)
    assert line.startswith(f"menet_qgis: error: the Dask cluster at {address} cannot run menet_qgis {VERSION}: ")
    assert workers and workers.group(1) != workers.group(2), line
    assert "no scene was submitted" in line and not out.exists()
    assert "deserializ" not in (tmp_path / "cluster" / "scheduler.log").read_text()


def test_a_worker_with_another_version_is_named_with_it(installed, scenes, untrained_path, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(installed / "menet_qgis", older / "menet_qgis")
    metadata = older / "menet_qgis" / "metadata.txt"
    metadata.write_text(metadata.read_text().replace(f"version={VERSION}", "version=0.0.9"))
    with dask_cluster(tmp_path / "cluster", [installed], [[installed], [older]]) as address:
        from distributed import Client
        with Client(address, timeout=60) as client:
            old_worker = next(a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "worker2")
        proc = subprocess.run([str(installed / "bin" / "menet"), *batch_args(scenes, tmp_path / "out", untrained_path,
                                                                             address)],
                              cwd=tmp_path, capture_output=True, text=True, env=environment([installed]), timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f": worker {old_worker} has menet_qgis 0.0.9. Install menet_qgis {VERSION} on" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_with_the_installed_package_every_scene_maps(installed, scenes, untrained_path, tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    with dask_cluster(tmp_path / "cluster", [installed]) as address:
        cluster_up = time.monotonic() - started
        from distributed import Client
        with Client(address, timeout=60) as client:
            workers = set(client.scheduler_info()["workers"])
        proc = subprocess.run([str(installed / "bin" / "menet"), *batch_args(scenes, out, untrained_path, address)],
                              cwd=tmp_path, capture_output=True, text=True, env=environment([installed]),
                              timeout=600)
    print(f"cluster up in {cluster_up:.1f} s, 2 scenes mapped in {time.monotonic() - started - cluster_up:.1f} s "
          "(with the cluster's shutdown)")
    assert proc.returncode == 0, proc.stderr
    assert f"connected to Dask scheduler {address}" in proc.stderr
    manifest = json.loads((out / "batch_manifest.json").read_text())
    assert manifest["counts"] == {"ok": 2}
    assert {r["worker"] for r in manifest["scenes"]} <= workers
    for scene in scenes:
        with rasterio.open(scene) as src, rasterio.open(out / f"{scene.stem}_probability.tif") as ds:
            assert ds.shape == src.shape and ds.tags()["MENET_RESULT_KEY"]
