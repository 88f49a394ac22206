"""child_process.ChildProcess, the one subprocess helper of the engine client and the installer: output
lines of both pipes, the exit status, closed pipes, and a stop that leaves nothing running."""
import os
import sys
import time
from pathlib import Path

import pytest

from menet_qgis.child_process import ChildProcess


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_lines_of_both_pipes_then_their_ends_then_the_exit_status():
    script = "import sys; print('out 1'); print('err 1', file=sys.stderr, flush=True); print('out 2'); sys.exit(3)"
    seen = {"stdout": [], "stderr": []}
    ended = set()
    with ChildProcess([sys.executable, "-c", script]) as child:
        while ended != {"stdout", "stderr"}:
            item = child.read(timeout=30)
            assert item is not None, "no output within 30 s"
            stream, line = item
            if line is None:
                ended.add(stream)
            else:
                seen[stream].append(line)
        assert child.wait() == 3
    assert seen == {"stdout": ["out 1", "out 2"], "stderr": ["err 1"]}
    assert child.proc.stdout.closed and child.proc.stderr.closed


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_stop_kills_a_child_that_ignores_terminate_and_what_it_started():
    script = ("import os, signal, subprocess, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "sleeper = subprocess.Popen(['sleep', '300'])\n"
              "print(os.getpid(), sleeper.pid, flush=True)\n"
              "time.sleep(300)\n")
    with ChildProcess([sys.executable, "-c", script], merge_stderr=True) as child:
        _, line = child.read(timeout=30)
        pids = [int(p) for p in line.split()]
        started = time.monotonic()
        returncode = child.stop(grace_s=1.0)
        took = time.monotonic() - started
    assert returncode == -9 and 1.0 <= took < 5, (returncode, took)
    time.sleep(0.2)
    assert [pid for pid in pids if alive(pid)] == []


def test_leaving_the_block_on_an_exception_stops_the_child():
    with pytest.raises(KeyboardInterrupt):
        with ChildProcess([sys.executable, "-c", "import time; time.sleep(300)"]) as child:
            raise KeyboardInterrupt
    assert child.poll() == -15 and not alive(child.pid)


def test_send_after_the_child_is_gone_says_so():
    with ChildProcess([sys.executable, "-c", "pass"], stdin=True) as child:
        child.proc.wait()  # gone, its stdin pipe still open on our side: the write finds no reader
        assert child.send("{}") is False
    assert child.proc.stdin.closed


def test_a_command_that_cannot_start_is_an_oserror(tmp_path):
    with pytest.raises(OSError):
        ChildProcess([str(tmp_path / "no-such-program")])
    os.close(os.open(tmp_path / "not-executable", os.O_CREAT | os.O_WRONLY, 0o644))
    with pytest.raises(PermissionError):
        ChildProcess([str(tmp_path / "not-executable")])
