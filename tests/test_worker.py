"""The out-of-process engine: the JSON-lines protocol, and what QGIS sees when the worker
succeeds, fails, is cancelled, dies, or its Python lacks torch."""
import json
import os
import subprocess
from pathlib import Path
import sys
import textwrap
import time

import numpy as np
import pytest
from qgis.core import QgsProcessingException, QgsProcessingFeedback

from helpers import ROOT, run_in_fresh_qgis, write_s2

ALG = "menet:extractmangroves"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def checkout_venv_works() -> bool:
    """The checkout's .venv (``make test``'s) exists and has the engine's libraries.  In the QGIS 3.40
    chroot the suite runs from /opt/menet-venv and the host's .venv there is another Python's."""
    return VENV_PYTHON.exists() and subprocess.run([str(VENV_PYTHON), "-c", "import numpy, rasterio"],
                                                   capture_output=True).returncode == 0


#: A Python with the engine's libraries: the checkout's .venv, else the one running the suite.
ENGINE_PYTHON = VENV_PYTHON if checkout_venv_works() else Path(sys.executable)


class RecordingFeedback(QgsProcessingFeedback):
    """Keeps every relayed line with its level; cancels itself once a line contains ``cancel_on``."""

    def __init__(self, cancel_on=None):
        super().__init__()
        self.lines, self.progress, self.cancel_on = [], [], cancel_on
        self.progressChanged.connect(self.progress.append)
        self.cancelled_at = None

    def _keep(self, level, text):
        self.lines.append((level, text))
        if self.cancel_on and self.cancel_on in text and self.cancelled_at is None:
            self.cancelled_at = time.monotonic()
            self.cancel()

    def pushInfo(self, info):  # noqa: N802
        self._keep("info", info)

    def pushWarning(self, warning):  # noqa: N802
        self._keep("warning", warning)

    def reportError(self, error, fatalError=False):  # noqa: N802,N803
        self._keep("error", error)

    def text(self):
        return "\n".join(t for _, t in self.lines)


@pytest.fixture
def processing(menet_provider, monkeypatch):
    import processing as qgis_processing
    monkeypatch.delenv("MENET_PYTHON", raising=False)
    return qgis_processing


