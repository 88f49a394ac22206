"""The managed environment installer, without the network: real venvs, real pip, tiny wheels built here.

The wheels lie in a find-links folder; the variant's requirement list is replaced by theirs.  One
environment is built for the module and every test leaves it installed and verified again.
"""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT
from menet_qgis import environment_installer as installer

GOOD = ["menet-probe-core==1.0", "menet-probe-extra==2.1"]


def build_wheel(folder: Path, name: str, version: str, init_code: str) -> Path:
    """A minimal valid pure-Python wheel (PEP 427): one package, METADATA, WHEEL and RECORD."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": init_code.encode(),
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: menet-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


class Log:
    """A reporter that records everything and can cancel when a line matches."""

    def __init__(self, cancel_on=None):
        self.lines, self.warnings, self.percent = [], [], []
        self.cancel_on = cancel_on
        self._cancel = False

    def info(self, message):
        self.lines.append(message)
        if self.cancel_on and self.cancel_on in message:
            self._cancel = True

    def warn(self, message):
        self.warnings.append(message)

    def progress(self, percent):
        self.percent.append(percent)

    def cancelled(self):
        return self._cancel

    def text(self):
        return "\n".join(self.lines)


@pytest.fixture(scope="module", autouse=True)
def offline_pip():
    """No pip configuration from this machine (its extra indexes and find-links): only what a test passes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIP_CONFIG_FILE", os.devnull)
        for key in [k for k in os.environ if k.startswith("PIP_") and k != "PIP_CONFIG_FILE"]:
            mp.delenv(key)
        yield


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    build_wheel(folder, "menet-probe-core", "1.0", "VALUE = 42\n")
    build_wheel(folder, "menet-probe-extra", "2.1", "import menet_probe_core\nDOUBLE = 2 * menet_probe_core.VALUE\n")
    build_wheel(folder, "menet-probe-broken", "1.0",
                "raise ImportError('libmenetfoo.so.1: cannot open shared object file')\n")
    build_wheel(folder, "menet-probe-slow", "1.0", "")
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory, wheels):
    env_dir = tmp_path_factory.mktemp("home") / "env"
    log = Log()
    result = installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, reporter=log,
                                           requirements=GOOD)
    return env_dir, result, log


def record(env_dir):
    return installer.read_install_record(env_dir)


def test_variant_files_hold_exact_pins():
    light, cpu, cuda = (installer.load_variant(v) for v in installer.VARIANTS)
    for variant in (light, cpu, cuda):
        assert variant.requirements and all("==" in r for r in variant.requirements)
    assert {r.split("==")[0] for r in light.requirements} == {"numpy", "rasterio", "onnxruntime"}
    assert set(light.requirements) < set(cpu.requirements) and set(light.requirements) < set(cuda.requirements)
    assert {"torch", "torchvision"} <= {r.split("==")[0] for r in cpu.requirements}
    assert "https://download.pytorch.org/whl/cpu" in cpu.index_options and not cuda.index_options


def test_install_from_a_wheel_folder_is_verified_and_recorded(built):
    env_dir, result, log = built
    assert not result.already_installed
    assert result.python == installer.env_python(env_dir) and result.python.is_file()
    assert result.verification.ok and result.verification.versions == {"menet-probe-core": "1.0",
                                                                         "menet-probe-extra": "2.1"}
    assert "Successfully installed menet-probe-core-1.0 menet-probe-extra-2.1" in log.text()
    assert "verified: menet-probe-core 1.0, menet-probe-extra 2.1" in log.text()
    assert log.percent[-1] == 100 and log.percent == sorted(log.percent)
    assert record(env_dir)["requirements"] == GOOD
    # The environment is its own: nothing from the test's .venv (torch) leaks in through PYTHONPATH.
    probe = subprocess.run([str(result.python), "-c", "import menet_probe_extra as m; print(m.DOUBLE); import torch"],
                           env=installer.child_environment(), capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "84" and "No module named 'torch'" in probe.stderr


def test_second_run_is_quick_and_says_so(built, wheels):
    env_dir, first, _ = built
    log = Log()
    again = installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, reporter=log,
                                          requirements=GOOD)
    assert again.already_installed
    assert "all 2 pinned requirements are already installed: nothing to download" in log.text()
    assert not any("pip" in line.lower() or "Installing collected" in line for line in log.lines)
    assert again.seconds < first.seconds
    assert record(env_dir)["requirements"] == GOOD


