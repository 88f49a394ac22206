"""Fault cases of the engine process's protocol and of job parsing (issue 26 item 7), and a bounded,
seeded fuzz run of the protocol against the real engine process.

What a client (QGIS, a script) can send the engine is hostile input like any other: a later stdin line
that is no cancel message must not stop the engine from seeing a cancel or its client die, and a job line
or parameters it cannot use must end in one ``input`` error line (never a traceback, never a library's
TypeError), with the user's files byte-identical and nothing written.  Every engine here is a real
``python -m menet_qgis worker`` process in a sandbox folder (its cwd, HOME and MENET_HOME), and every
case compares a snapshot of everything under the test's folder before and after.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import ROOT, write_s2
from menet_qgis import engine_process, jobs

#: Hypothesis settings of every fuzz run here: the same examples on every run (seeded by the test's
#: code), no example database, no per-example deadline (the real-process run has its own time budget).
FUZZ = dict(derandomize=True, database=None, deadline=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
CANCEL_HINT = 'expected {"type": "cancel"}'
JOB_HINT = 'expected {"job": "extract", "params": {...}}'
JOB_CLASSES = {c.JOB: c for c in (jobs.ExtractJob, jobs.PrepareJob, jobs.ExportChannelsJob, jobs.TrainJob,
                                  jobs.AssessJob)}
#: The parameters naming a file or folder a job writes: the only paths a job may leave changed.
OUTPUT_KEYS = ("output", "stage_dir", "history", "report", "table")


# --- the sandbox and the engine ----------------------------------------------------------------------------
def snapshot(root: Path) -> dict:
    """Every file and folder under ``root``: {relative path: (size, sha256)} for files, None for folders."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            found[str(path.relative_to(root))] = None
        else:
            found[str(path.relative_to(root))] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


class Sandbox:
    """A job's world: ``in.tif`` (a small Sentinel-2 raster), ``out/p.tif`` (an earlier map at the job's
    output path, which must stay byte-identical), the session's untrained model; the engine runs with
    this folder as cwd, HOME, MENET_HOME and TMPDIR under it."""

    def __init__(self, root: Path, model: Path):
        self.root, self.folder, self.model = root, root / "sandbox", model
        for sub in ("out", "home", "menet", "tmp"):
            (self.folder / sub).mkdir(parents=True)
        self.input = write_s2(self.folder / "in.tif", 256, 256)
        self.output = self.folder / "out" / "p.tif"
        self.output.write_bytes(b"an earlier map the user keeps")
        self.env = dict(os.environ, HOME=str(self.folder / "home"), MENET_HOME=str(self.folder / "menet"),
                        TMPDIR=str(self.folder / "tmp"),
                        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.env.pop("MENET_PYTHON", None)

    def extract(self, **params) -> dict:
        """A valid extract job: 16 windows of 64 px, one thread (long enough to be cancelled mid-run)."""
        job = {"input": str(self.input), "output": str(self.output), "model": str(self.model),
               "options": {"window": 64, "overlap": 0, "batch_size": 1, "threads": 1, "runtime": "torch"}}
        return {"job": "extract", "params": dict(job, **params)}

    def start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "menet_qgis", "worker"], cwd=self.folder, env=self.env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def sandbox(tmp_path, untrained_path) -> Sandbox:
    return Sandbox(tmp_path, untrained_path)


def line(message) -> bytes:
    return json.dumps(message).encode() + b"\n"


def finished(proc: subprocess.Popen, out: bytes, err: bytes):
    """(protocol messages, stderr text) of an engine that has ended; fails on anything on stdout that is no
    protocol message, on a traceback, and unless exactly one final message ends the output."""
    messages = [json.loads(text) for text in out.decode().splitlines()]  # stdout holds protocol lines only
    stderr = err.decode(errors="replace")
    assert "Traceback" not in stderr, stderr[-3000:]
    finals = [m for m in messages if m["type"] in ("result", "error", "cancelled")]
    assert len(finals) == 1 and messages[-1] is finals[0], messages[-5:]
    assert all("\n" not in str(m.get("message", "")) for m in messages)
    assert proc.returncode == {"result": 0, "error": 1, "cancelled": 3}[finals[0]["type"]]
    assert finals[0].get("kind") != "internal", finals[0]
    return messages, stderr


def run_engine(sandbox: Sandbox, data: bytes, timeout: float = 120):
    """Send ``data`` and close stdin (the client is gone after its last line)."""
    proc = sandbox.start()
    out, err = proc.communicate(data, timeout=timeout)
    return finished(proc, out, err)


