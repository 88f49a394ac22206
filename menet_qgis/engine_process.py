"""The engine process: ``python -m menet_qgis worker`` runs ONE job and talks JSON lines.

Why a separate process: pip's torch (and triton, onnxruntime ...) bring native
libraries that clash with those QGIS has loaded (a real QGIS window segfaults
importing triton's LLVM next to Mesa's).  No QGIS process imports them; each
ME-Net algorithm starts this worker with a Python that has them.

Protocol (UTF-8, one JSON object per line):

stdin, client -> worker
  1st line  ``{"job": "extract|prepare|export_channels|train|assess", "params": {...}}``
            (the parameters of ``menet_qgis.jobs``)
  later     ``{"type": "cancel"}``: stop at the next check (one batch/epoch/strip)
            and remove partial outputs.  Closing stdin (the client died) cancels too,
            so keep it open until the last message.
stdout, worker -> client (nothing else is ever written there: stray prints and
library messages go to stderr)
  ``{"type": "progress", "percent": 42.0}``
  ``{"type": "log", "level": "info|warning|error", "message": "..."}``
  ``{"type": "result", "result": {...}}``          last line on success, exit status 0
  ``{"type": "error", "message": "one line", "kind": "input|missing_dependency|internal"}``
                                                 last line on failure, exit status 1
  ``{"type": "cancelled", "message": "..."}``      last line after a cancel, exit status 3

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


def _watch_stdin(stream, cancel: threading.Event) -> None:
    """Set ``cancel`` on a cancel line or when stdin closes (the client is gone)."""
    for line in stream:
        try:
            if json.loads(line).get("type") == "cancel":
                break
        except ValueError:
            continue
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
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    sys.stdin = open(os.devnull, "r")
    first = requests.readline()
    try:
        request = json.loads(first)
        job, params = request["job"], request.get("params") or {}
    except (ValueError, KeyError, TypeError):
        channel.send(type="error", kind="input", message=f"bad job line on stdin: {first.strip()[:200]!r}")
        return EXIT_ERROR
    cancel = threading.Event()
    threading.Thread(target=_watch_stdin, args=(requests, cancel), name="menet-stdin", daemon=True).start()
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