def test_failed_verification_is_reported_and_never_claimed_good(built, wheels):
    env_dir, _, _ = built
    with pytest.raises(installer.InstallError) as err:
        installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, reporter=Log(),
                                      requirements=GOOD + ["menet-probe-broken==1.0"])
    assert str(err.value) == ("verification failed, the environment is not usable: menet_probe_broken: "
                              "ImportError: libmenetfoo.so.1: cannot open shared object file")
    assert record(env_dir) is None
    repaired = installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, reporter=Log(),
                                             requirements=GOOD)
    assert repaired.verification.ok and record(env_dir)["requirements"] == GOOD


def test_pip_failure_names_the_missing_package(built, wheels):
    env_dir, _, _ = built
    with pytest.raises(installer.InstallError, match=r"^pip could not install the requirements: .*"
                                                     r"No matching distribution found for menet-probe-missing==3\.0"):
        installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, reporter=Log(),
                                      requirements=GOOD + ["menet-probe-missing==3.0"])
    assert record(env_dir) is None
    installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, requirements=GOOD)
    assert record(env_dir) is not None


def pip_processes_of(python: Path):
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            state = next(l for l in (proc / "status").read_text().splitlines() if l.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if cmdline[:3] == [str(python).encode(), b"-m", b"pip"] and "zombie" not in state:
            found.append(proc.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_cancel_kills_pip_and_leaves_the_environment_unclaimed(built, wheels):
    env_dir, result, _ = built
    log = Log(cancel_on="installing 1 of 3 pinned requirements")
    started = time.monotonic()
    with pytest.raises(installer.InstallCancelled, match="cancelled: the environment was not marked installed"):
        installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, reporter=log,
                                      requirements=GOOD + ["menet-probe-slow==1.0"])
    assert time.monotonic() - started < 30
    assert record(env_dir) is None
    assert pip_processes_of(result.python) == []
    installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, requirements=GOOD)
    assert record(env_dir) is not None


def test_cancel_stops_a_child_and_its_children():
    script = ("import os, subprocess, sys, time\n"
              "child = subprocess.Popen(['sleep', '300'])\n"
              "print('pids', os.getpid(), child.pid, flush=True)\n"
              "while True:\n    print('working', flush=True); time.sleep(0.1)\n")
    log = Log(cancel_on="working")
    started = time.monotonic()
    with pytest.raises(installer.InstallCancelled):
        installer.run_streaming([sys.executable, "-c", script], log)
    assert time.monotonic() - started < installer.KILL_GRACE_S + 5
    pids = [int(p) for p in next(l for l in log.lines if l.startswith("pids")).split()[1:]]
    time.sleep(0.5)  # the signal is delivered; give the kernel a moment to take the orphan down
    for pid in pids:
        status = Path(f"/proc/{pid}/status")
        alive = status.exists() and "zombie" not in status.read_text()
        if alive:
            os.kill(pid, 9)
        assert not alive, f"process {pid} survived the cancel"


def test_bad_options_fail_before_anything_is_created(tmp_path):
    env_dir = tmp_path / "env"
    with pytest.raises(installer.InstallError, match="unknown variant 'gpu': choose one of cpu-light, cpu, cuda"):
        installer.install_environment("gpu", env_dir=env_dir)
    with pytest.raises(installer.InstallError, match="wheel folder .*nowhere does not exist"):
        installer.install_environment("cpu", env_dir=env_dir, wheel_folder=tmp_path / "nowhere")
    with pytest.raises(installer.InstallError, match="must start with http://, https:// or file://"):
        installer.install_environment("cpu", env_dir=env_dir, index_url="pypi.example")
    with pytest.raises(installer.InstallError, match="not a pinned requirement"):
        installer.install_environment("cpu", env_dir=env_dir, requirements=["numpy>=1"])
    assert not env_dir.exists()


def test_the_checkouts_venv_passes_verification():
    """make setup's .venv (numpy, rasterio, torch, torchvision) imports everything and runs a tensor on torch's device."""
    python = ROOT / ".venv" / "bin" / "python"
    if not python.is_file():
        pytest.skip("no .venv (make setup)")
    pins = [r for r in installer.load_variant("cpu").requirements
            if r.split("==")[0] in ("numpy", "rasterio", "torch", "torchvision")]
    result = installer.verify_environment(python, pins)
    assert result.ok, result.errors
    assert set(result.versions) == {"numpy", "rasterio", "torch", "torchvision"}
    assert result.versions["torch"].startswith("2.14.1")
    assert result.torch_device.startswith(("cpu", "cuda ("))