# --- later lines: the engine keeps listening (item 7) ------------------------------------------------------
BAD_LATER_LINES = [  # (line, the error log line the engine answers with)
    (b"1", f"stdin line 2 ignored: a JSON number, not an object: '1'; {CANCEL_HINT}"),
    (b"[]", f"stdin line 3 ignored: a JSON array, not an object: '[]'; {CANCEL_HINT}"),
    (b'"cancel"', f"stdin line 4 ignored: a JSON string, not an object: '\"cancel\"'; {CANCEL_HINT}"),
    (b"\xff\xfe{", "stdin line 5 ignored: not UTF-8 text: b'\\xff\\xfe{\\n'"),
    (b"cancel", f"stdin line 6 ignored: not JSON: 'cancel'; {CANCEL_HINT}"),
    (b'{"type": "pause"}', "stdin line 7 ignored: unknown message type 'pause': the only message after the job "
                           'line is {"type": "cancel"}'),
    (b'{"job": "train"}', "stdin line 8 ignored: a second job line: an engine process runs one job"),
    (b"   ", None),  # blank lines are no message and no error
]


@pytest.mark.parametrize("stop", ["cancel line", "client dies"])
def test_bad_later_lines_are_answered_and_a_cancel_still_stops_the_job(sandbox, stop):
    """Before: a later line ``1`` or ``[]`` (or bytes that are not UTF-8) killed the stdin thread, the cancel
    and the client's death went unseen, and the job ran to the end and wrote its output."""
    before = snapshot(sandbox.root)
    proc = sandbox.start()
    proc.stdin.write(line(sandbox.extract()))
    proc.stdin.flush()
    seen = []
    for raw in proc.stdout:  # the job is running: its first batch comes after this log line
        seen.append(raw)
        if b'"windows: ' in raw:
            break
    assert seen and b'"windows: ' in seen[-1], seen[-3:]
    proc.stdin.write(b"".join(bad + b"\n" for bad, _ in BAD_LATER_LINES))
    if stop == "cancel line":  # stdin stays open: only a reader that still runs can see the cancel
        proc.stdin.write(line({"type": "cancel"}))
        proc.stdin.flush()
        out = b"".join(seen) + proc.stdout.read()
        proc.stdin.close()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    else:
        out, err = proc.communicate(timeout=120)
        out = b"".join(seen) + out
    messages, _ = finished(proc, out, err)
    assert messages[-1] == {"type": "cancelled", "message": "cancelled: no output was written"}
    answered = [m["message"] for m in messages if m["type"] == "log" and m["level"] == "error"]
    assert answered == [text for _, text in BAD_LATER_LINES if text]
    assert snapshot(sandbox.root) == before  # the earlier map byte-identical, no partial file, nothing new


# --- the job line and its parameters: one input error line (item 7) -----------------------------------------
def _extract(sandbox, **changes):
    job = sandbox.extract()
    job["params"].update(changes)
    return job


