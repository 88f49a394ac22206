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

An environment is claimed good only by :data:`RECORD_NAME` inside it, written
after the verification run passed.  The installer replaces or removes only folders
it recognises as its own (:func:`refuse_foreign_folders`): :data:`MARKER_NAME`,
put into every environment it makes before anything else, or the record; an
``--env-dir`` that holds anything else is refused, not emptied.  A new or changed environment is built in a
sibling folder (``env.new``) and swapped in with one rename only once it has
passed, so a cancelled or failed install (another variant, a rebuild) leaves
the last verified environment in place, byte for byte, and still in use.

The venv is made from the interpreter of the running Python (QGIS's own:
inside QGIS ``sys.executable`` is whatever ``python3`` PATH finds, e.g. a pyenv
shim), checked by running it: same version, same ``sys.base_prefix``.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import child_process, user_paths
from .core.files import atomic_write_text
from .child_process import ChildProcess
from .core.reporting import Reporter

#: The pinned requirement lists, one pip requirements file per variant (cited by docs/guide/install-dependencies.md).
REQUIREMENTS_DIR = Path(__file__).resolve().parent / "requirements"
VARIANTS = ("cpu-light", "cpu", "cuda")
#: The dialog's and the CLI's default: maps on any CPU through ONNX Runtime, the smallest download.
DEFAULT_VARIANT = "cpu-light"
#: Variants whose torch must be a CPU build (a CUDA build there is PyPI's ~5 GB default taken by mistake).
CPU_ONLY_VARIANTS = ("cpu-light", "cpu")
#: Written into the environment only after verification passed.
RECORD_NAME = "menet-environment.json"
#: Written into every environment this installer makes, before the venv: the folder is one it may replace or remove.
MARKER_NAME = "menet-managed-environment.txt"
MARKER_TEXT = ("This folder is a Python environment made by ME-Net's installer (install-deps / 'Install ME-Net "
               "dependencies'); a later install may replace or remove it.\n")
#: Seconds a cancelled child gets to exit after SIGTERM before it is killed.
KILL_GRACE_S = child_process.GRACE_S
VERIFY_TIMEOUT_S = 300.0
#: Seconds the check of a variant's own package index (PyTorch's CPU index) may take before pip runs.
INDEX_CHECK_TIMEOUT_S = 15
#: A pin, optionally with a PEP 508 environment marker: ``numpy==2.3.5; python_version >= "3.13"``.
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)\s*(?:;\s*(\S.*))?$")


class InstallError(RuntimeError):
    """The environment could not be installed or verified; the message is one line for the user."""


class InstallCancelled(InstallError):
    """The user cancelled; the running child was killed and the environment in use is left as it was."""


@dataclass
class Variant:
    name: str
    requirements: List[str]            # "name==version" pins, each maybe with "; <environment marker>"
    index_options: List[str]           # pip index options from the file, used when no wheel folder/index is given
    description: str = ""
    own_requirements: List[str] = field(default_factory=list)   # the pins of the file itself (not its -r)

    @property
    def cpu_only(self) -> bool:
        return self.name in CPU_ONLY_VARIANTS


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


# --- requirement files ------------------------------------------------------------------------------------

def _read_requirement_file(path: Path, pins: List[str], options: List[str], own: Optional[List[str]] = None) -> None:
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
            if own is not None:
                own.append(line)
        else:
            raise InstallError(f"{path.name}: '{line}' is not a pinned requirement (name==version)")


def load_variant(name: str) -> Variant:
    """The pinned requirements of a variant from ``requirements/<name>.txt``."""
    if name not in VARIANTS:
        raise InstallError(f"unknown variant '{name}': choose one of {', '.join(VARIANTS)}")
    path = REQUIREMENTS_DIR / f"{name}.txt"
    pins: List[str] = []
    options: List[str] = []
    own: List[str] = []
    _read_requirement_file(path, pins, options, own)
    first_comment = next((l[1:].strip() for l in path.read_text().splitlines() if l.startswith("#")), "")
    return Variant(name, pins, options, first_comment, own)


def _pin_parts(pin: str) -> Tuple[str, str]:
    """(name, version) of ``name==version`` (a marker, if any, is not part of it)."""
    match = _PIN.match(pin.strip())
    if not match:
        raise InstallError(f"'{pin}' is not a pinned requirement (name==version)")
    return match.group(1), match.group(2)