def test_install_dependencies_through_processing_explains_an_incomplete_wheel_folder(menet_provider, tmp_path,
                                                                                      monkeypatch):
    """From QGIS: a real venv is made, pip runs as a child and fails offline; the error names the package."""
    import processing
    from qgis.core import QgsProcessingException, QgsProcessingFeedback
    monkeypatch.setenv("MENET_HOME", str(tmp_path / "home"))
    empty = tmp_path / "wheels"
    empty.mkdir()
    lines = []

    class Feedback(QgsProcessingFeedback):
        def pushInfo(self, info):  # noqa: N802
            lines.append(info)

    with pytest.raises(QgsProcessingException, match=r"pip could not install the requirements: .*"
                                                     r"No matching distribution found for numpy==1\.26\.4"):
        processing.run("menet:installdependencies", {"VARIANT": 0, "WHEEL_FOLDER": str(empty)},
                       feedback=Feedback())
    assert any(l.startswith("creating the environment with ") for l in lines)
    assert any("Looking in links: " + str(empty) in l for l in lines)
    assert (tmp_path / "home" / "env" / "pyvenv.cfg").is_file()
    assert installer.read_install_record(tmp_path / "home" / "env") is None


def test_cli_install_deps_error_is_one_line(tmp_path, wheels):
    env_dir = tmp_path / "env"
    proc = subprocess.run([sys.executable, "-m", "menet_qgis", "install-deps", "--variant", "cpu-light",
                           "--wheel-folder", str(wheels), "--env-dir", str(env_dir)],
                          cwd=ROOT, env=installer.child_environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("menet_qgis: error: pip could not install the requirements: ")
    assert "numpy==1.26.4" in last
    assert installer.read_install_record(env_dir) is None


def test_install_dependencies_through_processing_installs_then_is_idempotent(menet_provider, tmp_path,
                                                                             monkeypatch, wheels):
    """The whole path from QGIS with the cpu-light variant's real pins, served by stand-in wheels of those exact
    names and versions (the real wheels need the network): venv, pip, verification, record, second run."""
    import processing
    from qgis.core import QgsProcessingFeedback
    monkeypatch.setenv("MENET_HOME", str(tmp_path / "home"))
    folder = tmp_path / "standins"
    folder.mkdir()
    for pin in installer.load_variant("cpu-light").requirements:
        name, version = pin.split("==")
        code = "def get_available_providers():\n    return ['CPUExecutionProvider']\n" if name == "onnxruntime" else ""
        build_wheel(folder, name, version, code)

    class Feedback(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.lines, self.percent = [], []

        def pushInfo(self, info):  # noqa: N802
            self.lines.append(info)

        def setProgress(self, percent):  # noqa: N802
            self.percent.append(percent)
            super().setProgress(percent)

    first = Feedback()
    result = processing.run("menet:installdependencies", {"VARIANT": 0, "WHEEL_FOLDER": str(folder)},
                            feedback=first)
    env_dir = tmp_path / "home" / "env"
    assert result["PYTHON"] == str(installer.env_python(env_dir))
    assert result["VERSIONS"].startswith("numpy 1.26.4, rasterio 1.4.4, onnxruntime 1.32.0")
    assert any(l.startswith("Successfully installed") for l in first.lines)
    assert any(l.startswith("installed and verified in ") for l in first.lines)
    assert first.percent[-1] == 100
    assert installer.read_install_record(env_dir)["variant"] == "cpu-light"
    again = Feedback()
    processing.run("menet:installdependencies", {"VARIANT": 0, "WHEEL_FOLDER": str(folder)}, feedback=again)
    assert "all 3 pinned requirements are already installed: nothing to download" in again.lines
    assert any(l.startswith("already installed and verified in ") for l in again.lines)
    assert not any(l.startswith("Successfully installed") for l in again.lines)


def test_system_site_packages_option_sees_the_distribution_and_switching_rebuilds(tmp_path, wheels):
    """--system-site-packages: the distribution's numpy is importable; going back to isolated rebuilds the env."""
    env_dir = tmp_path / "env"
    log = Log()
    installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, requirements=GOOD,
                                  system_site_packages=True, reporter=log)
    assert "include-system-site-packages = true" in (env_dir / "pyvenv.cfg").read_text()
    assert any(l.startswith(f"environment {env_dir}: ") and l.endswith(" MB on disk") for l in log.lines)
    probe = [str(installer.env_python(env_dir)), "-c", "import numpy, menet_probe_core; print(numpy.__file__)"]
    seen = subprocess.run(probe, env=installer.child_environment(), capture_output=True, text=True, timeout=60)
    assert seen.returncode == 0 and str(env_dir) not in seen.stdout, seen.stderr
    log = Log()
    installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, requirements=GOOD, reporter=log)
    assert any("different system-site-packages choice: rebuilding" in l for l in log.lines)
    assert "include-system-site-packages = false" in (env_dir / "pyvenv.cfg").read_text()
    isolated = subprocess.run(probe, env=installer.child_environment(), capture_output=True, text=True, timeout=60)
    assert "No module named 'numpy'" in isolated.stderr