def start_worker():
    return subprocess.Popen([sys.executable, "-m", "menet_qgis", "worker"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_protocol_one_real_job_in_json_lines(untrained_path, tmp_path):
    src = write_s2(tmp_path / "in.tif", 70, 90)
    worker = start_worker()
    job = {"job": "extract", "params": {"input": str(src), "output": str(tmp_path / "p.tif"),
                                        "model": str(untrained_path),
                                        "options": {"window": 64, "overlap": 32, "stages": ["stage2"]}}}
    worker.stdin.write(json.dumps(job) + "\n")
    worker.stdin.flush()  # stdin stays open: closing it would mean "the client is gone, cancel"
    out = worker.stdout.read()
    err = worker.stderr.read()
    worker.stdin.close()
    worker.wait(timeout=60)
    messages = [json.loads(line) for line in out.splitlines()]  # stdout holds protocol lines only
    assert worker.returncode == 0, err
    kinds = {m["type"] for m in messages}
    assert kinds <= {"log", "progress", "result"} and messages[-1]["type"] == "result"
    levels = {m["level"] for m in messages if m["type"] == "log"}
    assert levels == {"info", "warning"}  # the untrained-model warning arrives as a warning
    assert [m["percent"] for m in messages if m["type"] == "progress"][-1] == 100.0
    result = messages[-1]["result"]
    assert result["probability"] == str(tmp_path / "p.tif") and (tmp_path / "p.tif").is_file()
    assert set(result["stages"]) == {"stage2"} and result["windows_run"] > 0
    # the log's last line says what the job cost in memory (the benchmark reads it through qgis_process)
    last_log = [m["message"] for m in messages if m["type"] == "log"][-1]
    assert last_log.startswith("engine process peak memory: ") and last_log.endswith(" MB")
    assert 50 < int(last_log.split(": ")[1].split()[0]) < 16000  # a real reading, not a unit slip


def test_protocol_bad_input_is_one_error_line(tmp_path):
    worker = start_worker()
    job = {"job": "extract", "params": {"input": str(tmp_path / "missing.tif"), "output": str(tmp_path / "p.tif")}}
    out, _ = worker.communicate(json.dumps(job) + "\n", timeout=600)
    last = json.loads(out.splitlines()[-1])
    assert worker.returncode == 1
    assert last["type"] == "error" and last["kind"] == "input" and "not found" in last["message"]
    assert "\n" not in last["message"]
    worker = start_worker()
    out, _ = worker.communicate("this is not json\n", timeout=60)
    assert worker.returncode == 1 and json.loads(out)["type"] == "error"


def test_closing_stdin_cancels_and_leaves_nothing(untrained_path, tmp_path):
    """A client that dies closes the worker's stdin: the worker stops and removes its partial output."""
    src = write_s2(tmp_path / "in.tif", 256, 256)
    worker = start_worker()
    job = {"job": "extract", "params": {"input": str(src), "output": str(tmp_path / "out" / "p.tif"),
                                        "model": str(untrained_path),
                                        "options": {"window": 64, "overlap": 0, "batch_size": 2}}}
    (tmp_path / "out").mkdir()
    out, _ = worker.communicate(json.dumps(job) + "\n", timeout=600)  # writes the job, then closes stdin
    assert worker.returncode == 3 and json.loads(out.splitlines()[-1])["type"] == "cancelled"
    assert list((tmp_path / "out").iterdir()) == []


def test_algorithm_log_names_the_python_and_relays_levels(processing, untrained_path, tmp_path):
    src = write_s2(tmp_path / "in.tif", 60, 60)
    feedback = RecordingFeedback()
    processing.run(ALG, {"INPUT": str(src), "MODEL": str(untrained_path), "OUTPUT": str(tmp_path / "p.tif"),
                         "WINDOW_SIZE": 64, "OVERLAP": 32}, feedback=feedback)
    engine_line = next(t for _, t in feedback.lines if t.startswith("ME-Net engine:"))
    if checkout_venv_works():
        assert str(VENV_PYTHON) in engine_line and ".venv of the source checkout" in engine_line
    else:  # no usable .venv beside the checkout: the next candidate, named with its reason
        assert "python3 on PATH" in engine_line or "managed environment" in engine_line, engine_line
    assert ("warning", next(t for _, t in feedback.lines if "UNTRAINED" in t)) in feedback.lines
    assert feedback.progress and feedback.progress[-1] == 100.0


def test_worker_killed_by_a_signal_becomes_an_exception(processing, untrained_path, tmp_path, monkeypatch):
    crasher = tmp_path / "crashing-python"
    crasher.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        # the probe ('probe') runs normally; the worker ('worker') dies of a segfault
        if [ "$4" = worker ]; then kill -SEGV $$; fi
        exec {ENGINE_PYTHON} "$@"
        """))
    crasher.chmod(0o755)
    monkeypatch.setenv("MENET_PYTHON", str(crasher))
    src = write_s2(tmp_path / "in.tif", 40, 40)
    out = tmp_path / "p.tif"
    with pytest.raises(QgsProcessingException, match=r"killed by signal 11 \(SIGSEGV\)") as caught:
        processing.run(ALG, {"INPUT": str(src), "MODEL": str(untrained_path), "OUTPUT": str(out)},
                       feedback=RecordingFeedback())
    assert str(crasher) in str(caught.value) and "QGIS is unaffected" in str(caught.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["crashing-python", "in.tif"]


def test_cancel_mid_run_stops_the_worker_and_leaves_nothing(processing, untrained_path, tmp_path):
    src = write_s2(tmp_path / "in.tif", 384, 384)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "p.tif"
    feedback = RecordingFeedback(cancel_on="windows:")  # logged by the engine before the first batch
    with pytest.raises(QgsProcessingException, match="cancelled: no output was written"):
        processing.run(ALG, {"INPUT": str(src), "MODEL": str(untrained_path), "OUTPUT": str(out),
                             "WINDOW_SIZE": 64, "OVERLAP": 0, "BATCH_SIZE": 2, "STAGES": [3]}, feedback=feedback)
    assert feedback.cancelled_at is not None
    pid = int(next(t for _, t in feedback.lines if t.startswith("ME-Net engine:")).rsplit(" ", 1)[1])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert list((tmp_path / "out").iterdir()) == []


def test_torch_missing_in_the_workers_python_is_explained(processing, tmp_path, monkeypatch):
    """torch and the CPU runtimes hidden by packages of those names that fail to import, first on
    PYTHONPATH (works wherever they are installed)."""
    for name in ("torch", "onnxruntime", "openvino"):
        hide = tmp_path / "hide" / name
        hide.mkdir(parents=True)
        (hide / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "hide"), os.environ.get("PYTHONPATH", "")]))
    src = write_s2(tmp_path / "in.tif", 20, 20)
    with pytest.raises(QgsProcessingException) as caught:
        processing.run(ALG, {"INPUT": str(src), "OUTPUT": str(tmp_path / "p.tif")}, feedback=RecordingFeedback())
    message = str(caught.value)
    assert "cannot import" in message and "Install ME-Net dependencies" in message
    assert "pip install torch torchvision" in message
    assert not (tmp_path / "p.tif").exists()


def test_explicit_python_without_torch_is_refused_with_instructions(processing, tmp_path, monkeypatch):
    system = "/usr/bin/python3"
    if subprocess.run([system, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("the system Python has torch")
    monkeypatch.setenv("MENET_PYTHON", system)
    src = write_s2(tmp_path / "in.tif", 20, 20)
    with pytest.raises(QgsProcessingException) as caught:
        processing.run(ALG, {"INPUT": str(src), "OUTPUT": str(tmp_path / "p.tif")}, feedback=RecordingFeedback())
    message = str(caught.value)
    assert f"{system} (MENET_PYTHON environment variable) lacks torch" in message
    assert "Install ME-Net dependencies" in message and "Python with PyTorch" in message


def test_qgis_process_never_imports_torch(tmp_path, untrained_path):
    """A fresh QGIS process (the pytest process imports torch through other tests) runs Extract
    through the worker; afterwards none of the heavy libraries is in its sys.modules."""
    src = write_s2(tmp_path / "in.tif", 40, 50)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    env.pop("MENET_PYTHON", None)
    report = run_in_fresh_qgis(tmp_path / "fresh_qgis.py", f"""\
        result = processing.run("menet:extractmangroves", {{"INPUT": {str(src)!r}, "MODEL": {str(untrained_path)!r},
                                "OUTPUT": {str(tmp_path / "p.tif")!r}, "WINDOW_SIZE": 64, "OVERLAP": 32}})
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in
                       ("torch", "torchvision", "triton", "rasterio", "onnxruntime", "openvino", "dask")
                       or m in ("menet_qgis.core.inference.engine", "menet_qgis.core.io.raster_io", "menet_qgis.core.model.checkpoint"))
        print(json.dumps({{"output": result["OUTPUT"], "heavy": heavy}}))
        """, env)
    assert report["output"] == str(tmp_path / "p.tif") and (tmp_path / "p.tif").is_file()
    assert report["heavy"] == []


def test_long_runs_log_windows_done_rate_and_time_left(bundle, tmp_path, monkeypatch):
    from menet_qgis.core import reporting
    from menet_qgis.core.inference import engine
    from menet_qgis.core.io import raster_io

    class Lines(reporting.Reporter):
        def __init__(self):
            self.lines = []

        def info(self, message):
            self.lines.append(message)

    monkeypatch.setattr(engine, "PROGRESS_LOG_SECONDS", 0.0)
    reporter = Lines()
    src = raster_io.RasterInput(write_s2(tmp_path / "in.tif", 128, 128))
    engine.extract(bundle, src, tmp_path / "p.tif", engine.EngineOptions(window=64, overlap=0, batch_size=1),
                   reporter)
    progress = [line for line in reporter.lines if " windows/s, about " in line]
    assert progress and progress[0].startswith("1 of 4 windows (25 %)") and progress[-1].endswith("s left")


def test_provider_setting_comes_before_the_environment_variable(processing, tmp_path, monkeypatch):
    """Processing › Options › Providers › ME-Net › "Python with PyTorch" is the first choice."""
    from processing.core.ProcessingConfig import ProcessingConfig
    from qgis.core import QgsSettings

    from menet_qgis.processing.engine_client import SETTING, SETTING_KEY
    assert SETTING in ProcessingConfig.settings  # registered by the provider: shown in the options dialog
    monkeypatch.setenv("MENET_PYTHON", str(ENGINE_PYTHON))
    settings = QgsSettings()
    settings.setValue(SETTING_KEY, str(tmp_path / "no-such-python"))
    try:
        with pytest.raises(QgsProcessingException, match=r"no-such-python \(provider setting 'Python with PyTorch'\) "
                                                         r"not found"):
            processing.run(ALG, {"INPUT": str(write_s2(tmp_path / "in.tif", 20, 20)),
                                 "OUTPUT": str(tmp_path / "p.tif")}, feedback=RecordingFeedback())
    finally:
        settings.remove(SETTING_KEY)


# --- the model store the QGIS side passes to its engine (issue 24) -------------------------------------
class NoResourceWarnings:
    """Turns ResourceWarning into an error and collects those raised where Python cannot raise them
    (an unclosed file found by the garbage collector), so a test fails on either."""

    def __enter__(self):
        import gc
        import warnings
        self.caught = []
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("error", ResourceWarning)
        self._hook, sys.unraisablehook = sys.unraisablehook, self.caught.append
        gc.collect()
        return self

    def __exit__(self, *exc):
        import gc
        gc.collect()
        sys.unraisablehook = self._hook
        self._warnings.__exit__(*exc)
        messages = [f"{u.exc_type.__name__}: {u.exc_value}" for u in self.caught]
        assert not messages, messages
        return False


@pytest.fixture
def profile_store(tmp_path, monkeypatch):
    """This QGIS's profile is a fresh folder and MENET_HOME is unset: the store is whatever the QGIS side
    (user_paths, asking QgsApplication for the profile) says."""
    from qgis.core import QgsApplication
    from menet_qgis import user_paths
    monkeypatch.delenv("MENET_HOME", raising=False)
    profile = tmp_path / "profile"
    monkeypatch.setattr(QgsApplication, "qgisSettingsDirPath", staticmethod(lambda: str(profile) + "/"))
    store = user_paths.installed_models_dir()
    assert store == profile / "menet_qgis" / "models"
    return store


@pytest.mark.unit
def test_every_worker_gets_the_profiles_store(profile_store):
    """The checkout's Python and the managed environment's (whose environment is rebuilt from scratch by
    environment_installer.child_environment) both get MENET_HOME = the profile's menet folder."""
    from menet_qgis.processing import engine_client
    from menet_qgis.user_paths import managed_python
    assert "MENET_HOME" not in os.environ
    assert engine_client.worker_env(str(ENGINE_PYTHON))["MENET_HOME"] == str(profile_store.parent)
    managed = engine_client.worker_env(str(managed_python()))
    assert managed["MENET_HOME"] == str(profile_store.parent) and "PYTHONPATH" not in managed


def test_extract_with_model_empty_maps_with_the_model_installed_in_the_profile(processing, profile_store,
                                                                              untrained_path, tmp_path):
    """Issue 24: the model 'Install model' put into the profile's store is the one a real worker process
    (which has no QGIS to ask for the profile) maps with when MODEL is empty — not ~/.local/share's, not
    the plugin's own (trained) copy.  And the run leaves no unclosed file behind in QGIS."""
    from menet_qgis import model_store, resources
    import hashlib
    model_store.install_model(str(untrained_path), name=f"{resources.DEFAULT_MODEL_BASE}.pt",
                              sha256=hashlib.sha256(untrained_path.read_bytes()).hexdigest())
    src = write_s2(tmp_path / "in.tif", 64, 64)
    feedback = RecordingFeedback()
    with NoResourceWarnings():
        result = processing.run(ALG, {"INPUT": str(src), "OUTPUT": str(tmp_path / "p.tif"), "WINDOW_SIZE": 64,
                                      "OVERLAP": 32, "RUNTIME": 1}, feedback=feedback)  # runtime torch
    assert Path(result["OUTPUT"]).is_file()
    assert f"default model: menet_coasts_v2.pt installed in {profile_store} (the only form there)" in \
        feedback.text()
    assert any(level == "warning" and "UNTRAINED" in text for level, text in feedback.lines)  # ours, not the plugin's


def test_a_failed_job_and_the_probe_leave_no_unclosed_file(processing, tmp_path):
    from menet_qgis.processing import engine_client
    engine_client._GOOD_PYTHONS.clear()
    with NoResourceWarnings():
        assert engine_client.probe(str(ENGINE_PYTHON)) is None
        with pytest.raises(QgsProcessingException, match="not found"):
            engine_client.run_job("extract", {"input": str(tmp_path / "missing.tif"),
                                              "output": str(tmp_path / "p.tif")}, RecordingFeedback())


MODEL3 = ROOT / "resources" / "models" / "mangrove_mask.model3"


@pytest.mark.unit
def test_example_model_takes_onnx_and_pt(qgis_app):
    """The example graphical model's MODEL accepts both forms (it refused .onnx with QGIS's generic
    'Wrong or missing parameter value'), and stays optional (empty = the default model)."""
    from qgis.core import QgsProcessingModelAlgorithm
    model = QgsProcessingModelAlgorithm()
    assert model.fromFile(str(MODEL3))
    param = model.parameterDefinition("model")
    assert param.fileFilter().startswith("ME-Net models (*.onnx *.pt)") and param.extension() == ""
    for value in ("/data/menet_coasts_v2.onnx", "/data/menet_coasts_v2.pt", None, ""):
        assert param.checkValueIsAcceptable(value), value


@pytest.fixture
def served(tmp_path):
    """A loopback HTTP server for the files in tmp_path/served."""
    from helpers import serve_folder
    folder = tmp_path / "served"
    folder.mkdir()
    with serve_folder(folder) as url:
        yield folder, url


def test_qgis_process_installs_the_asset_and_the_example_model_maps_with_it(qgis_env, bundle, served, tmp_path):
    """The headless path of issue 24 with a fresh profile and no MENET_HOME: qgis_process installs the .onnx
    from a URL (SOURCE=...), and the example graphical model with model empty maps with it — the engine
    process found it in the profile's store."""
    import hashlib
    from helpers import qgis_process
    from menet_qgis.core.inference.runtimes import ensure_onnx
    folder, url = served
    exported = Path(ensure_onnx(bundle, "probability").path)  # cached beside the session's checkpoint
    asset = folder / "menet_coasts_v2.onnx"
    asset.symlink_to(exported)
    (folder / "menet_coasts_v2.onnx.sha256").write_text(
        f"{hashlib.sha256(exported.read_bytes()).hexdigest()}  menet_coasts_v2.onnx\n")
    profile = tmp_path / "profile"
    env = {k: v for k, v in qgis_env.items() if k != "MENET_HOME"}
    env.update(XDG_DATA_HOME=str(profile), QGIS_CUSTOM_CONFIG_PATH=str(profile), QGIS_OPTIONS_PATH=str(profile))
    enabled = qgis_process(["plugins", "enable", "menet_qgis"], env)
    assert enabled.returncode == 0, enabled.stdout + enabled.stderr
    store = profile / "profiles" / "default" / "menet_qgis" / "models"

    installed = qgis_process(["run", "menet:installmodel", "--", f"SOURCE={url}/menet_coasts_v2.onnx"], env)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert (store / "menet_coasts_v2.onnx").read_bytes() == exported.read_bytes()
    assert "matches, from menet_coasts_v2.onnx.sha256 beside the source" in installed.stdout
    assert f"model store {store}: 1 model" in installed.stdout

    src = write_s2(tmp_path / "in.tif", 64, 80)
    out = tmp_path / "mask.tif"
    proc = qgis_process(["--json", "run", str(MODEL3), "--", f"input={src}", f"mask:mangrove_mask={out}"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout
    assert f"default model: menet_coasts_v2.onnx installed in {store} (the ONNX asset" in log
    from helpers import read
    mask = read(out)[0]
    assert mask.shape == (64, 80) and set(np.unique(mask)) <= {0, 1}