def _pin_marker(pin: str) -> str:
    match = _PIN.match(pin.strip())
    return (match.group(3) or "").strip() if match else ""


def import_name(distribution: str) -> str:
    return distribution.lower().replace("-", "_").replace(".", "_")


#: Evaluates PEP 508 markers in the environment's own Python, with the ``packaging`` library (pip's copy in a
#: fresh venv): the requirement files pin numpy differently for Python 3.13, torch differently per platform.
_MARKERS_SCRIPT = r"""
import json, sys
try:
    from packaging.markers import Marker
except ImportError:
    from pip._vendor.packaging.markers import Marker
print(json.dumps([Marker(m).evaluate() if m else True for m in sys.argv[1:]]))
"""


def applicable_pins(python, requirements: Sequence[str]) -> List[str]:
    """The plain ``name==version`` pins of ``requirements`` whose markers hold for ``python``."""
    for pin in requirements:
        _pin_parts(pin)
    markers = [_pin_marker(pin) for pin in requirements]
    if not any(markers):
        return [pin.strip() for pin in requirements]
    proc = subprocess.run([str(python), "-c", _MARKERS_SCRIPT, *markers], env=child_environment(),
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise InstallError(f"{python} cannot evaluate the requirement markers: "
                           f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    holds = json.loads(proc.stdout.strip().splitlines()[-1])
    return ["==".join(_pin_parts(pin)) for pin, ok in zip(requirements, holds) if ok]


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


#: What a candidate base Python says about itself: version, base prefix, and whether it can make venvs with pip.
_IDENTITY_SCRIPT = r"""
import json, sys
try:
    import venv, ensurepip
    venv_ok = True
except ImportError:
    venv_ok = False
print(json.dumps({"version": list(sys.version_info[:3]), "base_prefix": sys.base_prefix, "venv": venv_ok}))
"""


@dataclass
class Interpreter:
    path: Path
    found_as: str                        # where the candidate came from (sys._base_executable, PATH, ...)
    version: Tuple[int, ...] = ()
    base_prefix: str = ""
    can_make_venvs: bool = False
    problem: str = ""                    # why it does not run, when it does not

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version)) or "?"

    def describe(self) -> str:
        if self.problem:
            return f"{self.path} ({self.found_as}: {self.problem})"
        return f"{self.path} ({self.found_as}: Python {self.version_text} at {self.base_prefix})"


