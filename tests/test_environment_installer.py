"""The managed environment installer for real: real venvs, real pip, real wheels, loopback package indexes.

Two kinds of wheels: tiny ones built here (fast; a broken, a slow, a missing package on demand), and the
cpu-light variant's real wheels (numpy, rasterio, onnxruntime and their dependencies for this Python), fetched
once with ``pip download`` into build/wheels/ and reused offline afterwards.  PyTorch's own index is never
needed: where a test needs it unreachable it points the variant at a closed loopback port, and where it needs
it reachable at a loopback index served from a temporary folder.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT, qgis_process, serve_folder
from menet_qgis import environment_installer as installer

GOOD = ["menet-probe-core==1.0", "menet-probe-extra==2.1"]
X_Y = f"{sys.version_info.major}.{sys.version_info.minor}"


# --------------------------------------------------------------------------------------------- wheels, indexes
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


def real_wheel_folder(variant: str = "cpu-light") -> Path:
    """build/wheels/<variant>-pyX.Y: the variant's real wheels for this Python, fetched once with pip download.

    The same folder, key and lock as tests/user_path_support.py, so either fills it for both.
    """
    files = [installer.REQUIREMENTS_DIR / f"{variant}.txt"]
    files += [installer.REQUIREMENTS_DIR / l.strip()[3:].strip() for l in files[0].read_text().splitlines()
              if l.strip().startswith("-r ")]
    folder = ROOT / "build" / "wheels" / f"{variant}-py{X_Y}"
    key = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
    stamp = folder / ".requirements.sha256"
    (ROOT / "build" / "wheels").mkdir(parents=True, exist_ok=True)
    with open(ROOT / "build" / "wheels" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text().strip() == key and any(folder.glob("*.whl")):
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
                               "--progress-bar", "off", "--only-binary=:all:", "-r", str(files[0]), "-d", str(folder)],
                              capture_output=True, text=True, timeout=900,
                              env={k: v for k, v in os.environ.items() if not k.startswith("PIP_")})
        if done.returncode != 0:
            pytest.skip(f"the {variant} wheels are not cached in {folder} and the package index cannot be "
                        f"reached: {(done.stdout + done.stderr).strip().splitlines()[-1:]}")
        stamp.write_text(key + "\n")
    return folder


@contextlib.contextmanager
def loopback_index(wheels: list):
    """A PEP 503 "simple" package index on 127.0.0.1 serving ``wheels``; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="menet-index-") as root:
        for wheel in wheels:
            page = Path(root) / "simple" / wheel.name.split("-")[0].replace("_", "-").lower()
            page.mkdir(parents=True, exist_ok=True)
            shutil.copy(wheel, page / wheel.name)
        for page in (Path(root) / "simple").iterdir():
            links = "".join(f'<a href="{urllib.parse.quote(w.name)}">{w.name}</a><br>' for w in page.glob("*.whl"))
            (page / "index.html").write_text(f"<!DOCTYPE html><html><body>{links}</body></html>")
        with serve_folder(root) as url:
            yield f"{url}/simple"


def closed_loopback_url() -> str:
    """A loopback URL nothing listens on: connections are refused at once, like an index that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/simple"


def variant_files_with_index(folder: Path, url: str) -> Path:
    """A copy of the requirement files whose cpu variant names ``url`` instead of PyTorch's CPU index."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in installer.REQUIREMENTS_DIR.glob("*.txt"):
        (folder / path.name).write_text(path.read_text().replace("https://download.pytorch.org/whl/cpu", url))
    return folder


# --------------------------------------------------------------------------------------------- observing
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


