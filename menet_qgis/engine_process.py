"""The engine process: ``python -m menet_qgis worker`` runs ONE job and talks JSON lines.

Why a separate process: pip's torch (and triton, onnxruntime ...) bring native
libraries that clash with those QGIS has loaded (a real QGIS window segfaults
importing triton's LLVM next to Mesa's).  No QGIS process imports them; each
ME-Net algorithm starts this worker with a Python that has them.

Protocol (UTF-8, one JSON object per line):

stdin, client -> worker
  1st line  ``{"job": "extract|prepare|export_channels|train|assess", "params": {...}}``
            (the parameters of ``menet_qgis.jobs``; no other key)
  later     ``{"type": "cancel"}``: stop at the next check (one batch/epoch/strip)
            and remove partial outputs.  Closing stdin (the client died) cancels too,
            so keep it open until the last message.  Any other later line (not JSON,
            not UTF-8, not an object, another message) is answered with a log line of
            level "error" and ignored: the job goes on, and cancel and the end of
            stdin still stop it.
stdout, worker -> client (nothing else is ever written there: stray prints and
library messages go to stderr)
  ``{"type": "progress", "percent": 42.0}``
  ``{"type": "log", "level": "info|warning|error", "message": "..."}``
  ``{"type": "result", "result": {...}}``          last line on success, exit status 0
  ``{"type": "error", "message": "one line", "kind": "input|missing_dependency|internal"}``
                                                 last line on failure, exit status 1
  ``{"type": "cancelled", "message": "..."}``      last line after a cancel, exit status 3

A bad first line (not UTF-8, not JSON, not an object, an unknown key, an
unknown job, parameters the job refuses) ends with an ``input`` error line.
A worker that ends without one of the last three lines has died (signal,
out-of-memory kill): the client reports the signal or exit status and the
last stderr lines.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 3
#: The keys of the first line.
JOB_LINE_KEYS = ("job", "params")
#: Bad later lines answered one by one; after these, one note and silence (a flooding client cannot
#: flood the log).
REPORTED_BAD_LINES = 10


def _jsonable(value):
    """numpy scalars/arrays and paths in results become plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class Channel:
    """The protocol's stdout: a private copy of fd 1; fd 1 itself is pointed at stderr so
    that nothing else (C libraries included) can write into the protocol."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self.lock = threading.Lock()

    def send(self, **message) -> None:
        line = json.dumps(message, default=_jsonable)
        with self.lock:
            self.out.write(line + "\n")
            self.out.flush()


def _reporter_class():
    from .core.reporting import Reporter

    class ProtocolReporter(Reporter):
        """Forwards the core's messages as protocol lines; progress only when it moves by 0.5 %."""

        def __init__(self, channel: Channel, cancel: threading.Event):
            self.channel, self.cancel, self.last = channel, cancel, -1.0

        def info(self, message):
            self.channel.send(type="log", level="info", message=str(message))

        def warn(self, message):
            self.channel.send(type="log", level="warning", message=str(message))

        def progress(self, percent):
            if abs(percent - self.last) >= 0.5 or percent >= 100:
                self.last = percent
                self.channel.send(type="progress", percent=round(float(percent), 1))

        def cancelled(self):
            return self.cancel.is_set()

    return ProtocolReporter


def _excerpt(text: str) -> str:
    """A received line as a message quotes it: escaped, on one line, at most 80 characters."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def _decode(raw: bytes) -> str:
    """A received line as text; ValueError saying so when it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"not UTF-8 text: {raw[:40]!r}") from None


_JSON_KINDS = {int: "number", float: "number", str: "string", list: "array", bool: "boolean", type(None): "null"}


def _json_object(raw: bytes, example: str) -> dict:
    """A received line as a JSON object; ValueError saying what it is instead (one line)."""
    text = _decode(raw).strip()
    try:
        message = json.loads(text)
    except ValueError:
        raise ValueError(f"not JSON: {_excerpt(text)}; expected {example}") from None
    except RecursionError:
        raise ValueError(f"JSON nested too deeply: {_excerpt(text)}; expected {example}") from None
    if not isinstance(message, dict):
        raise ValueError(f"a JSON {_JSON_KINDS.get(type(message), 'value')}, not an object: {_excerpt(text)}; "
                         f"expected {example}")
    return message


def read_job_line(raw: bytes):
    """(job name, params) from the first line; ValueError with one line saying what is wrong.  The job
    name and the parameters themselves are checked by ``jobs.run`` (one place for every front end)."""
    if not raw.strip():
        raise ValueError("it is empty, or stdin was closed before it")
    request = _json_object(raw, '{"job": "extract", "params": {...}}')
    from .jobs import refuse_unknown  # stdlib only
    try:
        refuse_unknown("key", request, JOB_LINE_KEYS)
    except ValueError as exc:
        raise ValueError(f"{exc} (the job's parameters go inside params)") from None
    if "job" not in request:
        raise ValueError('the job line names no job: {"job": "extract", "params": {...}}')
    return request["job"], request.get("params")


