"""Builds the plugin-managed Python environment the ME-Net worker runs in ("Install ME-Net dependencies").

QGIS-free and stdlib-only, so QGIS can run it in its own process: every heavy step
(``python -m venv``, pip, the verification that imports torch) is a child process
whose output is streamed line by line to a reporter, and which is killed on cancel.

The environment is a plain venv at :func:`user_paths.managed_env_dir`.  It is
*isolated* (no ``--system-site-packages``) by default, on Linux too: the worker
is its own process, so a PyPI rasterio with its own GDAL cannot clash with the
libraries QGIS has loaded, the pins are real pins (Debian's numpy 1.24 or a
``pip install --user torch`` in ``~/.local`` cannot shadow them), and the same
requirement files work on Windows and macOS.  ``system_site_packages=True``
re-uses the distribution's rasterio/GDAL instead (saves ~60 MB, but the env then
also sees whatever else is installed system-wide).

The environment is claimed good only by :data:`RECORD_NAME` inside it, written
after the verification run passed and removed before anything is changed, so a
cancelled, failed or half-installed environment is never taken for a working one.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from . import user_paths

#: The pinned requirement lists, one pip requirements file per variant (cited by the README).
REQUIREMENTS_DIR = Path(__file__).resolve().parent / "requirements"
VARIANTS = ("cpu-light", "cpu", "cuda")
#: Written into the environment only after verification passed.
RECORD_NAME = "menet-environment.json"
#: Seconds a cancelled child gets to exit after SIGTERM before it is killed.
KILL_GRACE_S = 5.0
VERIFY_TIMEOUT_S = 300.0
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")


class InstallError(RuntimeError):
    """The environment could not be installed or verified; the message is one line for the user."""


class InstallCancelled(InstallError):
    """The user cancelled; the running child was killed and the environment is not marked installed."""


@dataclass
class Variant:
    name: str
    requirements: List[str]            # "name==version" pins
    index_options: List[str]           # pip index options from the file, used when no wheel folder/index is given
    description: str = ""


@dataclass
class Verification:
    ok: bool
    python: str
    versions: Dict[str, str] = field(default_factory=dict)       # distribution -> installed version
    errors: Dict[str, str] = field(default_factory=dict)         # import name -> one-line error
    warnings: List[str] = field(default_factory=list)
    torch_device: Optional[str] = None                           # e.g. "cuda (NVIDIA H200)" or "cpu"

    def summary(self) -> str:
        parts = [f"{k} {v}" for k, v in self.versions.items()]
        if self.torch_device:
            parts.append(f"torch device: {self.torch_device}")
        return ", ".join(parts)


@dataclass
class InstallResult:
    python: Path
    variant: str
    verification: Verification
    already_installed: bool
    seconds: float


class _QuietReporter:
    def info(self, message):
        pass

    def warn(self, message):
        pass

    def progress(self, percent):
        pass

    def cancelled(self):
        return False


# --- requirement files ------------------------------------------------------------------------------------

def _read_requirement_file(path: Path, pins: List[str], options: List[str]) -> None:
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            _read_requirement_file(path.parent / line[3:].strip(), pins, options)
        elif line.startswith("--"):
            options.extend(line.split())
        elif _PIN.match(line):
            pins.append(line)
        else:
            raise InstallError(f"{path.name}: '{line}' is not a pinned requirement (name==version)")


def load_variant(name: str) -> Variant:
    """The pinned requirements of a variant from ``requirements/<name>.txt``."""
    if name not in VARIANTS:
        raise InstallError(f"unknown variant '{name}': choose one of {', '.join(VARIANTS)}")
    path = REQUIREMENTS_DIR / f"{name}.txt"
    pins: List[str] = []
    options: List[str] = []
    _read_requirement_file(path, pins, options)
    first_comment = next((l[1:].strip() for l in path.read_text().splitlines() if l.startswith("#")), "")
    return Variant(name, pins, options, first_comment)


def _pin_parts(pin: str):
    match = _PIN.match(pin)
    if not match:
        raise InstallError(f"'{pin}' is not a pinned requirement (name==version)")
    return match.group(1), match.group(2)


def import_name(distribution: str) -> str:
    return distribution.lower().replace("-", "_").replace(".", "_")


# --- finding Pythons, child environment -------------------------------------------------------------------

def child_environment() -> Dict[str, str]:
    """The environment for child Pythons: QGIS's PYTHONHOME/PYTHONPATH removed, no ~/.local site, unbuffered.

    Inside QGIS (and under ``make``) PYTHONPATH points at QGIS's or the checkout's packages; a child venv
    Python that inherited it would import those instead of its own.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "VIRTUAL_ENV",
                        "__PYVENV_LAUNCHER__")}
    env.update(PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def _can_make_venvs(python: Path) -> bool:
    try:
        proc = subprocess.run([str(python), "-c", "import venv, ensurepip"], env=child_environment(),
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def base_python_candidates() -> List[Path]:
    """Pythons to build the environment from, QGIS's own first (inside QGIS sys.executable is QGIS itself)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found: List[Path] = []
    exe = Path(sys.executable) if sys.executable else None
    if exe is not None and exe.name.lower().startswith("python"):
        found.append(exe)
    for prefix in {Path(sys.base_exec_prefix), Path(sys.base_prefix)}:
        found += [prefix / "bin" / f"python{version}", prefix / "bin" / "python3", prefix / "python.exe",
                  prefix / "python3.exe"]
    for name in (f"python{version}", "python3", "python"):
        which = shutil.which(name)
        if which:
            found.append(Path(which))
    unique: List[Path] = []
    for path in found:
        if path.is_file() and path not in unique:
            unique.append(path)
    return unique


def find_base_python(explicit: Optional[str] = None) -> Path:
    """The Python the environment is created from; explains what to install when none can make venvs."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise InstallError(f"base Python {path} does not exist")
        if not _can_make_venvs(path):
            raise InstallError(f"{path} cannot create virtual environments with pip "
                               "(Debian/Ubuntu: apt install python3-venv)")
        return path
    candidates = base_python_candidates()
    for path in candidates:
        if _can_make_venvs(path):
            return path
    tried = ", ".join(str(p) for p in candidates) or "none found"
    raise InstallError(f"no Python that can create virtual environments (tried: {tried}); "
                       "Debian/Ubuntu: apt install python3-venv; elsewhere install Python 3.9+ from python.org")


env_python = user_paths.managed_python


# --- streaming child processes ----------------------------------------------------------------------------

def _stop(proc: subprocess.Popen) -> None:
    """Terminate the child and everything it started (its process group), kill after a grace period."""
    if os.name == "nt":
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:  # the leader is gone or stuck: nothing it started may outlive it
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_streaming(command: Sequence[str], reporter, on_line: Optional[Callable[[str], None]] = None,
                  timeout: Optional[float] = None, tail_lines: int = 15) -> List[str]:
    """Run a child, hand each output line to ``on_line`` (default: reporter.info) as it comes.

    Returns the last ``tail_lines`` lines.  Cancelling (reporter.cancelled()) or Ctrl-C kills the child's
    process group and raises :class:`InstallCancelled`; a non-zero exit raises :class:`InstallError` with
    the last lines.
    """
    on_line = on_line or reporter.info
    popen_extra = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                   else {"start_new_session": True})
    try:
        proc = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=child_environment(), text=True,
                                encoding="utf-8", errors="replace", bufsize=1, **popen_extra)
    except OSError as exc:
        raise InstallError(f"cannot start {command[0]}: {exc}") from None
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def pump():
        with proc.stdout:
            for line in proc.stdout:
                lines.put(line.rstrip("\r\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    tail: List[str] = []
    deadline = time.monotonic() + timeout if timeout else None
    try:
        while True:
            if reporter.cancelled():
                _stop(proc)
                raise InstallCancelled("cancelled: the environment was not marked installed")
            if deadline and time.monotonic() > deadline:
                _stop(proc)
                raise InstallError(f"{Path(command[0]).name} took longer than {timeout:.0f} s and was stopped")
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.strip():
                tail = (tail + [line])[-tail_lines:]
                on_line(line)
    except KeyboardInterrupt:
        _stop(proc)
        raise
    returncode = proc.wait()
    if returncode != 0:
        last = next((l.strip() for l in reversed(tail) if "error" in l.lower()), tail[-1].strip() if tail else "")
        raise _ChildFailed(returncode, tail, last)
    return tail


class _ChildFailed(InstallError):
    def __init__(self, returncode: int, tail: List[str], last: str):
        super().__init__(f"exit status {returncode}: {last}")
        self.returncode, self.tail, self.last = returncode, tail, last


# --- the pieces of an install -----------------------------------------------------------------------------

_CHECK_SCRIPT = r"""
import json, sys
from importlib import metadata
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""

_VERIFY_SCRIPT = r"""
import importlib, json, sys, traceback
from importlib import metadata
result = {"python": sys.version.split()[0], "versions": {}, "errors": {}, "torch_device": None}
for dist, module in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        result["versions"][dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        result["errors"][module] = "not installed"
        continue
    try:
        importlib.import_module(module)
    except BaseException as exc:
        result["errors"][module] = (type(exc).__name__ + ": " + " ".join(str(exc).split()))[:300]
if "torch" in sys.modules:
    try:
        import torch
        if torch.cuda.is_available():
            device = "cuda (" + torch.cuda.get_device_name(0) + ")"
            probe = torch.ones(64, 64, device="cuda")
        else:
            device = "cpu (torch sees no CUDA GPU)" if torch.version.cuda else "cpu"
            probe = torch.ones(64, 64)
        assert float((probe @ probe).sum()) == 64.0 ** 3
        result["torch_device"] = device
    except BaseException as exc:
        result["errors"]["torch (tensor test)"] = type(exc).__name__ + ": " + " ".join(str(exc).split())[:300]
if "onnxruntime" in sys.modules:
    try:
        import onnxruntime
        result["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except BaseException as exc:
        result["errors"]["onnxruntime (providers)"] = type(exc).__name__ + ": " + " ".join(str(exc).split())[:300]
print("MENET-VERIFY " + json.dumps(result))
"""


def installed_versions(python: Path, distributions: Sequence[str]) -> Dict[str, Optional[str]]:
    """Installed version of each distribution in the environment of ``python`` (None when missing)."""
    proc = subprocess.run([str(python), "-c", _CHECK_SCRIPT, *distributions], env=child_environment(),
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise InstallError(f"{python} does not run: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def version_matches(installed: Optional[str], pinned: str) -> bool:
    """``2.14.1+cpu`` satisfies ``==2.14.1`` (PEP 440: a pin without a local label matches any local label)."""
    if installed is None:
        return False
    return installed == pinned or ("+" not in pinned and installed.split("+", 1)[0] == pinned)


def unsatisfied(python: Path, requirements: Sequence[str]) -> List[str]:
    pins = [_pin_parts(r) for r in requirements]
    versions = installed_versions(python, [name for name, _ in pins])
    return [f"{n}=={v}" for n, v in pins if not version_matches(versions.get(n), v)]


def verify_environment(python, requirements: Sequence[str], reporter=None) -> Verification:
    """Import every required package in the environment's own Python, report versions and torch's device.

    Fails (ok=False) on a missing package, a failing import or a failing tensor test; a version other than
    the pin (possible only through system site-packages) is a warning.
    """
    reporter = reporter or _QuietReporter()
    pins = [_pin_parts(r) for r in requirements]
    args: List[str] = []
    for name, _ in pins:
        args += [name, import_name(name)]
    lines: List[str] = []
    try:
        run_streaming([str(python), "-c", _VERIFY_SCRIPT, *args], reporter, on_line=lines.append,
                      timeout=VERIFY_TIMEOUT_S)
    except _ChildFailed as exc:
        how = (f"crashed with signal {-exc.returncode}" if exc.returncode < 0 else f"exit status {exc.returncode}")
        return Verification(False, str(python), errors={"python": f"{how}: {exc.last}" if exc.last else how})
    payload = next((l[len("MENET-VERIFY "):] for l in reversed(lines) if l.startswith("MENET-VERIFY ")), None)
    if payload is None:
        return Verification(False, str(python), errors={"python": "verification printed no result"})
    data = json.loads(payload)
    result = Verification(not data["errors"], str(python), data["versions"], data["errors"],
                          torch_device=data.get("torch_device"))
    for name, pinned in pins:
        got = result.versions.get(name)
        if got is not None and not version_matches(got, pinned):
            result.warnings.append(f"{name} {got} is installed where {pinned} is pinned")
    if data.get("onnxruntime_providers"):
        result.versions["onnxruntime providers"] = "/".join(data["onnxruntime_providers"])
    return result


def read_install_record(env_dir: Optional[Path] = None) -> Optional[dict]:
    """The record of the last verified install, or None when the environment is absent or not verified."""
    env_dir = Path(env_dir) if env_dir else user_paths.managed_env_dir()
    record = env_dir / RECORD_NAME
    if not record.is_file() or not env_python(env_dir).is_file():
        return None
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        return None


def _write_record(env_dir: Path, data: dict) -> None:
    tmp = env_dir / f".{RECORD_NAME}.partial"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, env_dir / RECORD_NAME)


def _venv_uses_system_site(env_dir: Path) -> Optional[bool]:
    cfg = env_dir / "pyvenv.cfg"
    if not cfg.is_file():
        return None
    for line in cfg.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "include-system-site-packages":
            return value.strip().lower() == "true"
    return False


def _pip_progress(reporter, start: float, end: float):
    """Map pip's line output onto a progress range: each 'Collecting' moves it on, installing is near the end."""
    state = {"collected": 0}

    def on_line(line: str):
        reporter.info(line)
        text = line.strip()
        if text.startswith("Collecting "):
            state["collected"] += 1
            share = 1 - 0.7 ** state["collected"]          # unknown total: approach 70 % asymptotically
            reporter.progress(start + (end - start) * 0.7 * share)
        elif text.startswith("Installing collected packages"):
            reporter.progress(start + (end - start) * 0.8)
        elif text.startswith("Successfully installed"):
            reporter.progress(end)
    return on_line


def pip_source_options(variant_options: Sequence[str], wheel_folder=None, index_url=None) -> List[str]:
    """Where pip takes packages from: a wheel folder (offline), an index, or the variant's defaults."""
    options: List[str] = []
    if wheel_folder:
        folder = Path(wheel_folder)
        if not folder.is_dir():
            raise InstallError(f"wheel folder {folder} does not exist")
        options += ["--find-links", str(folder.resolve())]
        if not index_url:
            options.append("--no-index")
    if index_url:
        if not re.match(r"^(https?|file)://", index_url):
            raise InstallError(f"index URL '{index_url}' must start with http://, https:// or file://")
        options += ["--index-url", index_url]
    if not options:
        options = list(variant_options)
    return options


def install_environment(variant: str = "cpu", env_dir=None, base_python: Optional[str] = None,
                        wheel_folder=None, index_url: Optional[str] = None, system_site_packages: bool = False,
                        fresh: bool = False, reporter=None, requirements: Optional[Sequence[str]] = None
                        ) -> InstallResult:
    """Create or update the managed environment for ``variant`` and verify it.

    ``requirements`` overrides the variant's pins (tests use tiny local wheels).  A second run with
    everything installed skips pip and only re-verifies.
    """
    started = time.monotonic()
    reporter = reporter or _QuietReporter()
    spec = load_variant(variant)
    pins = list(requirements) if requirements is not None else spec.requirements
    for pin in pins:
        _pin_parts(pin)
    env_dir = Path(env_dir) if env_dir else user_paths.managed_env_dir()
    python = env_python(env_dir)
    sources = pip_source_options(spec.index_options if requirements is None else [], wheel_folder, index_url)
    reporter.info(f"ME-Net environment '{variant}' at {env_dir}: {', '.join(pins)}")

    if fresh and env_dir.exists():
        reporter.info(f"removing the existing environment {env_dir} (fresh install)")
        shutil.rmtree(env_dir)

    record = read_install_record(env_dir)
    if (record and record.get("variant") == variant and record.get("requirements") == pins
            and record.get("system_site_packages") == system_site_packages and not unsatisfied(python, pins)):
        reporter.info(f"all {len(pins)} pinned requirements are already installed: nothing to download")
        reporter.progress(90)
        verification = _verify_or_fail(python, pins, reporter)
        _warn_without_gpu(variant, verification, reporter)
        reporter.progress(100)
        return InstallResult(python, variant, verification, True, time.monotonic() - started)

    # From here on the environment changes: it is not claimed good until verified again.
    (env_dir / RECORD_NAME).unlink(missing_ok=True)
    uses_system = _venv_uses_system_site(env_dir)
    if python.is_file() and uses_system is not None and uses_system != system_site_packages:
        reporter.info("the existing environment was made with a different system-site-packages choice: rebuilding")
        shutil.rmtree(env_dir)
    if not python.is_file() or not _runs(python):
        base = find_base_python(base_python)
        reporter.info(f"creating the environment with {base}")
        env_dir.parent.mkdir(parents=True, exist_ok=True)
        command = [str(base), "-m", "venv", "--clear", str(env_dir)]
        if system_site_packages:
            command.insert(3, "--system-site-packages")
        try:
            run_streaming(command, reporter)
        except _ChildFailed as exc:
            raise InstallError(f"creating the environment failed ({exc}); on Debian/Ubuntu: apt install "
                               "python3-venv") from None
    reporter.progress(10)

    missing = unsatisfied(python, pins)
    if missing:
        reporter.info(f"installing {len(missing)} of {len(pins)} pinned requirements: {', '.join(missing)}")
        command = [str(python), "-m", "pip", "install", "--progress-bar", "off", "--no-input", *sources, *pins]
        try:
            run_streaming(command, reporter, on_line=_pip_progress(reporter, 10, 90))
        except _ChildFailed as exc:
            raise InstallError(f"pip could not install the requirements: {exc.last or exc}") from None
    else:
        reporter.info(f"all {len(pins)} pinned requirements are already installed: nothing to download")
    reporter.progress(90)

    verification = _verify_or_fail(python, pins, reporter)
    _warn_without_gpu(variant, verification, reporter)
    reporter.info(f"environment {env_dir}: {directory_size(env_dir) / 1e6:.0f} MB on disk")
    _write_record(env_dir, {"variant": variant, "requirements": pins, "python": str(python),
                            "system_site_packages": system_site_packages, "versions": verification.versions,
                            "torch_device": verification.torch_device,
                            "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    reporter.progress(100)
    return InstallResult(python, variant, verification, False, time.monotonic() - started)


def _runs(python: Path) -> bool:
    try:
        return subprocess.run([str(python), "-c", "pass"], env=child_environment(), capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _verify_or_fail(python: Path, pins: Sequence[str], reporter) -> Verification:
    reporter.info(f"verifying: importing {', '.join(import_name(_pin_parts(p)[0]) for p in pins)} in {python}")
    verification = verify_environment(python, pins, reporter)
    for warning in verification.warnings:
        reporter.warn(warning)
    if not verification.ok:
        problems = "; ".join(f"{k}: {v}" for k, v in verification.errors.items())
        raise InstallError(f"verification failed, the environment is not usable: {problems}")
    reporter.info(f"verified: {verification.summary()}")
    return verification


def _warn_without_gpu(variant: str, verification: Verification, reporter) -> None:
    if variant == "cuda" and not (verification.torch_device or "").startswith("cuda"):
        reporter.warn("the cuda variant is installed, but torch sees no CUDA GPU here (driver missing or too old "
                      "for CUDA 13?): ME-Net will run on the CPU")


def directory_size(path: Path) -> int:
    """Bytes under ``path`` (for reporting what an environment costs on disk)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