def inspect_interpreter(path, found_as: str = "given") -> Interpreter:
    """Run ``path`` once and ask it for its version, ``sys.base_prefix`` and venv/ensurepip."""
    found = Interpreter(Path(path), found_as)
    try:
        proc = subprocess.run([str(path), "-c", _IDENTITY_SCRIPT], env=child_environment(), capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        found.problem = f"does not run: {exc}"
        return found
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        found.problem = f"does not run: {(proc.stderr.strip().splitlines() or ['no output'])[-1][:200]}"
        return found
    found.version, found.base_prefix, found.can_make_venvs = tuple(data["version"]), data["base_prefix"], data["venv"]
    return found


def _same_prefix(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def base_python_candidates() -> List[Tuple[Path, str]]:
    """Pythons that may be the running Python's own interpreter, most likely first, with where each was found.

    Inside QGIS ``sys.executable`` is not QGIS's interpreter: embedded Python sets it to whatever ``python3``
    PATH finds (a pyenv shim, a conda env), so the interpreter under ``sys.base_prefix`` comes right after it
    and every candidate is checked by running it (:func:`find_base_python`).
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found: List[Tuple[Path, str]] = []
    for attribute in ("_base_executable", "executable"):
        exe = getattr(sys, attribute, None)
        if exe:
            found.append((Path(exe), f"sys.{attribute}"))
    for prefix in (sys.base_exec_prefix, sys.base_prefix):
        if os.name == "nt":
            found += [(Path(prefix) / name, "sys.base_prefix") for name in ("python.exe", "python3.exe")]
        else:
            found += [(Path(prefix) / "bin" / f"python{version}", "sys.base_prefix"),
                      (Path(prefix) / "bin" / "python3", "sys.base_prefix")]
    for name in (f"python{version}", "python3", "python"):
        which = shutil.which(name)
        if which:
            found.append((Path(which), f"{name} on PATH"))
    unique: List[Tuple[Path, str]] = []
    for path, why in found:  # only files named python*: running QGIS's own binary would start QGIS
        if path.name.lower().startswith("python") and path.is_file() and path not in [p for p, _ in unique]:
            unique.append((path, why))
    return unique


def find_base_python(explicit: Optional[str] = None, reporter=None) -> Path:
    """The Python the environment is created from: the running Python's own interpreter.

    A candidate qualifies when running it reports this Python's version and ``sys.base_prefix`` (a pyenv shim
    or another installation of the same X.Y does not); failing that, the first one of the same X.Y, with a
    warning.  The log says which one was taken and why the others were not.  ``explicit`` (the CLI's
    ``--python``) is used as given once it can make venvs.
    """
    reporter = reporter or Reporter()
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise InstallError(f"base Python {path} does not exist")
        chosen = inspect_interpreter(path)
        if chosen.problem or not chosen.can_make_venvs:
            raise InstallError(f"{path} cannot create virtual environments with pip "
                               f"({chosen.problem or 'no venv/ensurepip'}; Debian/Ubuntu: apt install python3-venv)")
        reporter.info(f"base Python: {path} (Python {chosen.version_text}, given)")
        return path
    running = tuple(sys.version_info[:3])
    running_text, x_y = ".".join(map(str, running)), ".".join(map(str, running[:2]))
    checked: List[Interpreter] = []
    same_version: Optional[Interpreter] = None
    for path, why in base_python_candidates():
        candidate = inspect_interpreter(path, why)
        checked.append(candidate)
        if candidate.problem or candidate.version[:2] != running[:2]:
            continue
        own = candidate.version == running and _same_prefix(candidate.base_prefix, sys.base_prefix)
        if own and candidate.can_make_venvs:
            skipped = [c.describe() for c in checked[:-1]]
            reporter.info(f"base Python: {path} (found as {why}), the interpreter of the running Python "
                          f"{running_text} (sys.base_prefix {sys.base_prefix})"
                          + (f"; not {'; not '.join(skipped)}" if skipped else ""))
            return path
        if own:  # this Python, without venv/ensurepip: another one would only hide what to install
            raise InstallError(f"{path} (Python {running_text}, the running Python's own) cannot create virtual "
                               f"environments with pip: Debian/Ubuntu: apt install python{x_y}-venv")
        if candidate.can_make_venvs and same_version is None:
            same_version = candidate
    if same_version is not None:
        reporter.warn(f"base Python: {same_version.describe()}: not the running Python's own interpreter "
                      f"({running_text} at {sys.base_prefix}, not found), but the same version X.Y")
        return same_version.path
    tried = "; ".join(c.describe() for c in checked) or "none found"
    raise InstallError(f"no Python {x_y} that can create virtual environments (tried: {tried}); Debian/Ubuntu: "
                       f"apt install python3-venv; elsewhere install Python {x_y} from python.org")


env_python = user_paths.managed_python


# --- streaming child processes ----------------------------------------------------------------------------

def run_streaming(command: Sequence[str], reporter, on_line: Optional[Callable[[str], None]] = None,
                  timeout: Optional[float] = None, tail_lines: int = 15) -> List[str]:
    """Run a child, hand each output line to ``on_line`` (default: reporter.info) as it comes.

    Returns the last ``tail_lines`` lines.  Cancelling (reporter.cancelled()) or Ctrl-C stops the child's
    process group (``child_process``: terminate, kill after ``KILL_GRACE_S``) and raises
    :class:`InstallCancelled`; a non-zero exit raises :class:`InstallError` with the last lines.
    """
    on_line = on_line or reporter.info
    try:
        child = ChildProcess(command, env=child_environment(), merge_stderr=True)
    except OSError as exc:
        raise InstallError(f"cannot start {command[0]}: {exc}") from None
    tail: List[str] = []
    deadline = time.monotonic() + timeout if timeout else None
    with child:  # an exception here (Ctrl-C included) stops the child
        while True:
            if reporter.cancelled():
                child.stop(KILL_GRACE_S)
                raise InstallCancelled("cancelled")
            if deadline and time.monotonic() > deadline:
                child.stop(KILL_GRACE_S)
                raise InstallError(f"{Path(command[0]).name} took longer than {timeout:.0f} s and was stopped")
            item = child.read(timeout=0.2)
            if item is None:
                continue
            line = item[1]
            if line is None:
                break
            if line.strip():
                tail = (tail + [line])[-tail_lines:]
                on_line(line)
        returncode = child.wait()
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
        result["torch_build"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                                 "hip": getattr(torch.version, "hip", None)}
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


def verify_environment(python, requirements: Sequence[str], reporter=None, cpu_only: bool = False) -> Verification:
    """Import every required package in the environment's own Python, report versions and torch's device.

    ``requirements`` are plain pins (:func:`applicable_pins`).  Fails (ok=False) on a missing package, a failing
    import or a failing tensor test, and with ``cpu_only`` on a torch built for CUDA or ROCm (PyPI's default
    Linux build, ~5 GB, where PyTorch's CPU build was meant); a version other than the pin (possible only
    through system site-packages) is a warning.
    """
    reporter = reporter or Reporter()
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
    build = data.get("torch_build") or {}
    if cpu_only and (build.get("cuda") or build.get("hip")):
        kind = f"CUDA {build['cuda']}" if build.get("cuda") else f"ROCm {build['hip']}"
        data["errors"]["torch"] = (f"{build['version']} is a {kind} build, not PyTorch's CPU build (+cpu) "
                                   "this variant installs")
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
    atomic_write_text(env_dir / RECORD_NAME, json.dumps(data, indent=2))


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


# --- the variant's own package index ---------------------------------------------------------------------

def _index_urls(options: Sequence[str]) -> List[str]:
    urls: List[str] = []
    for i, option in enumerate(options):
        if option in ("-i", "--index-url", "--extra-index-url") and i + 1 < len(options):
            urls.append(options[i + 1])
        elif option.startswith(("--index-url=", "--extra-index-url=")):
            urls.append(option.split("=", 1)[1])
    return urls


def _unreachable_reason(url: str, name: str) -> Optional[str]:
    """Why ``url`` gives no answer at all (DNS, refused, timeout), or None when an HTTP server answers there.

    Only explains a failed pip check (pip's own check, with the user's proxy and certificates, decides):
    a TLS certificate this Python does not know still means the server is there.
    """
    page = url.rstrip("/") + "/" + name + "/"
    try:
        with urllib.request.urlopen(page, timeout=INDEX_CHECK_TIMEOUT_S) as response:
            response.read(1024)
        return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if "CERTIFICATE" in str(reason).upper():
            return None
        return getattr(reason, "strerror", None) or str(reason)
    except OSError as exc:  # timeouts outside URLError, reset connections
        return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def check_variant_index(python, variant: Variant, reporter) -> None:
    """Before pip runs: every package index the variant's file names answers and has the variant's own first
    pin (the cpu variant: PyTorch's CPU index and its torch ...+cpu) for this Python.

    Asked with pip itself (``pip index versions``, one try, a short timeout), so the user's pip configuration
    (proxy, certificates, mirrors) counts as it will for the install.  Without this, an unreachable index
    cost pip five retries per package, after which it took PyPI's torch: on Linux the ~5 GB CUDA build.
    """
    own = applicable_pins(python, variant.own_requirements)
    if not own:
        return
    name, version = _pin_parts(own[0])
    for url in _index_urls(variant.index_options):
        lines: List[str] = []
        command = [str(python), "-m", "pip", "index", "versions", name, "--index-url", url, "--retries", "0",
                   "--timeout", str(INDEX_CHECK_TIMEOUT_S), "--no-input"]
        try:
            run_streaming(command, reporter, on_line=lines.append, timeout=INDEX_CHECK_TIMEOUT_S * 4)
        except _ChildFailed:
            pass
        available = next((l.split(":", 1)[1] for l in lines if l.startswith("Available versions:")), "")
        versions = [v.strip() for v in available.split(",") if v.strip()]
        if any(version_matches(v, version) for v in versions):
            reporter.info(f"package index {url}: has {name} {version} for this Python")
            continue
        reason = _unreachable_reason(url, name)
        if reason is None and any("unknown command" in l for l in lines):
            reporter.info(f"package index {url}: answers (this pip is too old to list its versions)")
            continue
        if reason is not None:
            raise InstallError(
                f"the {variant.name} variant's package index {url} cannot be reached ({reason}), so nothing was "
                f"installed (PyPI's {name} for Linux is the ~5 GB CUDA build, not a CPU one); choose cpu-light "
                f"(maps through ONNX Runtime, without PyTorch), or give a wheel folder or an index URL (a mirror) "
                f"that has {name} {version}")
        python_version = ".".join(map(str, inspect_interpreter(python).version[:2]))
        have = f" (it has {', '.join(versions[:6])})" if versions else ""
        raise InstallError(f"the {variant.name} variant's package index {url} has no {name} {version} for "
                           f"Python {python_version} on this platform{have}; choose cpu-light, or give a wheel "
                           f"folder or an index URL that has it")


# --- installing: a new environment beside the one in use, swapped in once verified -------------------------

@contextlib.contextmanager
def _install_lock(env_dir: Path) -> Iterator[None]:
    """One install per environment at a time (two QGIS windows, QGIS and the CLI): they would share env.new.

    An OS lock on a file, so it ends with the process that held it, however that ended.
    """
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    handle = open(env_dir.with_name(f".{env_dir.name}.lock"), "a+")
    try:
        try:
            if os.name == "nt":
                import msvcrt
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InstallError(f"another install of {env_dir} is running (in QGIS or on the command line): "
                               "wait until it has finished") from None
        yield
    finally:
        handle.close()


def staging_dir(env_dir: Path) -> Path:
    """Where a new environment is built and checked before it replaces ``env_dir``."""
    return env_dir.with_name(env_dir.name + ".new")


def _is_ours(folder: Path, managed: bool) -> bool:
    """An environment this installer made: its marker or its record; in the managed folder (the plugin's
    profile folder) also a venv an older version made, before the marker."""
    if (folder / MARKER_NAME).is_file() or (folder / RECORD_NAME).is_file():
        return True
    return managed and (folder / "pyvenv.cfg").is_file()


def _names(folder: Path, most: int = 5) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def refuse_foreign_folders(env_dir: Path) -> None:
    """Before anything is created or removed: ``env_dir`` and the folders an install replaces beside it
    (``.new``, ``.old``) must be absent, empty, or environments this installer made.  Installing into a folder
    that holds anything else would delete it (the new environment replaces the folder), so it is refused."""
    if not env_dir.name:
        raise InstallError(f"{env_dir} cannot hold an environment: give a folder of its own for --env-dir")
    managed = os.path.abspath(env_dir) == os.path.abspath(user_paths.managed_env_dir())
    for folder, role in ((env_dir, "the environment folder"), (staging_dir(env_dir), "where a new environment is "
                         "built"), (env_dir.with_name(env_dir.name + ".old"), "where the replaced one is put")):
        if not os.path.lexists(folder) or (folder.is_symlink() and folder is not env_dir):
            continue
        if not folder.is_dir():
            raise InstallError(f"{folder} ({role}) is a file, not a folder: give another --env-dir, or move it away")
        if any(folder.iterdir()) and not _is_ours(folder, managed):
            raise InstallError(f"{folder} ({role}) is not an ME-Net environment: it holds {_names(folder)}, which "
                               "installing there would delete; give a new or empty folder for --env-dir, or move "
                               "that folder away yourself")


def _remove_tree(path: Path, reporter=None) -> None:
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists() and reporter is not None:
            reporter.warn(f"could not remove all of {path}; delete it by hand")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step: Linux's renameat2(RENAME_EXCHANGE), which ``os`` has no wrapper
    for.  False where it is not available (other systems, old kernels or C libraries, some file systems)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _swap_in(staging: Path, env_dir: Path, reporter) -> None:
    """Put the verified environment at ``env_dir`` and remove the one it replaces.

    On Linux one atomic exchange: ``env_dir`` is at every moment a complete environment.  Elsewhere two
    renames, microseconds apart.
    """
    try:
        if not env_dir.exists():
            os.rename(staging, env_dir)
            return
        if _exchange(staging, env_dir):
            _remove_tree(staging, reporter)  # now the previous environment
            return
        previous = env_dir.with_name(env_dir.name + ".old")
        _remove_tree(previous, reporter)
        os.rename(env_dir, previous)
        try:
            os.rename(staging, env_dir)
        except OSError:
            os.rename(previous, env_dir)
            raise
        _remove_tree(previous, reporter)
    except OSError as exc:
        _remove_tree(staging, reporter)
        raise InstallError(f"the new environment passed its check but could not replace the one in use at "
                           f"{env_dir} ({exc.strerror or exc}): is an ME-Net algorithm running from it? Run this "
                           "again when it has finished") from None


def _repoint(staging: Path, env_dir: Path) -> None:
    """A venv names the folder it was made in (pyvenv.cfg, activate, the '#!' line of bin/pip, bin/rio ...):
    name ``env_dir``, where it will be, so those keep working after the swap.  Python itself needs nothing."""
    old, new = os.fsencode(str(staging)), os.fsencode(str(env_dir))
    scripts = staging / ("Scripts" if os.name == "nt" else "bin")
    for path in [staging / "pyvenv.cfg", *(scripts.iterdir() if scripts.is_dir() else [])]:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 20:
            continue
        data = path.read_bytes()
        if old in data and b"\0" not in data:  # text only: Windows' .exe launchers are left alone
            path.write_bytes(data.replace(old, new))


def _in_use(record: Optional[dict]) -> str:
    """What stays in use when this install does not complete, for its last words."""
    if not record:
        return "no ME-Net environment is installed"
    return f"the environment in use is still '{record.get('variant')}' (verified {record.get('verified_at', '?')})"


def install_environment(variant: str = DEFAULT_VARIANT, env_dir=None, base_python: Optional[str] = None,
                        wheel_folder=None, index_url: Optional[str] = None, system_site_packages: bool = False,
                        fresh: bool = False, reporter=None, requirements: Optional[Sequence[str]] = None
                        ) -> InstallResult:
    """Install ``variant`` into the managed environment and verify it.

    An environment that already has the variant's pins is only re-verified (``fresh`` rebuilds it anyway).
    Anything else is built in :func:`staging_dir` and replaces the environment only once it has passed its
    check: a cancel, an error or an unreachable index leaves the environment in use as it was.
    ``requirements`` overrides the variant's pins (tests use tiny local wheels).
    """
    started = time.monotonic()
    reporter = reporter or Reporter()
    spec = load_variant(variant)
    lines = list(requirements) if requirements is not None else spec.requirements
    for pin in lines:
        _pin_parts(pin)
    env_dir = Path(os.path.abspath(env_dir)) if env_dir else user_paths.managed_env_dir()
    own_sources = requirements is None and not wheel_folder and not index_url
    sources = pip_source_options(spec.index_options if requirements is None else [], wheel_folder, index_url)
    refuse_foreign_folders(env_dir)

    with _install_lock(env_dir):
        python = env_python(env_dir)
        record = read_install_record(env_dir)
        if record and not _runs(python):  # e.g. the Python it was made from was removed or upgraded
            reporter.warn(f"the installed environment's Python {python} no longer runs: building a new one")
            (env_dir / RECORD_NAME).unlink(missing_ok=True)
            record = None
        if record and not fresh:
            try:
                pins = applicable_pins(python, lines)
            except InstallError:  # e.g. pip removed from it by hand: a new one is built
                pins = []
            if (pins and record.get("variant") == variant and record.get("requirements") == pins
                    and record.get("system_site_packages") == system_site_packages and not unsatisfied(python, pins)):
                reporter.info(f"ME-Net environment '{variant}' at {env_dir}: {', '.join(pins)}")
                reporter.info(f"all {len(pins)} pinned requirements are already installed: nothing to download")
                reporter.progress(90)
                try:
                    verification = _verify(python, pins, reporter, spec.cpu_only)
                except InstallCancelled:
                    raise InstallCancelled(f"cancelled: {_in_use(record)}") from None
                if verification.ok:
                    _report_verified(verification, variant, reporter)
                    reporter.progress(100)
                    return InstallResult(python, variant, verification, True, time.monotonic() - started)
                reporter.warn(f"the installed environment no longer passes its check ({_problems(verification)}): "
                              "building a new one")
                (env_dir / RECORD_NAME).unlink(missing_ok=True)  # it is not verified any more
                record = None
        python, verification = _build_beside(env_dir, spec, lines, sources, own_sources, base_python,
                                             system_site_packages, record, reporter)
        reporter.progress(100)
        return InstallResult(python, variant, verification, False, time.monotonic() - started)


def _build_beside(env_dir: Path, spec: Variant, lines: Sequence[str], sources: Sequence[str], own_sources: bool,
                  base_python: Optional[str], system_site_packages: bool, record: Optional[dict], reporter):
    """Build, install and verify the environment in staging_dir(env_dir), then swap it in."""
    staging = staging_dir(env_dir)
    if staging.exists():
        reporter.info(f"removing {staging}, left by an install that did not finish")
        _remove_tree(staging, reporter)
    in_use = _in_use(record)
    reporter.info(f"ME-Net environment '{spec.name}': building it in {staging}, to replace {env_dir} once it has "
                  f"passed its check ({in_use.replace('is still', 'stays') if record else 'none installed yet'})")
    try:
        base = find_base_python(base_python, reporter)
        reporter.info(f"creating the environment with {base}")
        staging.mkdir(parents=True, exist_ok=True)
        (staging / MARKER_NAME).write_text(MARKER_TEXT)  # first: a later run may remove what a killed one left
        command = [str(base), "-m", "venv", "--prompt", env_dir.name, str(staging)]
        if system_site_packages:
            command.insert(3, "--system-site-packages")
        try:
            run_streaming(command, reporter)
        except _ChildFailed as exc:
            raise InstallError(f"creating the environment failed ({exc}); on Debian/Ubuntu: apt install "
                               "python3-venv") from None
        python = env_python(staging)
        pins = applicable_pins(python, lines)
        reporter.info(f"pinned requirements for this Python: {', '.join(pins)}")
        reporter.progress(10)
        if own_sources and spec.index_options:
            check_variant_index(python, spec, reporter)
        reporter.info(f"installing {len(pins)} pinned requirements: {', '.join(pins)}")
        command = [str(python), "-m", "pip", "install", "--progress-bar", "off", "--no-input", *sources, *pins]
        try:
            run_streaming(command, reporter, on_line=_pip_progress(reporter, 10, 90))
        except _ChildFailed as exc:
            raise InstallError(f"pip could not install the requirements: {exc.last or exc}") from None
        reporter.progress(90)
        verification = _verify(python, pins, reporter, spec.cpu_only)
        if not verification.ok:
            raise InstallError(f"verification failed, the environment is not usable: {_problems(verification)}")
        _report_verified(verification, spec.name, reporter)
        reporter.info(f"environment {env_dir}: {directory_size(staging) / 1e6:.0f} MB on disk")
        _write_record(staging, {"variant": spec.name, "requirements": pins, "python": str(env_python(env_dir)),
                                "base_python": str(base), "system_site_packages": system_site_packages,
                                "versions": verification.versions, "torch_device": verification.torch_device,
                                "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        _repoint(staging, env_dir)
    except InstallCancelled:
        _remove_tree(staging, reporter)
        raise InstallCancelled(f"cancelled: {in_use}") from None
    except InstallError as exc:
        _remove_tree(staging, reporter)
        raise InstallError(f"{exc}; {in_use}") from None
    except BaseException:
        _remove_tree(staging, reporter)
        raise
    _swap_in(staging, env_dir, reporter)
    reporter.info(f"the new environment is in use at {env_dir}"
                  + (f" (it replaced '{record.get('variant')}')" if record else ""))
    return env_python(env_dir), verification


def _runs(python: Path) -> bool:
    try:
        return subprocess.run([str(python), "-c", "pass"], env=child_environment(), capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _problems(verification: Verification) -> str:
    return "; ".join(f"{k}: {v}" for k, v in verification.errors.items())


def _verify(python: Path, pins: Sequence[str], reporter, cpu_only: bool) -> Verification:
    reporter.info(f"verifying: importing {', '.join(import_name(_pin_parts(p)[0]) for p in pins)} in {python}")
    return verify_environment(python, pins, reporter, cpu_only=cpu_only)


def _report_verified(verification: Verification, variant: str, reporter) -> None:
    for warning in verification.warnings:
        reporter.warn(warning)
    reporter.info(f"verified: {verification.summary()}")
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