def control_line_problem(raw: bytes):
    """None for a cancel line, "" for a blank one, else why the line is ignored (one line)."""
    if not raw.strip():
        return ""
    try:
        message = _json_object(raw, '{"type": "cancel"}')
    except ValueError as exc:
        return str(exc)
    kind = message.get("type")
    if kind == "cancel":
        return None
    if "job" in message:
        return "a second job line: an engine process runs one job"
    return f'unknown message type {_excerpt(str(kind))}: the only message after the job line is {{"type": "cancel"}}'


def _watch_stdin(stream, cancel: threading.Event, channel: "Channel") -> None:
    """Set ``cancel`` on a cancel line or when stdin closes (the client is gone).  Any other line is
    answered with an error log line and ignored; whatever happens here ends in ``cancel`` too, since a
    reader that stopped could no longer see the client go."""
    ignored = 0
    try:
        for number, raw in enumerate(stream, start=2):
            problem = control_line_problem(raw)
            if problem is None:
                break
            if not problem:
                continue
            ignored += 1
            if ignored <= REPORTED_BAD_LINES:
                channel.send(type="log", level="error", message=f"stdin line {number} ignored: {problem}")
            if ignored == REPORTED_BAD_LINES:
                channel.send(type="log", level="error",
                             message=f"{REPORTED_BAD_LINES} stdin lines ignored: later bad lines are ignored silently")
    except Exception:  # noqa: BLE001 (a closed stdout, a read error: stop the job rather than run on unwatched)
        traceback.print_exc()
    finally:
        cancel.set()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _missing(channel: Channel, exc: ImportError) -> int:
    traceback.print_exc()
    channel.send(type="error", kind="missing_dependency",
                 message=f"{sys.executable} cannot import {exc.name or 'a library'}: {_one_line(exc)}")
    return EXIT_ERROR


def _runtime_versions() -> str:
    """Installed runtimes and their versions, read from package metadata (importing torch costs seconds)."""
    from importlib import metadata
    found = []
    for name in ("torch", "onnxruntime", "openvino"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found) or "no runtime installed"


def peak_memory_mb():
    """This process's peak resident memory in MB (Linux's VmHWM; ru_maxrss elsewhere), or None."""
    with contextlib.suppress(OSError):  # no /proc (macOS, Windows): the fallback below
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024)
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 1024))


def main() -> int:
    channel = Channel()
    # The protocol reads fd 0 through a private file object and sys.stdin becomes /dev/null: a library
    # that forks (OpenVINO's telemetry does) closes sys.stdin in the child, which would deadlock on the
    # lock our reader thread holds while it waits for a cancel line.
    # Bytes, decoded line by line: a line that is not UTF-8 is refused, not an exception in the reader.
    requests = os.fdopen(os.dup(0), "rb")
    sys.stdin = open(os.devnull, "r")
    try:
        job, params = read_job_line(requests.readline())
    except ValueError as exc:
        channel.send(type="error", kind="input", message=f"bad job line on stdin: {_one_line(exc)}")
        return EXIT_ERROR
    except ImportError as exc:
        return _missing(channel, exc)
    cancel = threading.Event()
    threading.Thread(target=_watch_stdin, args=(requests, cancel, channel), name="menet-stdin",
                     daemon=True).start()
    started = time.perf_counter()
    try:
        from . import jobs
        from .core.reporting import Cancelled
        from .core.inference.runtimes import TorchRequired
        from .core.io.raster_io import limit_gdal_cache
        from .core.termination import Terminated, raise_on_sigterm
        limit_gdal_cache()
        raise_on_sigterm()  # a terminated worker discards its partial outputs like a cancelled one
        reporter = _reporter_class()(channel, cancel)
    except ImportError as exc:
        return _missing(channel, exc)
    reporter.info(f"engine process: Python {sys.version.split()[0]}, {_runtime_versions()}, "
                  f"started in {time.perf_counter() - started:.1f} s")
    try:
        result = jobs.run(job, params, reporter)
    except (Cancelled, Terminated):
        channel.send(type="cancelled", message="cancelled: no output was written")
        return EXIT_CANCELLED
    except ImportError as exc:
        return _missing(channel, exc)
    except TorchRequired as exc:
        channel.send(type="error", kind="missing_dependency",
                     message=f"{sys.executable} cannot import torch: {_one_line(exc)}")
        return EXIT_ERROR
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        channel.send(type="error", kind="input", message=_one_line(exc))
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 (every failure becomes one protocol line)
        traceback.print_exc()
        channel.send(type="error", kind="internal", message=f"{type(exc).__name__}: {_one_line(exc)}")
        return EXIT_ERROR
    peak = peak_memory_mb()
    if peak is not None:  # what the job cost in memory, for the user's log and the benchmark
        reporter.info(f"engine process peak memory: {peak} MB")
    channel.send(type="result", result=result)
    return EXIT_OK