BAD_JOB_LINES = {  # id: (the job line from the sandbox, the one error line)
    "not an object": (lambda s: b"1\n", f"bad job line on stdin: a JSON number, not an object: '1'; {JOB_HINT}"),
    "not UTF-8": (lambda s: b"\xff\xfe{\n", "bad job line on stdin: not UTF-8 text: b'\\xff\\xfe{\\n'"),
    "nothing": (lambda s: b"", "bad job line on stdin: it is empty, or stdin was closed before it"),
    "key beside params": (lambda s: line(dict(s.extract(), dn_offset=-1000)),
                          "bad job line on stdin: unknown key dn_offset; known: job, params (the job's parameters go "
                          "inside params)"),
    "params misspelt": (lambda s: line({"job": "extract", "parms": s.extract()["params"]}),
                        "bad job line on stdin: unknown key parms (did you mean params?); known: job, params (the "
                        "job's parameters go inside params)"),
    "job misspelt": (lambda s: line(dict(s.extract(), job="extrct")),
                     "unknown job 'extrct' (did you mean extract?); jobs: extract, prepare, export_channels, train, "
                     "assess, stac_map"),
    "job not text": (lambda s: line(dict(s.extract(), job=[])),
                     "unknown job []; jobs: extract, prepare, export_channels, train, assess, stac_map"),
    "params a list": (lambda s: line({"job": "extract", "params": []}),
                      "the extract job's parameters must be an object (name: value), got []"),
    "dn_ofset": (lambda s: line(_extract(s, dn_ofset=-1000)),
                 "unknown extract parameter dn_ofset (did you mean dn_offset?); known: input, output, model, bands, "
                 "dn_offset, bounds, stage_dir, options"),
    "bandz": (lambda s: line(_extract(s, bandz=[1, 2, 3, 4, 5, 6])),
              "unknown extract parameter bandz (did you mean bands?); known: input, output, model, bands, dn_offset, "
              "bounds, stage_dir, options"),
    "no output": (lambda s: line({"job": "extract", "params": {k: v for k, v in s.extract()["params"].items()
                                                                if k != "output"}}),
                  "the extract job needs output"),
    "output a number": (lambda s: line(_extract(s, output=5)), "output must be text (a path or a name), got 5"),
    "options text": (lambda s: line(_extract(s, options="window=64")),
                     "options must be an object (name: value), got 'window=64'"),
    "option misspelt": (lambda s: line(_extract(s, options={"windw": 64})),
                        "unknown engine option windw (did you mean window?); known: stages, stage_mode, window, "
                        "overlap, batch_size, device, runtime, threads, precision, tta, cloud_mask, mask_layer, readers, "
                        "scl"),
    "bounds reversed": (lambda s: line(_extract(s, bounds=[589840, 9636080, 587280, 9633520])),
                        "bounds must be xmin, ymin, xmax, ymax with xmin < xmax and ymin < ymax, got "
                        "[589840.0, 9636080.0, 587280.0, 9633520.0]"),
    "bounds short": (lambda s: line(_extract(s, bounds=[1, 2])),
                     "bounds must be xmin, ymin, xmax, ymax with xmin < xmax and ymin < ymax, got [1.0, 2.0]"),
    "window odd": (lambda s: line(_extract(s, options={"window": 100})),
                   "window size must be a multiple of 32 from 64 to 2048 px, got 100"),
    "path with NUL": (lambda s: line(_extract(s, output=str(s.output) + "\0.tif")),
                      "output must not contain a NUL character"),
    "train images text": (lambda s: line({"job": "train", "params": {"images": "in.tif", "output": "out/m.pt"}}),
                          "images must be a list, got 'in.tif'"),
}


@pytest.fixture(scope="module")
def bad_job_lines(tmp_path_factory, untrained_path):
    """Every case of BAD_JOB_LINES run at once (one engine each, in parallel: they end before any model
    loads), with the sandbox's snapshot before and after."""
    sandbox = Sandbox(tmp_path_factory.mktemp("bad_job_lines"), untrained_path)
    before = snapshot(sandbox.root)
    started = {case: (sandbox.start(), make(sandbox)) for case, (make, _) in BAD_JOB_LINES.items()}
    ended = {case: (proc, *proc.communicate(data, timeout=120)) for case, (proc, data) in started.items()}
    return ended, before, snapshot(sandbox.root)


@pytest.mark.parametrize("case", list(BAD_JOB_LINES))
def test_a_bad_job_line_is_one_input_error_and_touches_nothing(bad_job_lines, case):
    """Before: unknown keys beside params were ignored, a job name or parameters of the wrong JSON type and
    reversed or short bounds ended in internal TypeError/WindowError text, bytes that are not UTF-8 in a
    traceback and no protocol line at all."""
    ended, before, after = bad_job_lines
    messages, _ = finished(*ended[case])
    assert messages[-1] == {"type": "error", "kind": "input", "message": BAD_JOB_LINES[case][1]}
    assert after == before


def test_the_cli_refuses_the_same_parameters_in_one_line(cli, tmp_path):
    """The check is in the jobs' parsing, so the CLI (and batch) refuse what the engine refuses."""
    (tmp_path / "product").mkdir()
    before = snapshot(tmp_path)
    proc = cli("prepare", tmp_path / "product", tmp_path / "stack.tif", "--bounds", "600000,9640000,590000,9630000")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "menet_qgis: error: bounds must be xmin, ymin, xmax, ymax with xmin < xmax and ymin < ymax, got "
        "[600000.0, 9640000.0, 590000.0, 9630000.0]"]
    assert snapshot(tmp_path) == before


def test_qgis_shows_the_engines_one_line(qgis_app, sandbox, monkeypatch):
    """What a Processing algorithm (or a script calling the client) shows: a QgsProcessingException with the
    engine's line, and the earlier map at the output path untouched."""
    from qgis.core import QgsProcessingException, QgsProcessingFeedback

    from menet_qgis.processing import engine_client
    monkeypatch.delenv("MENET_PYTHON", raising=False)
    monkeypatch.setenv("MENET_HOME", str(sandbox.folder / "menet"))
    before = snapshot(sandbox.root)
    params = _extract(sandbox, dn_ofset=-1000)["params"]
    with pytest.raises(QgsProcessingException) as caught:
        engine_client.run_job("extract", params, QgsProcessingFeedback(), outputs=[params["output"]])
    assert str(caught.value) == ("unknown extract parameter dn_ofset (did you mean dn_offset?); known: input, "
                                 "output, model, bands, dn_offset, bounds, stage_dir, options")
    assert snapshot(sandbox.root) == before