def tree_digest(folder: Path) -> str:
    """Every file, link and folder under ``folder`` with its content: equal digests = byte-for-byte the same."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(root, d))]):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode() + b"\0")
            if os.path.islink(path):
                digest.update(b"->" + os.readlink(path).encode())
            else:
                with open(path, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
    return digest.hexdigest()


def processes_running(path_part: str):
    """Live processes whose command line mentions ``path_part`` (no zombies)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(l for l in (proc / "status").read_text().splitlines() if l.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if path_part in cmdline and "zombie" not in state:
            found.append(proc.name)
    return found


def record(env_dir):
    return installer.read_install_record(env_dir)


def still_in_use(before: dict) -> str:
    return f"the environment in use is still 'cpu-light' (verified {before['verified_at']})"


# --------------------------------------------------------------------------------------------- fixtures
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


@pytest.fixture(scope="module")
def light(tmp_path_factory):
    """The real cpu-light environment, installed from the cached wheel folder as a user would (MENET_HOME)."""
    home = tmp_path_factory.mktemp("light-home")
    log = Log()
    started = time.monotonic()
    result = installer.install_environment("cpu-light", env_dir=home / "env", wheel_folder=real_wheel_folder(),
                                           reporter=log)
    return home, result, log, time.monotonic() - started


# --------------------------------------------------------------------------------------------- requirement files
def test_variant_files_hold_exact_pins_for_this_python():
    light, cpu, cuda = (installer.load_variant(v) for v in installer.VARIANTS)
    for variant in (light, cpu, cuda):
        assert variant.requirements and all("==" in r for r in variant.requirements)
    assert set(light.requirements) < set(cpu.requirements) and set(light.requirements) < set(cuda.requirements)
    assert "https://download.pytorch.org/whl/cpu" in cpu.index_options and not cuda.index_options
    assert installer.DEFAULT_VARIANT == "cpu-light"
    pins = {v.name: installer.applicable_pins(sys.executable, v.requirements) for v in (light, cpu, cuda)}
    assert [p.split("==")[0] for p in pins["cpu-light"]] == ["numpy", "rasterio", "onnxruntime"]
    numpy = pins["cpu-light"][0]
    assert numpy == ("numpy==1.26.4" if sys.version_info < (3, 13) else "numpy==2.3.5")
    assert pins["cpu"][3:] == (["torch==2.14.1+cpu", "torchvision==0.29.1+cpu"]
                               if sys.platform == "linux" and os.uname().machine == "x86_64"
                               else ["torch==2.14.1", "torchvision==0.29.1"])
    assert pins["cuda"][3:] == ["torch==2.14.1", "torchvision==0.29.1"]


def test_a_marker_picks_the_pin_for_each_python_version(tmp_path):
    """numpy 1.26.4 has no wheels for Python 3.13: the files pin 2.3.5 there, decided in the target Python."""
    lines = installer.load_variant("cpu-light").requirements
    pythons = {}
    for candidate in [sys.executable, *sorted((Path.home() / ".pyenv" / "versions").glob("3.1[0-9]*/bin/python3")),
                      *map(Path, filter(None, (shutil.which(f"python3.{m}") for m in range(10, 15))))]:
        probe = installer.inspect_interpreter(candidate)
        if not probe.problem and probe.version[:2] not in pythons:
            pythons[probe.version[:2]] = candidate
    for version, python in pythons.items():
        try:
            numpy = installer.applicable_pins(python, lines)[0]
        except installer.InstallError:  # a bare interpreter without packaging or pip
            continue
        assert numpy == ("numpy==1.26.4" if version < (3, 13) else "numpy==2.3.5"), (python, version)


# --------------------------------------------------------------------------------------------- install, tiny wheels
def test_install_from_a_wheel_folder_is_verified_recorded_and_swapped_in(built):
    env_dir, result, log = built
    assert not result.already_installed
    assert result.python == installer.env_python(env_dir) and result.python.is_file()
    assert result.verification.ok and result.verification.versions == {"menet-probe-core": "1.0",
                                                                         "menet-probe-extra": "2.1"}
    assert "Successfully installed menet-probe-core-1.0 menet-probe-extra-2.1" in log.text()
    assert "verified: menet-probe-core 1.0, menet-probe-extra 2.1" in log.text()
    assert any(l.startswith(f"ME-Net environment 'cpu-light': building it in {env_dir}.new") for l in log.lines)
    assert f"the new environment is in use at {env_dir}" in log.lines
    assert log.percent[-1] == 100 and log.percent == sorted(log.percent)
    assert record(env_dir)["requirements"] == GOOD and record(env_dir)["python"] == str(result.python)
    assert not installer.staging_dir(env_dir).exists()
    # Built in env.new and moved: the scripts name where the environment is now.
    pip = subprocess.run([str(env_dir / "bin" / "pip"), "--version"], env=installer.child_environment(),
                         capture_output=True, text=True, timeout=60)
    assert pip.returncode == 0 and f"{env_dir}/lib/" in pip.stdout, pip.stderr
    assert ".new" not in (env_dir / "pyvenv.cfg").read_text() + (env_dir / "bin" / "activate").read_text()
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


def test_an_installed_environment_that_no_longer_passes_is_rebuilt(built, wheels):
    """Damaged after its install (here: a package's code replaced): the rerun's check fails, and a new one is
    built and swapped in instead of 'already installed'."""
    env_dir, _, _ = built
    damaged = next((env_dir / "lib").glob("python3*/site-packages/menet_probe_extra/__init__.py"))
    damaged.write_text("raise ImportError('damaged by hand')\n")
    log = Log()
    again = installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, reporter=log,
                                          requirements=GOOD)
    assert not again.already_installed and again.verification.ok
    assert log.warnings == ["the installed environment no longer passes its check (menet_probe_extra: ImportError: "
                            "damaged by hand): building a new one"]
    assert "damaged" not in next((env_dir / "lib").glob("python3*/site-packages/menet_probe_extra/__init__.py")
                                 ).read_text()


