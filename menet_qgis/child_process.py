"""The one way menet_qgis runs a child process it may have to stop: the engine process QGIS talks to
(``processing/engine_client.py``) and the venv/pip/verification runs of ``environment_installer.py``.

Standard library only: the QGIS process imports it.  The child leads its own process group (a new
session on POSIX, a new process group on Windows), so

- stopping it stops what it started too (pip's build back-ends, a DataLoader's workers, a process
  the engine forked that still holds its output pipe);
- a Ctrl+C meant for ``qgis_process`` or the CLI does not reach it directly: its parent decides
  (the engine gets a cancel message and cleans up; pip is terminated).

Each output pipe is read line by line on its own thread into one queue, and the caller polls it with
a timeout; between polls it checks cancel flags and deadlines.  Blocking reads on threads plus a
polling loop work the same on QGIS's Processing thread and on a main thread, without a Qt event loop,
and keep the child's exact exit status or signal.

Stopping is always the same: terminate (SIGTERM: the engine and the CLI turn it into a clean-up),
wait a grace period, then kill the whole group; the pipes are closed when the child is done.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
from typing import Dict, List, Optional, Sequence, Tuple

#: Seconds a child gets to exit after it was terminated before it (and its group) is killed.
GRACE_S = 5.0
#: Seconds to wait for a reader thread once the child is gone (a grandchild may still hold the pipe).
_READER_JOIN_S = 2.0


def _group_kwargs() -> Dict:
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return {"start_new_session": True}


class ChildProcess:
    """A child in its own process group whose output lines arrive on one queue.

    Use as a context manager: leaving the block stops a child still running (an exception,
    Ctrl+C) and closes every pipe.  ``read`` gives ``(stream, line)`` with ``stream`` "stdout" or
    "stderr" and the line without its end of line; ``line`` None says that stream has ended.
    """

    def __init__(self, command: Sequence[str], env: Optional[Dict[str, str]] = None, stdin: bool = False,
                 merge_stderr: bool = False, cwd: Optional[str] = None):
        """Starts ``command``; OSError when it cannot be started (not found, not executable)."""
        self.command = [str(c) for c in command]
        self.proc = subprocess.Popen(
            self.command, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, env=env, cwd=cwd, text=True,
            encoding="utf-8", errors="replace", bufsize=1, **_group_kwargs())
        self.pid = self.proc.pid
        self._lines: "queue.Queue[Tuple[str, Optional[str]]]" = queue.Queue()
        streams = [("stdout", self.proc.stdout)] + ([] if merge_stderr else [("stderr", self.proc.stderr)])
        self._readers: List[threading.Thread] = [
            threading.Thread(target=self._pump, args=(name, stream), name=f"child-{self.pid}-{name}", daemon=True)
            for name, stream in streams]
        for reader in self._readers:
            reader.start()

    def _pump(self, name: str, stream) -> None:
        with stream:  # closed by the thread that reads it (closing it elsewhere would block on its lock)
            for line in stream:
                self._lines.put((name, line.rstrip("\r\n")))
        self._lines.put((name, None))

    def read(self, timeout: float) -> Optional[Tuple[str, Optional[str]]]:
        """The next output line as ``(stream, line)``, ``(stream, None)`` when a stream ended, or
        None when nothing came within ``timeout`` seconds."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def send(self, line: str) -> bool:
        """Write one line to the child's stdin; False when the child is gone (its exit status says why)."""
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            return True
        except (OSError, ValueError, AttributeError):
            return False

    def close_stdin(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except (OSError, ValueError):
            pass

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def stop(self, grace_s: float = GRACE_S) -> int:
        """Terminate the child and its group, kill whatever is left after ``grace_s``; the exit status."""
        if os.name == "nt":
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            return self.wait()
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)  # the leader is gone or stuck: nothing it started may outlive it
        return self.wait()

    def kill(self) -> None:
        """Kill the child and its group now."""
        if os.name == "nt":
            try:
                self.proc.kill()
            except OSError:
                pass
        else:
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except OSError:  # gone already (ProcessLookupError), not ours to signal (PermissionError)
            pass

    def wait(self) -> int:
        """The exit status once the child has ended (negative: the signal that ended it); closes its pipes."""
        self.close_stdin()
        returncode = self.proc.wait()
        for reader in self._readers:
            reader.join(_READER_JOIN_S)
        return returncode

    def __enter__(self) -> "ChildProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.stop()
        else:
            self.wait()