# --- bounded fuzz run ---------------------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10)
HOSTILE_PATHS = st.sampled_from(["", ".", "/", "out", "in.tif", "out/p.tif", "../escape.tif", "out/../in.tif",
                                 "out/new.tif", "missing/p.tif", "a" * 3000, "in.tif\0x", "out/p.pt", "out/t.csv",
                                 "~/p.tif", "\u00e9t\u00e9.tif"])


def _misspelt(name: str, draw) -> str:
    at = draw(st.integers(0, len(name) - 1))
    how = draw(st.sampled_from(["drop", "double", "swap"]))
    if how == "drop":
        return name[:at] + name[at + 1:]
    if how == "double":
        return name[:at] + name[at] + name[at:]
    return name[:at] + name[at + 1:at + 2] + name[at] + name[at + 2:]


@st.composite
def near_valid_jobs(draw, sandbox_paths: dict):
    """A valid job line with one to three things wrong: a key dropped, misspelt, added, a value of any JSON
    type, a hostile path, an engine option changed, the job name changed, a key beside params."""
    base = {
        "extract": {"input": "in.tif", "output": "out/p.tif", "model": sandbox_paths["model"],
                    "options": {"window": 64, "overlap": 0, "batch_size": 1, "threads": 1, "runtime": "torch"}},
        "export_channels": {"input": "in.tif", "output": "out/c.tif", "model": sandbox_paths["model"]},
        "assess": {"prediction": "in.tif", "reference": "in.tif", "table": "out/t.csv"},
        "prepare": {"folder": "missing-product", "output": "out/s.tif", "bounds": [0, 0, 1, 1]},
        "train": {"tiles": "missing-tiles", "output": "out/m.pt", "epochs": 1},
    }
    job = draw(st.sampled_from(sorted(base)))
    params = json.loads(json.dumps(base[job]))
    request = {"job": job, "params": params}
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["drop", "misspell", "value", "path", "add", "option", "job", "beside"]))
        keys = sorted(params) or ["input"]
        key = draw(st.sampled_from(keys))
        if what == "drop":
            params.pop(key, None)
        elif what == "misspell" and key in params:
            params[_misspelt(key, draw)] = params.pop(key)
        elif what == "value":
            params[key] = draw(JSON_VALUES)
        elif what == "path":
            params[key] = draw(HOSTILE_PATHS)
        elif what == "add":
            params[draw(st.text(min_size=1, max_size=12))] = draw(JSON_VALUES)
        elif what == "option" and isinstance(params.get("options"), dict):
            name = draw(st.sampled_from(["window", "overlap", "batch_size", "stages", "stage_mode", "tta", "readers",
                                         "threads", "windw", "precision"]))
            params["options"][name] = draw(JSON_VALUES | st.sampled_from([32, 64, 96, 4096, -32, 10**9]))
        elif what == "job":
            request["job"] = draw(JSON_VALUES | st.sampled_from(["extrct", "EXTRACT", "assess", "worker"]))
        elif what == "beside":
            request[draw(st.sampled_from(["dn_offset", "parms", "type", "input"]))] = draw(JSON_VALUES)
    if isinstance(params.get("options"), dict):
        params["options"]["runtime"] = "torch"  # an ONNX export of the model would take a minute per case
    return line(request)


def _bytes_lines():
    return st.binary(max_size=120).map(lambda b: b.replace(b"\n", b"") + b"\n")


def _json_lines():
    return JSON_VALUES.map(line)


def _job_lines(model: str):
    return st.one_of(near_valid_jobs({"model": model}), _json_lines(), _bytes_lines())


@settings(max_examples=2500, **FUZZ)
@given(raw=_job_lines("model.pt"))
def test_fuzz_job_lines_parse_to_a_job_or_one_line(raw):
    """2500 seeded job lines through the engine's first-line reader and the jobs' parsing (in this process:
    the same functions the engine process calls first): a typed job, or a ValueError of one line."""
    try:
        job, params = engine_process.read_job_line(raw)
        if not isinstance(job, str) or job not in JOB_CLASSES:
            with pytest.raises(ValueError):
                jobs.run(job, params, None)
            return
        parsed = JOB_CLASSES[job].from_dict(params)
        if isinstance(parsed, jobs.ExtractJob):
            parsed.engine_options()
    except ValueError as exc:
        assert "\n" not in str(exc) and 0 < len(str(exc)) < 1500, str(exc)