def test_failed_verification_keeps_the_verified_environment_in_use(built, wheels):
    env_dir, _, _ = built
    before, digest = record(env_dir), tree_digest(env_dir)
    with pytest.raises(installer.InstallError) as err:
        installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, reporter=Log(),
                                      requirements=GOOD + ["menet-probe-broken==1.0"])
    assert str(err.value) == ("verification failed, the environment is not usable: menet_probe_broken: "
                              "ImportError: libmenetfoo.so.1: cannot open shared object file; "
                              + still_in_use(before))
    assert record(env_dir) == before and tree_digest(env_dir) == digest
    assert not installer.staging_dir(env_dir).exists()


def test_pip_failure_names_the_missing_package_and_changes_nothing(built, wheels):
    env_dir, _, _ = built
    before, digest = record(env_dir), tree_digest(env_dir)
    with pytest.raises(installer.InstallError, match=r"^pip could not install the requirements: .*"
                                                     r"No matching distribution found for menet-probe-missing==3\.0"
                                                     r".*; the environment in use is still 'cpu-light'"):
        installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, reporter=Log(),
                                      requirements=GOOD + ["menet-probe-missing==3.0"])
    assert record(env_dir) == before and tree_digest(env_dir) == digest
    assert not installer.staging_dir(env_dir).exists()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_cancel_kills_pip_and_leaves_the_environment_in_use(built, wheels):
    env_dir, _, _ = built
    before, digest = record(env_dir), tree_digest(env_dir)
    log = Log(cancel_on="installing 3 pinned requirements")
    started = time.monotonic()
    with pytest.raises(installer.InstallCancelled) as err:
        installer.install_environment("cpu", env_dir=env_dir, wheel_folder=wheels, reporter=log,
                                      requirements=GOOD + ["menet-probe-slow==1.0"])
    assert str(err.value) == f"cancelled: {still_in_use(before)}"
    assert time.monotonic() - started < 60
    assert record(env_dir) == before and tree_digest(env_dir) == digest
    staging = installer.staging_dir(env_dir)
    assert not staging.exists() and processes_running(str(staging)) == []


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


def test_a_second_install_of_the_same_environment_waits_its_turn(built, wheels):
    env_dir, _, _ = built
    lock = open(env_dir.with_name(f".{env_dir.name}.lock"), "a+")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with pytest.raises(installer.InstallError, match=f"another install of {env_dir} is running"):
            installer.install_environment("cpu-light", env_dir=env_dir, wheel_folder=wheels, requirements=GOOD)
    finally:
        lock.close()
    assert record(env_dir)["requirements"] == GOOD


@pytest.mark.unit
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
    assert list(tmp_path.iterdir()) == []


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
    assert any("building it in" in l for l in log.lines) and f"the new environment is in use at {env_dir} " \
        "(it replaced 'cpu-light')" in log.lines
    assert "include-system-site-packages = false" in (env_dir / "pyvenv.cfg").read_text()
    isolated = subprocess.run(probe, env=installer.child_environment(), capture_output=True, text=True, timeout=60)
    assert "No module named 'numpy'" in isolated.stderr


