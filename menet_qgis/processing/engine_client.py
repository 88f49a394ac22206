"""The QGIS side of the worker protocol (``menet_qgis/engine_process.py``): choose a Python, start
``python -m menet_qgis worker``, relay its messages to the Processing feedback.

Imports nothing heavy: the QGIS process never loads torch & co. (pip's native
libraries clash with QGIS's own — a real QGIS window segfaults on triton's LLVM).

The engine runs as a ``child_process.ChildProcess`` (its own process group, output
lines read on threads, stop = terminate then kill) rather than a QProcess/QgsBlockingProcess:
``processAlgorithm`` runs on a worker thread (GUI) or the main thread (qgis_process,
scripts); blocking reads on threads plus a polling loop work the same on both without
a Qt event loop, and give the exact exit status or signal of a dead worker.  A Ctrl+C
meant for qgis_process reaches the engine as a cancel message, not as a signal.

Which Python runs the worker, first match wins:
1. the provider setting "Python with PyTorch" (Processing › Options › Providers › ME-Net);
2. the ``MENET_PYTHON`` environment variable;
3. the plugin-managed environment (``user_paths.managed_python()``, made by
   "Install ME-Net dependencies");
4. ``.venv`` beside the plugin's source checkout (``make setup``'s; the plugin in
   build/plugins is symlinks into the checkout, resolved here);
5. ``python3`` on PATH.
1 and 2 are taken as the user's explicit choice: if that Python lacks the
libraries the run fails and says so.  3-5 are probed (one short subprocess
that looks the libraries up without importing them; successes cached) and the
first with every library is used.  The log says which Python ran and why.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from qgis.core import QgsProcessingException, QgsProcessingFeedback, QgsSettings

from ..child_process import ChildProcess
from ..core import files  # stdlib only
from ..user_paths import engine_environment, managed_env_dir, managed_python

#: The menet_qgis package, resolved (in a checkout's build/plugins, the checkout's).
PACKAGE_DIR = Path(__file__).resolve().parents[1]
SETTING = "MENET_PYTHON"
SETTING_KEY = "Processing/Configuration/" + SETTING
ENV_VAR = "MENET_PYTHON"
REQUIRED = ("numpy", "rasterio")
#: The engine runs the model with one of these (torch also trains; the others only map, on the CPU).
RUNTIME_MODULES = ("torch", "onnxruntime", "openvino")
MIN_PYTHON = (3, 9)
#: Seconds a worker gets to stop after a cancel before it is killed.
CANCEL_GRACE_SECONDS = 5.0
#: Seconds the engine gets to exit after its final message before its process group is ended.
EXIT_GRACE_SECONDS = 15.0
PROBE_TIMEOUT_SECONDS = 60
BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from menet_qgis.engine_process import main; sys.exit(main())"
PROBE = ("import sys, json, importlib.util; sys.path.insert(0, sys.argv[1]); "
         "print(json.dumps({'version': list(sys.version_info[:3]), "
         "'missing': [m for m in sys.argv[3:] if importlib.util.find_spec(m) is None]}))")
NEEDS = f"{', '.join(REQUIRED)} and one of {', '.join(RUNTIME_MODULES)} (torch with torchvision to train)"

_GOOD_PYTHONS: Dict[str, bool] = {}  # probed successfully this session


def install_hint() -> str:
    venv_python = "DIR\\Scripts\\python.exe" if os.name == "nt" else "DIR/bin/python"
    return ("Install them with the 'Install ME-Net dependencies' algorithm of the ME-Net provider (it creates "
            f"{managed_env_dir()}), or by hand: 'python3 -m venv --system-site-packages DIR' then "
            f"'{venv_python} -m pip install torch torchvision rasterio', and set Processing › Options › Providers › "
            f"ME-Net › 'Python with PyTorch' (or the MENET_PYTHON environment variable) to {venv_python}.")


def worker_env(python: str = "") -> Dict[str, str]:
    """The worker's environment.  The managed environment is isolated: QGIS's PYTHONPATH/PYTHONHOME and
    the user's ~/.local site would shadow its pinned packages (see environment_installer).  Every worker
    gets MENET_HOME = this profile's menet folder, so it finds the models 'Install model' put there."""
    if python and Path(python) == managed_python():
        from ..environment_installer import child_environment
        return engine_environment(child_environment())
    return engine_environment(dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8"))


def candidates() -> Tuple[List[Tuple[str, str]], bool]:
    """[(python, why)] in the order of preference, and whether it is the user's explicit choice."""
    setting = str(QgsSettings().value(SETTING_KEY, "") or "").strip()
    if setting:
        return [(setting, "provider setting 'Python with PyTorch'")], True
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return [(env, "MENET_PYTHON environment variable")], True
    found = []
    from ..environment_installer import read_install_record
    managed = managed_python()
    if managed.is_file() and read_install_record() is not None:  # only an install that passed its check
        found.append((str(managed), f"plugin-managed environment {managed_env_dir()}"))
    venv = PACKAGE_DIR.parent / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if venv.exists():
        found.append((str(venv), f".venv of the source checkout {PACKAGE_DIR.parent}"))
    system = shutil.which("python3") or shutil.which("python")
    if system:
        found.append((system, "python3 on PATH"))
    return found, False


def probe(python: str) -> Optional[str]:
    """None when ``python`` has every library the engine needs, else what is wrong (one line)."""
    if _GOOD_PYTHONS.get(python):
        return None
    try:
        proc = subprocess.run([python, "-c", PROBE, str(PACKAGE_DIR.parent), "probe", *REQUIRED, *RUNTIME_MODULES],
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_SECONDS, env=worker_env(python))
    except FileNotFoundError:
        return "not found"
    except PermissionError:
        return "not executable"
    except subprocess.TimeoutExpired:
        return f"did not answer within {PROBE_TIMEOUT_SECONDS} s"
    if proc.returncode != 0:
        return f"{exit_text(proc.returncode)}: {_last_lines(proc.stderr.splitlines(), 2)}"
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"did not run the check: {_last_lines((proc.stdout + proc.stderr).splitlines(), 2)}"
    version = tuple(answer["version"])
    if version < MIN_PYTHON:
        return f"is Python {'.'.join(map(str, version))}; ME-Net needs {'.'.join(map(str, MIN_PYTHON))} or newer"
    missing = [m for m in answer["missing"] if m in REQUIRED]
    if all(m in answer["missing"] for m in RUNTIME_MODULES):
        missing.append(" or ".join(RUNTIME_MODULES))
    if missing:
        return f"lacks {', '.join(missing)}"
    _GOOD_PYTHONS[python] = True
    return None


def choose_python() -> Tuple[str, str]:
    """(python, why it was chosen); QgsProcessingException explaining what is missing when none works."""
    found, explicit = candidates()
    problems = []
    for python, why in found:
        problem = probe(python)
        if problem is None:
            return python, why
        problems.append(f"{python} ({why}) {problem}")
    tried = "; ".join(problems) if problems else "no Python found"
    if explicit:
        raise QgsProcessingException(f"ME-Net cannot use the Python you chose: {tried}. The engine needs "
                                     f"{NEEDS}. {install_hint()}")
    raise QgsProcessingException(f"ME-Net needs a Python with {NEEDS} to run its engine; none found "
                                 f"(tried: {tried}). {install_hint()}")


def exit_text(returncode: int) -> str:
    """'killed by signal 11 (SIGSEGV)' or 'exited with status 2'."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        text = f"killed by signal {-returncode} ({name})"
        if -returncode == getattr(signal, "SIGKILL", 9):
            text += " — possibly out of memory (the system kills the largest process when memory runs out)"
        return text
    if returncode > 255:  # Windows: NTSTATUS such as 0xC0000005 (access violation)
        return f"exited with status 0x{returncode & 0xFFFFFFFF:08X}"
    return f"exited with status {returncode}"


def _last_lines(lines: Iterable[str], count: int) -> str:
    kept = [line.strip() for line in lines if line.strip()][-count:]
    return " | ".join(kept) if kept else "(no output)"


def file_identity(path) -> Optional[Tuple[int, int, int, int]]:
    """(device, inode, size, mtime in ns) of a file, None when there is none: the engine replaces an output by
    renaming a new file onto it, so an output with the identity it had before the run is not the run's."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def remove_partial_outputs(outputs: Iterable[str], since: float, before: Optional[Dict[str, tuple]] = None) -> None:
    """After a failed or cancelled run: outputs and hidden temporary files of this run (never older files, and
    never an output that is still the file ``before`` saw there when the run started, however recent)."""
    before = before or {}
    for output in outputs:
        path = Path(output)
        if not path.parent.is_dir():
            continue
        leftovers = [path, *files.partial_files(path), files.best_so_far_path(path)]
        for item in leftovers:
            try:
                if item == path and before.get(output) is not None and file_identity(path) == before[output]:
                    continue  # the user's own file, untouched by this run
                if item.is_file() and item.stat().st_mtime >= since - 1:
                    item.unlink()
            except OSError:
                pass


def run_job(job: str, params: Dict, feedback, outputs: Iterable[str] = ()) -> Dict:
    """Run one job in a worker process, relaying progress and log lines; returns the job's result.

    ``outputs``: files the job writes, removed when the worker fails, is cancelled or dies.
    """
    if feedback is None:
        feedback = QgsProcessingFeedback()
    python, why = choose_python()
    started = time.time()
    outputs = [str(o) for o in outputs]
    before = {output: file_identity(output) for output in outputs}
    try:
        engine = ChildProcess([python, "-c", BOOT, str(PACKAGE_DIR.parent), "worker"], env=worker_env(python),
                              stdin=True)
    except OSError as exc:
        raise QgsProcessingException(f"could not start the ME-Net engine with {python}: {exc}") from None
    feedback.pushInfo(f"ME-Net engine: {python} ({why}), process {engine.pid}")
    with engine:
        run = _relay(engine, {"job": job, "params": params}, feedback)
    final, returncode = run.final, run.returncode
    if final is not None and final["type"] == "result":
        if returncode != 0:
            feedback.pushWarning(f"the ME-Net engine {exit_text(returncode)} after finishing its job")
        return final.get("result") or {}
    remove_partial_outputs(outputs, started, before)
    if run.cancel_sent or (final is not None and final["type"] == "cancelled"):
        raise QgsProcessingException("cancelled: no output was written")
    if final is not None:
        text = str(final.get("message", "unknown error"))
        if final.get("kind") == "missing_dependency":
            text = f"the ME-Net engine's Python ({why}) {text}. {install_hint()}"
        raise QgsProcessingException(text)
    last = _last_lines(list(run.log_tail) + list(run.stray), 6)
    raise QgsProcessingException(f"the ME-Net engine ({python}) {exit_text(returncode)} without finishing; "
                                 f"QGIS is unaffected and no output was kept. Last messages: {last}")


@dataclass
class _Run:
    """What one engine run said: its last message (result, error, cancelled; None if it died first),
    whether a cancel was sent, its exit status, its last log lines and the last lines that were no
    message (a library printing to stdout, a traceback on stderr) for the error text."""

    final: Optional[Dict] = None
    cancel_sent: bool = False
    returncode: int = 0
    log_tail: deque = field(default_factory=lambda: deque(maxlen=5))
    stray: deque = field(default_factory=lambda: deque(maxlen=40))


def _relay(engine: ChildProcess, request: Dict, feedback) -> _Run:
    """Send the job and relay the engine's messages to ``feedback`` until its output ends."""
    run = _Run()
    engine.send(json.dumps(request))
    final_at = 0.0
    cancel_sent_at: Optional[float] = None
    stopping = False
    while True:
        item = engine.read(timeout=0.1)
        if feedback.isCanceled() and cancel_sent_at is None:
            cancel_sent_at, run.cancel_sent = time.monotonic(), True
            feedback.pushInfo("cancelling: asking the engine to stop")
            engine.send(json.dumps({"type": "cancel"}))
        if cancel_sent_at is not None and not stopping and time.monotonic() - cancel_sent_at > CANCEL_GRACE_SECONDS:
            stopping = True
            feedback.pushInfo(f"the engine did not stop within {CANCEL_GRACE_SECONDS:g} s: stopping it")
            engine.stop()
        if item == ("stdout", None):
            break
        if run.final is not None and time.monotonic() - final_at > EXIT_GRACE_SECONDS:
            # The job is over but its output pipe stays open (a process the engine forked still holds
            # it): stop waiting for end-of-stream and end the engine's whole process group.
            engine.kill()
            break
        if item is None or item[1] is None:
            continue
        stream, line = item
        message = _message(line) if stream == "stdout" else None
        if message is None:
            run.stray.append(line)
            continue
        kind = message.get("type")
        if kind == "progress":
            feedback.setProgress(float(message.get("percent", 0.0)))
        elif kind == "log":
            text, level = str(message.get("message", "")), message.get("level")
            run.log_tail.append(text)
            if level == "warning":
                feedback.pushWarning(text)
            elif level == "error":
                feedback.reportError(text, False)
            else:
                feedback.pushInfo(text)
        elif kind in ("result", "error", "cancelled"):
            run.final, final_at = message, time.monotonic()
    engine.close_stdin()  # an engine still reading its stdin takes the end of it as a cancel
    run.returncode = engine.wait()
    return run


def _message(line: str) -> Optional[Dict]:
    """A protocol message (a JSON object on one line), else None."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None