def _later_lines(count: int) -> list:
    """``count`` seeded later lines drawn by Hypothesis, each checked by the engine's own reader check (in this
    process): None only for a cancel message, else "" (blank) or why it is ignored in one line, never an
    exception.  Returns those that are no cancel message."""
    drawn = []

    @settings(max_examples=count, **FUZZ)
    @given(raw=st.one_of(_bytes_lines(), _json_lines(),
                         st.dictionaries(st.sampled_from(["type", "job", "level"]), JSON_VALUES).map(line)))
    def check_and_keep(raw):
        problem = engine_process.control_line_problem(raw)
        if problem is None:
            message = json.loads(raw)
            assert isinstance(message, dict) and message.get("type") == "cancel"
            return
        assert isinstance(problem, str) and "\n" not in problem and len(problem) < 400
        drawn.append(raw)
    check_and_keep()
    return drawn


def test_fuzz_later_lines_into_one_running_engine(sandbox):
    """2000 seeded later lines checked by the reader's check, and those that are no cancel streamed into ONE
    real engine process mapping a raster, then a cancel with stdin still open: the engine answers the first
    ten, says it ignores the rest, stops at the cancel, and writes nothing."""
    junk = _later_lines(2000)
    bad = [raw for raw in junk if raw.strip()]
    print(f"later-line fuzz: {len(junk)} lines ({len(bad)} not blank) into one engine process")
    assert len(bad) > 1000
    before = snapshot(sandbox.root)
    proc = sandbox.start()
    proc.stdin.write(line(sandbox.extract()))
    proc.stdin.flush()
    seen = []
    for raw in proc.stdout:
        seen.append(raw)
        if b'"windows: ' in raw:
            break
    proc.stdin.write(b"".join(junk) + line({"type": "cancel"}))
    proc.stdin.flush()
    out = b"".join(seen) + proc.stdout.read()
    proc.stdin.close()
    err = proc.stderr.read()
    proc.wait(timeout=60)
    messages, _ = finished(proc, out, err)
    assert messages[-1]["type"] == "cancelled"
    answered = [m["message"] for m in messages if m["type"] == "log" and m["level"] == "error"]
    assert len(answered) == engine_process.REPORTED_BAD_LINES + 1
    assert answered[-1] == "10 stdin lines ignored: later bad lines are ignored silently"
    assert snapshot(sandbox.root) == before


#: Seconds of real engine processes the job-line fuzz may spend (each example starts one).
REAL_ENGINE_BUDGET_S = 30


def test_fuzz_job_lines_in_real_engine_processes(sandbox):
    """Seeded job lines, one real engine process each, stdin closed after the line (the client is gone, so a
    job that is valid is cancelled): one final line, no traceback, exit status 1 or 3 (0 only for an assess
    that finished first), no hang, and nothing changed under the test's folder but the job's own outputs.
    Bounded by REAL_ENGINE_BUDGET_S (each case may import torch and load the model)."""
    deadline = time.monotonic() + REAL_ENGINE_BUDGET_S
    ran = []

    @settings(max_examples=60, **FUZZ)
    @given(raw=_job_lines(str(sandbox.model)))
    def one_engine(raw):
        if time.monotonic() > deadline:
            return
        before = snapshot(sandbox.root)
        messages, _ = run_engine(sandbox, raw, timeout=120)
        ran.append(messages[-1]["type"])
        after = snapshot(sandbox.root)
        changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
        try:
            params = json.loads(raw).get("params") or {}
        except (ValueError, AttributeError, RecursionError):
            params = {}
        allowed = set()
        for key, value in (params.items() if isinstance(params, dict) else ()):
            if key in OUTPUT_KEYS and isinstance(value, str) and "\0" not in value:
                path = (sandbox.folder / value).resolve()
                if path.is_relative_to(sandbox.root.resolve()):
                    allowed.add(str(path.relative_to(sandbox.root.resolve())))
        assert changed <= allowed, (changed, raw[:300])
        if messages[-1]["type"] == "result":
            assert json.loads(raw)["job"] == "assess"
        for path in changed:  # a finished assess's table: removed so the next case starts from the same folder
            (sandbox.root / path).unlink()
    one_engine()
    print(f"job-line fuzz: {len(ran)} engine processes, final lines {dict(Counter(ran))}")
    assert len(ran) >= 10, ran