# --------------------------------------------------------------------------------------------- the base Python
def other_interpreter():
    """A real Python that is not the running one (another version or installation), or None."""
    candidates = sorted((Path.home() / ".pyenv" / "versions").glob("3.*/bin/python3"))
    candidates += [Path(p) for p in (shutil.which(f"python3.{m}") for m in range(8, 15)) if p]
    for path in candidates:
        probe = installer.inspect_interpreter(path)
        if not probe.problem and (probe.version != tuple(sys.version_info[:3])
                                  or not installer._same_prefix(probe.base_prefix, sys.base_prefix)):
            return path, probe
    return None


def test_the_venv_is_made_from_the_running_pythons_own_interpreter(tmp_path, monkeypatch):
    """What embedded Python does inside QGIS: sys.executable is the first 'python3' on PATH (here a shim that
    runs another installation), not QGIS's interpreter.  The installer takes the one under sys.base_prefix."""
    other = other_interpreter()
    if other is None:
        pytest.skip("no second Python installation on this machine to stand for a shim on PATH")
    path, probe = other
    shims = tmp_path / "shims"
    shims.mkdir()
    shim = shims / "python3"
    shim.write_text(f"#!/bin/sh\nexec {path} \"$@\"\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(sys, "executable", str(shim))
    monkeypatch.setattr(sys, "_base_executable", str(shim))
    log = Log()
    chosen = installer.find_base_python(reporter=log)
    own = installer.inspect_interpreter(chosen)
    assert own.version == tuple(sys.version_info[:3]) and installer._same_prefix(own.base_prefix, sys.base_prefix)
    assert chosen != shim and chosen.parent in (Path(sys.base_prefix) / "bin", Path(sys.base_exec_prefix) / "bin")
    assert log.lines == [f"base Python: {chosen} (found as sys.base_prefix), the interpreter of the running Python "
                         f"{'.'.join(map(str, sys.version_info[:3]))} (sys.base_prefix {sys.base_prefix}); not "
                         f"{shim} (sys._base_executable: Python {probe.version_text} at {probe.base_prefix})"]


def test_inside_qgis_process_the_log_names_qgis_own_interpreter(qgis_env, tmp_path):
    """The real embedded interpreter (qgis_process), with a shim on PATH where this machine has another Python:
    the log names the interpreter under QGIS's sys.base_prefix; pip then fails on an empty wheel folder."""
    empty = tmp_path / "wheels"
    empty.mkdir()
    env = dict(qgis_env, MENET_HOME=str(tmp_path / "home"))
    other = other_interpreter()
    if other is not None:
        shims = tmp_path / "shims"
        shims.mkdir()
        (shims / "python3").write_text(f"#!/bin/sh\nexec {other[0]} \"$@\"\n")
        (shims / "python3").chmod(0o755)
        env["PATH"] = f"{shims}{os.pathsep}{env['PATH']}"
    proc = qgis_process(["run", "menet:installdependencies", "--", f"WHEEL_FOLDER={empty}"], env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    line = next(l for l in out.splitlines() if l.startswith("base Python: "))
    chosen = Path(line.split()[2])
    assert "(found as sys.base_prefix)" in line or "(found as sys._base_executable)" in line, line
    assert chosen.resolve() == Path(f"/usr/bin/python{X_Y}").resolve() or chosen.parent == Path("/usr/bin"), line
    if other is not None:
        assert f"not {shims / 'python3'} (sys._base_executable: " in line
    assert "No matching distribution found for numpy==" in out and "no ME-Net environment is installed" in out
    assert not (tmp_path / "home" / "env").exists() and not (tmp_path / "home" / "env.new").exists()


# --------------------------------------------------------------------------------------------- the cpu variant
def test_cpu_variant_stops_at_once_when_its_index_cannot_be_reached(built, tmp_path, monkeypatch):
    """PyTorch's CPU index down (here: a closed loopback port): no retries, no PyPI torch, one line that
    offers cpu-light; the environment in use stays."""
    env_dir, _, _ = built
    before, digest = record(env_dir), tree_digest(env_dir)
    url = closed_loopback_url()
    monkeypatch.setattr(installer, "REQUIREMENTS_DIR", variant_files_with_index(tmp_path / "requirements", url))
    log = Log()
    started = time.monotonic()
    with pytest.raises(installer.InstallError) as err:
        installer.install_environment("cpu", env_dir=env_dir, reporter=log)
    seconds = time.monotonic() - started
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"the cpu variant's package index {url} cannot be reached (Connection refused), "
                              "so nothing was installed (PyPI's torch for Linux is the ~5 GB CUDA build")
    assert "choose cpu-light (maps through ONNX Runtime, without PyTorch)" in message
    assert "wheel folder" in message and "torch 2.14.1" in message
    assert message.endswith("; " + still_in_use(before))
    assert not any(l.startswith(("Collecting", "installing ")) for l in log.lines), log.text()
    assert seconds < 60, seconds   # the venv is made first (pip asks the index); then one refused connection
    assert record(env_dir) == before and tree_digest(env_dir) == digest
    assert not installer.staging_dir(env_dir).exists()


def test_index_check_accepts_an_index_with_the_pinned_build_and_names_what_another_one_lacks(built, tmp_path):
    """A reachable loopback index: the pinned +cpu build there passes; only another version there fails in
    one line that says what the index has."""
    python = built[1].python
    cpu_builds = tmp_path / "cpu"
    cpu_builds.mkdir()
    variant = installer.Variant("cpu", [], [], own_requirements=["menet-probe-core==1.0+cpu"])
    with loopback_index([build_wheel(cpu_builds, "menet-probe-core", "1.0+cpu", "")]) as url:
        variant.index_options = ["--extra-index-url", url]
        log = Log()
        installer.check_variant_index(python, variant, log)
        assert log.lines[-1] == f"package index {url}: has menet-probe-core 1.0+cpu for this Python"
    older = tmp_path / "older"
    older.mkdir()
    with loopback_index([build_wheel(older, "menet-probe-core", "0.9+cpu", "")]) as url:
        variant.index_options = ["--extra-index-url", url]
        with pytest.raises(installer.InstallError) as err:
            installer.check_variant_index(python, variant, Log())
        assert str(err.value) == (f"the cpu variant's package index {url} has no menet-probe-core 1.0+cpu for "
                                  f"Python {X_Y} on this platform (it has 0.9+cpu); choose cpu-light, or give a "
                                  "wheel folder or an index URL that has it")


def test_a_cuda_build_of_torch_is_refused_where_the_cpu_build_is_meant():
    """The checkout's .venv: PyPI's torch (a CUDA build) is refused where the CPU build is meant, after its
    tensor test ran; where its torch is a CPU build (Debian's, in the CI chroot) it passes."""
    python = ROOT / ".venv" / "bin" / "python"
    if not python.is_file():
        pytest.skip("no .venv (make setup)")
    probe = subprocess.run([str(python), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                           capture_output=True, text=True, timeout=300, env=installer.child_environment())
    if probe.returncode != 0:
        pytest.skip(f".venv has no torch: {probe.stderr.strip().splitlines()[-1:]}")
    version, cuda = probe.stdout.split()
    pins = [p for p in installer.applicable_pins(python, installer.load_variant("cuda").requirements)
            if p.split("==")[0] in ("numpy", "rasterio", "torch", "torchvision")]
    cpu = installer.verify_environment(python, pins, cpu_only=True)
    assert set(cpu.versions) == {"numpy", "rasterio", "torch", "torchvision"}
    assert cpu.torch_device.startswith(("cpu", "cuda ("))   # the tensor test ran on the device torch sees
    if cuda == "None":
        assert cpu.ok, cpu.errors
    else:
        assert not cpu.ok and cpu.errors == {"torch": f"{version} is a CUDA {cuda} build, not PyTorch's CPU build "
                                                      "(+cpu) this variant installs"}


@pytest.mark.skipif(sys.platform != "linux", reason="the real index, from this Linux machine")
def test_cli_cpu_variant_with_pytorchs_index_out_of_reach_says_so_in_one_line(tmp_path):
    """The real cpu variant and the real https://download.pytorch.org/whl/cpu, where it cannot be reached."""
    try:
        urllib.request.urlopen("https://download.pytorch.org/whl/cpu/", timeout=5).close()
        pytest.skip("PyTorch's index is reachable from here: this would download torch")
    except OSError:
        pass
    env_dir = tmp_path / "env"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "menet_qgis", "install-deps", "--variant", "cpu",
                           "--env-dir", str(env_dir)], cwd=ROOT, env=installer.child_environment(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and time.monotonic() - started < 90
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("menet_qgis: error: the cpu variant's package index https://download.pytorch.org/whl/cpu "
                           "cannot be reached (")
    assert "choose cpu-light" in last and last.endswith("; no ME-Net environment is installed")
    assert "Retrying" not in proc.stderr and "Collecting" not in proc.stderr
    assert not env_dir.exists() and not installer.staging_dir(env_dir).exists()


# --------------------------------------------------------------------------------------------- the real cpu-light
def test_real_cpu_light_install_from_a_wheel_folder(light):
    home, result, log, seconds = light
    env_dir = home / "env"
    versions = result.verification.versions
    numpy = "1.26.4" if sys.version_info < (3, 13) else "2.3.5"
    assert (versions["numpy"], versions["rasterio"], versions["onnxruntime"]) == (numpy, "1.4.4", "1.32.0")
    assert "CPUExecutionProvider" in versions["onnxruntime providers"]
    assert "torch" not in versions and result.verification.torch_device is None
    size_line = next(l for l in log.lines if l.startswith(f"environment {env_dir}: "))
    megabytes = int(size_line.split(": ")[1].split()[0])
    assert 150 < megabytes < 600, size_line
    assert any(l.startswith(f"Looking in links: {real_wheel_folder()}") for l in log.lines)
    print(f"\ncpu-light from a wheel folder: {seconds:.1f} s, {megabytes} MB, Python {X_Y}")


def test_the_worker_finds_the_installed_environment(light, monkeypatch):
    """processing/engine_client's contract: managed_python() with a verified record, and it has what the
    engine needs."""
    from menet_qgis.processing import engine_client
    home = light[0]
    monkeypatch.setenv("MENET_HOME", str(home))
    monkeypatch.delenv("MENET_PYTHON", raising=False)
    monkeypatch.setattr(engine_client, "_GOOD_PYTHONS", {})
    found, explicit = engine_client.candidates()
    assert not explicit
    assert found[0] == (str(home / "env" / "bin" / "python"), f"plugin-managed environment {home / 'env'}")
    assert engine_client.probe(found[0][0]) is None


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_a_cancelled_or_failed_change_of_variant_leaves_cpu_light_in_use(light, monkeypatch):
    """cpu-light → cpu from the cpu-light wheel folder: cancelled while pip works, then failed (no torch there).
    Both times the cpu-light environment is byte-for-byte as it was and the worker still takes it."""
    from menet_qgis.processing import engine_client
    home = light[0]
    env_dir = home / "env"
    monkeypatch.setenv("MENET_HOME", str(home))
    monkeypatch.delenv("MENET_PYTHON", raising=False)
    before, digest = record(env_dir), tree_digest(env_dir)
    log = Log(cancel_on="Processing ")
    with pytest.raises(installer.InstallCancelled) as err:
        installer.install_environment("cpu", wheel_folder=real_wheel_folder(), reporter=log)
    assert str(err.value) == f"cancelled: {still_in_use(before)}"
    assert any(l.startswith("Processing ") for l in log.lines)
    assert record(env_dir) == before and tree_digest(env_dir) == digest
    assert not installer.staging_dir(env_dir).exists() and processes_running(str(installer.staging_dir(env_dir))) == []
    with pytest.raises(installer.InstallError) as err:
        installer.install_environment("cpu", wheel_folder=real_wheel_folder(), reporter=Log())
    torch = installer.applicable_pins(sys.executable, installer.load_variant("cpu").own_requirements)[0]
    assert str(err.value).startswith("pip could not install the requirements: ")
    assert f"No matching distribution found for {torch}" in str(err.value)
    assert str(err.value).endswith("; " + still_in_use(before))
    assert record(env_dir) == before and tree_digest(env_dir) == digest
    monkeypatch.setattr(engine_client, "_GOOD_PYTHONS", {})
    found, _ = engine_client.candidates()
    assert found[0][0] == str(env_dir / "bin" / "python") and engine_client.probe(found[0][0]) is None


# --------------------------------------------------------------------------------------------- QGIS and the CLI
def test_install_dependencies_through_processing_explains_an_incomplete_wheel_folder(menet_provider, tmp_path,
                                                                                      monkeypatch):
    """From QGIS with the default variant (cpu-light): a real venv is made, pip runs as a child and fails
    offline; the error names the package and nothing is left behind."""
    import processing
    from qgis.core import QgsProcessingException, QgsProcessingFeedback
    monkeypatch.setenv("MENET_HOME", str(tmp_path / "home"))
    empty = tmp_path / "wheels"
    empty.mkdir()
    lines = []

    class Feedback(QgsProcessingFeedback):
        def pushInfo(self, info):  # noqa: N802
            lines.append(info)

    numpy = installer.applicable_pins(sys.executable, installer.load_variant("cpu-light").requirements)[0]
    with pytest.raises(QgsProcessingException, match=r"pip could not install the requirements: .*"
                                                     rf"No matching distribution found for {numpy}; "
                                                     "no ME-Net environment is installed"):
        processing.run("menet:installdependencies", {"WHEEL_FOLDER": str(empty)}, feedback=Feedback())
    assert any(l.startswith("creating the environment with ") for l in lines)
    assert any("Looking in links: " + str(empty) in l for l in lines)
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == [".env.lock"]


def test_cli_install_deps_error_is_one_line(tmp_path, wheels):
    env_dir = tmp_path / "env"
    proc = subprocess.run([sys.executable, "-m", "menet_qgis", "install-deps", "--wheel-folder", str(wheels),
                           "--env-dir", str(env_dir)],
                          cwd=ROOT, env=installer.child_environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("menet_qgis: error: pip could not install the requirements: ")
    assert "numpy==" in last and last.endswith("; no ME-Net environment is installed")
    assert "environment 'cpu-light'" in proc.stderr   # the default variant
    assert installer.read_install_record(env_dir) is None and not env_dir.exists()


def test_install_dependencies_through_processing_installs_then_is_idempotent(menet_provider, tmp_path,
                                                                             monkeypatch, wheels):
    """The whole path from QGIS with the cpu-light variant's real pins, served by stand-in wheels of those exact
    names and versions (fast; the real wheels are installed above): venv, pip, verification, record, rerun."""
    import processing
    from qgis.core import QgsProcessingFeedback
    monkeypatch.setenv("MENET_HOME", str(tmp_path / "home"))
    folder = tmp_path / "standins"
    folder.mkdir()
    pins = installer.applicable_pins(sys.executable, installer.load_variant("cpu-light").requirements)
    for pin in pins:
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
    result = processing.run("menet:installdependencies", {"WHEEL_FOLDER": str(folder)}, feedback=first)
    env_dir = tmp_path / "home" / "env"
    assert result["PYTHON"] == str(installer.env_python(env_dir))
    assert result["VERSIONS"].startswith(", ".join(p.replace("==", " ") for p in pins))
    assert any(l.startswith("Successfully installed") for l in first.lines)
    assert any(l.startswith("installed and verified in ") for l in first.lines)
    assert first.percent[-1] == 100
    assert installer.read_install_record(env_dir)["variant"] == "cpu-light"
    again = Feedback()
    processing.run("menet:installdependencies", {"VARIANT": 0, "WHEEL_FOLDER": str(folder)}, feedback=again)
    assert "all 3 pinned requirements are already installed: nothing to download" in again.lines
    assert any(l.startswith("already installed and verified in ") for l in again.lines)
    assert not any(l.startswith("Successfully installed") for l in again.lines)


@pytest.mark.unit
def test_the_dialog_offers_cpu_light_first_and_by_default(menet_provider):
    from qgis.core import QgsApplication
    algorithm = QgsApplication.processingRegistry().algorithmById("menet:installdependencies")
    variant = algorithm.parameterDefinition("VARIANT")
    assert variant.options()[variant.defaultValue()].startswith("cpu-light — ")
    assert [o.split(" — ")[0] for o in variant.options()] == list(installer.VARIANTS)
