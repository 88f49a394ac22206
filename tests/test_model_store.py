"""Installing a model: a loopback HTTP server serves good, corrupted, truncated, missing and broken downloads.

Every failure must name the problem in one line, leave no partial file in the model folder, and keep the
model installed before byte-identical.
"""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from menet_qgis import model_records, model_store, resources

GOOD = os.urandom(3 * model_store.CHUNK + 12345)
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
OTHER = os.urandom(200_000)           # what the "previous" install holds
OTHER_SHA = hashlib.sha256(OTHER).hexdigest()


class Handler(BaseHTTPRequestHandler):
    timeout = 10  # a stuck client cannot hold the server thread for ever

    def log_message(self, *args):
        pass

    def _head(self, length, status=200):
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def do_GET(self):  # noqa: N802
        if self.path == "/good/model.pt":
            self._head(len(GOOD))
            self.wfile.write(GOOD)
        elif self.path == "/good/model.pt.sha256":
            body = f"{GOOD_SHA}  model.pt\n".encode()
            self._head(len(body))
            self.wfile.write(body)
        elif self.path == "/corrupt/model.pt":          # right size, one byte flipped
            body = bytearray(GOOD)
            body[1000] ^= 0xFF
            self._head(len(body))
            self.wfile.write(bytes(body))
        elif self.path == "/corrupt/model.pt.sha256":
            body = GOOD_SHA.encode()
            self._head(len(body))
            self.wfile.write(body)
        elif self.path == "/truncated/model.pt":        # promises the whole model, sends half, closes cleanly
            self._head(len(GOOD))
            self.wfile.write(GOOD[: len(GOOD) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/gone/model.pt":             # sends a part, then the server vanishes (TCP reset)
            self._head(len(GOOD))
            self.wfile.write(GOOD[: model_store.CHUNK + 7])
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        elif self.path == "/stalled/model.pt":          # sends a part, then nothing for longer than the timeout
            self._head(len(GOOD))
            self.wfile.write(GOOD[:1000])
            self.wfile.flush()
            time.sleep(3)
        else:
            self.send_error(404, "Not Found")


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the broken transfers break connections on purpose


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


@pytest.fixture
def models(tmp_path, monkeypatch):
    """An isolated model folder already holding a previous model.pt."""
    monkeypatch.setenv("MENET_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / "models"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(OTHER)
    return folder


def assert_untouched(folder: Path):
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt"], "a partial file was left behind"
    assert (folder / "model.pt").read_bytes() == OTHER


def test_good_download_replaces_the_model_and_records_its_hash(server, models):
    installed = model_store.install_model(f"{server}/good/model.pt", timeout=5)
    assert installed.path == models / "model.pt"
    assert installed.sha256 == GOOD_SHA and installed.size == len(GOOD)
    assert (models / "model.pt").read_bytes() == GOOD
    assert (models / "model.pt.sha256").read_text().split()[0] == GOOD_SHA
    assert not [p for p in models.iterdir() if ".partial" in p.name]


@pytest.mark.parametrize("path, sha, message", [
    ("/corrupt/model.pt", None, f"sha256 mismatch for model.pt: expected {GOOD_SHA}"),
    ("/good/model.pt", "0" * 64, "sha256 mismatch for model.pt: expected " + "0" * 64),
    ("/truncated/model.pt", GOOD_SHA, "truncated download from "),
    ("/missing/model.pt", GOOD_SHA, "download failed: HTTP 404 Not Found for "),
    ("/gone/model.pt", GOOD_SHA, "the server went away during the download from "),
], ids=["wrong-hash-from-server", "wrong-hash-given", "truncated", "404", "server-gone"])
def test_failed_downloads_leave_the_previous_model(server, models, path, sha, message):
    with pytest.raises(model_store.ModelStoreError) as err:
        model_store.install_model(server + path, sha256=sha, timeout=5)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert_untouched(models)


def test_stalled_download_times_out(server, models):
    started = time.monotonic()
    with pytest.raises(model_store.ModelStoreError, match=r"stalled: no data for 1 s; nothing was installed"):
        model_store.install_model(f"{server}/stalled/model.pt", sha256=GOOD_SHA, timeout=1)
    assert time.monotonic() - started < 3
    assert_untouched(models)


def test_cancel_during_download(server, models):
    class CancelAfterFirstChunk:
        def __init__(self):
            self.calls = 0

        def info(self, message):
            pass

        def progress(self, percent):
            pass

        def cancelled(self):
            self.calls += 1
            return self.calls > 1
    with pytest.raises(model_store.ModelStoreError, match="cancelled: no model was installed"):
        model_store.install_model(f"{server}/good/model.pt", timeout=5, reporter=CancelAfterFirstChunk())
    assert_untouched(models)


def test_truncated_download_says_how_much_arrived(server, models):
    with pytest.raises(model_store.ModelStoreError, match=rf"got {len(GOOD) // 2} of {len(GOOD)} bytes"):
        model_store.install_model(f"{server}/truncated/model.pt", sha256=GOOD_SHA, timeout=5)


def test_no_hash_anywhere_is_refused_before_downloading(server, models):
    with pytest.raises(model_store.ModelStoreError, match="no SHA256 given and no model.pt.sha256"):
        model_store.install_model(f"{server}/missing/model.pt", timeout=5)
    assert_untouched(models)


def test_not_enough_space_is_refused_before_writing(server, models, monkeypatch):
    class Usage:
        free = 1000
    monkeypatch.setattr(model_store.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(model_store.ModelStoreError, match=r"not enough free space in .*: the model needs 3 MB"):
        model_store.install_model(f"{server}/good/model.pt", timeout=5)
    assert_untouched(models)


def test_no_space_while_writing_is_one_line(tmp_path, models, monkeypatch):
    src = tmp_path / "model.pt"
    src.write_bytes(GOOD)

    copy = model_store._copy_hashing

    def full(data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(model_store, "_copy_hashing", lambda read, _write, *rest: copy(read, full, *rest))
    with pytest.raises(model_store.ModelStoreError, match=r"^no space left in .* while writing model.pt"):
        model_store.install_model(str(src), sha256=GOOD_SHA)
    assert_untouched(models)


def test_local_file_with_a_sha256_beside_it(tmp_path, models):
    src = tmp_path / "dl" / "model.pt"
    src.parent.mkdir()
    src.write_bytes(GOOD)
    (tmp_path / "dl" / "model.pt.sha256").write_text(f"{GOOD_SHA}  model.pt\n")
    installed = model_store.install_model(str(src))
    assert installed.path.read_bytes() == GOOD
    (tmp_path / "dl" / "model.pt.sha256").write_text(f"{OTHER_SHA}  model.pt\n")
    with pytest.raises(model_store.ModelStoreError, match="sha256 mismatch"):
        model_store.install_model(str(src))
    assert installed.path.read_bytes() == GOOD


def test_names_and_sources_are_checked(tmp_path, models):
    with pytest.raises(model_store.ModelStoreError, match="no public model release yet"):
        model_store.install_model("")
    with pytest.raises(model_store.ModelStoreError, match="does not exist"):
        model_store.install_model(str(tmp_path / "nope.pt"), sha256=GOOD_SHA)
    src = tmp_path / "weights.bin"
    src.write_bytes(GOOD)
    with pytest.raises(model_store.ModelStoreError, match="must be a plain file name ending in .pt"):
        model_store.install_model(str(src), sha256=GOOD_SHA)
    with pytest.raises(model_store.ModelStoreError, match="must be a plain file name"):
        model_store.install_model(str(src), name="../escape.pt", sha256=GOOD_SHA)
    with pytest.raises(model_store.ModelStoreError, match="is not a sha256"):
        model_store.install_model(str(src), name="x.pt", sha256="abc")
    assert_untouched(models)


def test_default_model_resolves_installed_then_shipped(tmp_path, monkeypatch):
    monkeypatch.setenv("MENET_HOME", str(tmp_path / "home"))
    shipped = resources.shipped_model_path()
    assert shipped.is_file(), "the source checkout keeps resources/models for make run and the CLI"
    assert model_store.default_model_path() == shipped
    src = tmp_path / resources.DEFAULT_CHECKPOINT_NAME
    src.write_bytes(GOOD)
    model_store.install_model(str(src), sha256=GOOD_SHA)
    assert model_store.default_model_path() == tmp_path / "home" / "models" / resources.DEFAULT_CHECKPOINT_NAME


def test_the_default_model_verifies_against_the_hash_the_plugin_ships(tmp_path):
    known = model_store.known_sha256(resources.DEFAULT_CHECKPOINT_NAME)
    assert known == (resources.resources_dir() / "models" / "menet_coasts_v2.pt.sha256").read_text().split()[0]
    installed = model_store.install_model(str(resources.shipped_model_path()), models_dir=tmp_path)
    assert installed.sha256 == known


@pytest.mark.integration
def test_cli_install_model_errors_are_one_line(tmp_path, monkeypatch):
    import subprocess
    import sys
    from helpers import ROOT
    src = tmp_path / "model.pt"
    src.write_bytes(GOOD)
    env = dict(os.environ, MENET_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-m", "menet_qgis", "install-model", str(src), "--sha256", OTHER_SHA],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("menet_qgis: error: sha256 mismatch for model.pt")
    assert not (tmp_path / "home" / "models" / "model.pt").exists()
    proc = subprocess.run([sys.executable, "-m", "menet_qgis", "install-model", str(src), "--sha256", GOOD_SHA],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "home" / "models" / "model.pt").read_bytes() == GOOD


def test_install_model_through_processing(menet_provider, tmp_path, monkeypatch):
    import processing
    from qgis.core import QgsProcessingException
    monkeypatch.setenv("MENET_HOME", str(tmp_path / "home"))
    src = tmp_path / resources.DEFAULT_CHECKPOINT_NAME
    src.write_bytes(GOOD)
    result = processing.run("menet:installmodel", {"SOURCE": str(src), "SHA256": GOOD_SHA})
    target = tmp_path / "home" / "models" / resources.DEFAULT_CHECKPOINT_NAME
    assert result["OUTPUT"] == str(target) and target.read_bytes() == GOOD
    assert model_store.default_model_path() == target
    index = (target.parent / model_store.INDEX_NAME).read_bytes()
    with pytest.raises(QgsProcessingException, match="sha256 mismatch"):
        processing.run("menet:installmodel", {"SOURCE": str(src), "SHA256": OTHER_SHA, "NAME": "second.pt"})
    assert sorted(p.name for p in target.parent.iterdir()) == \
        [model_store.INDEX_NAME, target.name, target.name + ".sha256"]
    assert (target.parent / model_store.INDEX_NAME).read_bytes() == index


@pytest.mark.integration
def test_an_older_installed_default_model_is_named_when_it_runs(untrained_path, tmp_path):
    """The installed copy of the default model comes first; one from an earlier release says so."""
    import subprocess
    import sys
    from helpers import ROOT, write_s2
    home = tmp_path / "home"
    env = dict(os.environ, MENET_HOME=str(home))
    old_sha = hashlib.sha256(untrained_path.read_bytes()).hexdigest()
    model_store.install_model(str(untrained_path), name=resources.DEFAULT_CHECKPOINT_NAME, sha256=old_sha,
                              models_dir=home / "models")
    raster = write_s2(tmp_path / "small.tif", 64, 64)
    proc = subprocess.run([sys.executable, "-m", "menet_qgis", "predict", str(raster), "--out-dir", str(tmp_path / "out"),
                           "--device", "cpu", "--runtime", "torch"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{resources.DEFAULT_CHECKPOINT_NAME} in {home / 'models'} is not the version this plugin ships" in proc.stderr
    assert f"sha256 {old_sha[:12]}" in proc.stderr
    assert model_store.outdated_copy_note(resources.shipped_model_path()) is None   # the shipped one is current


# --- the index and the default-model rule (issue 24) -------------------------------------------------
BASE = resources.DEFAULT_MODEL_BASE


@pytest.fixture(scope="module")
def record_only_onnx(bundle, tmp_path_factory) -> Path:
    """A tiny ONNX file (one Identity node) carrying the engine's own record of the untrained model: what
    the store reads, without the half-minute export of the real network."""
    import json
    import onnx
    from onnx import TensorProto, helper
    from menet_qgis.core.inference import onnx_model
    record = onnx_model.model_record(bundle, ["probability"], "0" * 64)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["probability"])], "record_only",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("probability", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {onnx_model.METADATA_KEY: json.dumps(record)})
    path = tmp_path_factory.mktemp("onnx") / "record_only.onnx"
    onnx.save(model, str(path))
    return path


def sha_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def blocked_env(tmp_path, *modules, **extra) -> dict:
    """The environment of a Python in which ``modules`` (e.g. torch) fail to import: packages of those
    names that raise ImportError, first on PYTHONPATH (works wherever the real ones are installed)."""
    for name in modules:
        blocker = tmp_path / "blocked" / name
        blocker.mkdir(parents=True, exist_ok=True)
        (blocker / "__init__.py").write_text(f"raise ImportError('{name} blocked for this test')\n")
    path = [str(tmp_path / "blocked"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), **extra)


def test_the_stores_constants_are_the_engines():
    """model_store repeats three format strings so it can read models with the standard library alone."""
    from menet_qgis.core.model import checkpoint
    from menet_qgis.core.inference import onnx_model
    assert model_records.CHECKPOINT_FORMAT == checkpoint.FORMAT
    assert model_records.ONNX_FORMAT == onnx_model.ONNX_FORMAT
    assert model_records.ONNX_METADATA_KEY == onnx_model.METADATA_KEY


@pytest.mark.integration
def test_records_read_without_torch_match_what_the_engine_reads(untrained_path, record_only_onnx, bundle,
                                                                tmp_path):
    """The index (and runtimes.read_onnx_model) read a .pt's and an .onnx's record with the standard library:
    the same record torch (core/model/checkpoint.py) and ONNX Runtime's own metadata reader find in those files."""
    import json
    import subprocess
    import sys
    from helpers import ROOT
    from menet_qgis.core.model import checkpoint
    from menet_qgis.core.inference import runtimes
    by_torch = {k: v for k, v in checkpoint.read_record(untrained_path).items() if k != "state_dict"}
    assert model_records.read_model_record(untrained_path) == json.loads(json.dumps(by_torch))
    import onnxruntime as ort
    session = ort.InferenceSession(str(record_only_onnx), providers=["CPUExecutionProvider"])
    assert model_records.onnx_record(record_only_onnx) == json.loads(
        session.get_modelmeta().custom_metadata_map[model_records.ONNX_METADATA_KEY])
    by_runtime = runtimes.read_onnx_model(record_only_onnx)
    record = model_records.read_model_record(record_only_onnx)
    assert runtimes.ch.PCABasis.from_record(record["pca"]).to_record() == by_runtime.pca.to_record()
    assert record["recipe"] == by_runtime.recipe.record() and record["window_size"] == by_runtime.window_size
    assert model_store.describe_record(record)["threshold"] == by_runtime.threshold == bundle.threshold
    # ... and in a Python where torch, onnxruntime and openvino cannot be imported at all
    code = ("import json, sys; from menet_qgis import model_store as m; "
            "print(json.dumps([m.describe_record(m.read_model_record(p)) for p in sys.argv[1:]]))")
    proc = subprocess.run([sys.executable, "-c", code, str(untrained_path), str(record_only_onnx)], cwd=ROOT,
                          env=blocked_env(tmp_path, "torch", "onnxruntime", "openvino", "numpy"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    described = json.loads(proc.stdout)
    assert described[0] == described[1] == {"recipe": "v2 (B2, B3, B4, B8, B11)", "threshold": 0.5,
                                             "trained": False, "architecture": "menet-resnet101 v1"}


def test_not_a_model_is_named(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 100)
    with pytest.raises(model_records.ModelRecordError, match="junk.onnx is not an ONNX model"):
        model_records.read_model_record(junk)
    (tmp_path / "junk.pt").write_bytes(GOOD)
    with pytest.raises(model_records.ModelRecordError, match="junk.pt is not a readable torch checkpoint"):
        model_records.read_model_record(tmp_path / "junk.pt")


def test_a_checkpoint_holding_code_is_not_unpickled(tmp_path):
    """The torch-free reader refuses any global but those torch.save writes for tensors: nothing runs."""
    import pickle
    import zipfile
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"format": model_records.CHECKPOINT_FORMAT, "x": Exploit()}))
    with pytest.raises(model_records.ModelRecordError, match="unexpected object"):
        model_records.read_model_record(path)
    assert not marker.exists()


@pytest.mark.integration
def test_index_install_list_reinstall(untrained_path, record_only_onnx, tmp_path, monkeypatch):
    """Installing writes the model's entry; `install-model --list` shows it in a Python without torch;
    installing the same name again replaces its entry; the index is JSON any tool can read."""
    import json
    import subprocess
    import sys
    from helpers import ROOT
    home = tmp_path / "home"
    monkeypatch.setenv("MENET_HOME", str(home))
    store = home / "models"
    first = model_store.install_model(str(untrained_path), name=f"{BASE}.pt", sha256=sha_of(untrained_path))
    entry = json.loads((store / model_store.INDEX_NAME).read_text())["models"][f"{BASE}.pt"]
    assert entry == first.entry
    assert {k: entry[k] for k in ("name", "format", "version", "recipe", "threshold", "trained", "sha256",
                                  "size", "source")} == {
        "name": f"{BASE}.pt", "format": "pt", "version": "v2", "recipe": "v2 (B2, B3, B4, B8, B11)",
        "threshold": 0.5, "trained": False, "sha256": sha_of(untrained_path),
        "size": untrained_path.stat().st_size, "source": str(untrained_path)}
    assert entry["installed_at"].endswith("+00:00") and first.sha256_from == "from the given SHA256"
    onnx_copy = tmp_path / "dl" / f"{BASE}.onnx"
    onnx_copy.parent.mkdir()
    onnx_copy.write_bytes(record_only_onnx.read_bytes())
    (tmp_path / "dl" / f"{BASE}.onnx.sha256").write_text(f"{sha_of(onnx_copy)}  {BASE}.onnx\n")
    second = model_store.install_model(str(onnx_copy))
    assert second.sha256_from == f"from {BASE}.onnx.sha256 beside the source"
    proc = subprocess.run([sys.executable, "-m", "menet_qgis", "install-model", "--list"], cwd=ROOT,
                          env=blocked_env(tmp_path, "torch"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"model store {store}: 2 models"
    assert lines[1].startswith(f"  {BASE}.onnx  v2  recipe v2 (B2, B3, B4, B8, B11)  threshold 0.5  UNTRAINED")
    assert lines[2].startswith(f"  {BASE}.pt  v2  recipe v2 (B2, B3, B4, B8, B11)  threshold 0.5  UNTRAINED")
    assert f"from {untrained_path}" in lines[2]
    assert lines[-1] == f"default model here (this Python, runtime auto): {BASE}.onnx installed in {store} " \
                        "(the ONNX asset: PyTorch is not installed)"
    # the same name again, other bytes: one entry, the new one
    other = tmp_path / "other.pt"
    other.write_bytes(GOOD)
    model_store.install_model(str(other), name=f"{BASE}.pt", sha256=GOOD_SHA)
    index = model_store.read_index(store)
    assert sorted(index) == [f"{BASE}.onnx", f"{BASE}.pt"]
    assert index[f"{BASE}.pt"]["sha256"] == GOOD_SHA and index[f"{BASE}.pt"]["recipe"] is None
    assert "no ME-Net record could be read" in index[f"{BASE}.pt"]["record_note"]
    assert index[f"{BASE}.onnx"] == second.entry


def test_failed_installs_leave_the_index_byte_identical(server, untrained_path, tmp_path):
    store = tmp_path / "models"
    model_store.install_model(str(untrained_path), sha256=sha_of(untrained_path), models_dir=store)
    index = (store / model_store.INDEX_NAME).read_bytes()
    before = sorted(p.name for p in store.iterdir())
    for source, sha in ((str(untrained_path), "0" * 64), (f"{server}/corrupt/model.pt", None),
                        (f"{server}/truncated/model.pt", GOOD_SHA), (f"{server}/missing/model.pt", GOOD_SHA)):
        with pytest.raises(model_store.ModelStoreError):
            model_store.install_model(source, sha256=sha, models_dir=store, timeout=5)
        assert (store / model_store.INDEX_NAME).read_bytes() == index
        assert sorted(p.name for p in store.iterdir()) == before


def test_a_model_installed_before_the_index_is_listed_and_used(tmp_path):
    """A store from a plugin version without the index (issue 24's user): the model is still found."""
    store = tmp_path / "models"
    store.mkdir()
    (store / f"{BASE}.pt").write_bytes(GOOD)
    (store / f"{BASE}.pt.sha256").write_text(f"{GOOD_SHA}  {BASE}.pt\n")
    [entry] = model_store.installed_models(store)
    assert entry["sha256"] == GOOD_SHA and "not in the index" in entry["record_note"]
    assert model_store.find_default_model(models_dir=store).path == store / f"{BASE}.pt"


def install_both_forms(store, untrained_path, record_only_onnx):
    model_store.install_model(str(untrained_path), name=f"{BASE}.pt", sha256=sha_of(untrained_path),
                              models_dir=store)
    model_store.install_model(str(record_only_onnx), name=f"{BASE}.onnx", sha256=sha_of(record_only_onnx),
                              models_dir=store)


RESOLVE = ("import sys; from menet_qgis import jobs\n"
           "for runtime, device in (a.split('/') for a in sys.argv[1:]):\n"
           "    print(jobs.resolve_model(None, runtime, device).name)")


@pytest.mark.integration
@pytest.mark.parametrize("blocked", [False, True], ids=["with-torch", "torch-blocked"])
def test_default_rule_picks_the_form_the_engine_runs(untrained_path, record_only_onnx, tmp_path, blocked):
    """Both forms installed: the .onnx unless the engine runs torch (runtime torch or the CUDA device);
    the same answers in a Python whose torch cannot be imported (no CUDA GPU here: see the next test)."""
    import subprocess
    import sys
    from helpers import ROOT
    home = tmp_path / "home"
    install_both_forms(home / "models", untrained_path, record_only_onnx)
    env = blocked_env(tmp_path, "torch", MENET_HOME=str(home)) if blocked else dict(os.environ, MENET_HOME=str(home))
    cases = {"auto/auto": f"{BASE}.onnx", "auto/cpu": f"{BASE}.onnx", "onnxruntime/auto": f"{BASE}.onnx",
             "torch/auto": f"{BASE}.pt", "auto/cuda": f"{BASE}.pt"}
    proc = subprocess.run([sys.executable, "-c", RESOLVE, *cases], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == list(cases.values())
    why = model_store.engine_runs_torch("auto", "auto")[1]
    assert why == "no CUDA GPU visible to torch"  # this machine; the blocked Python says so too:
    proc = subprocess.run([sys.executable, "-c", "from menet_qgis import model_store as m; "
                           "print(m.find_default_model().why)"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == f"{BASE}.onnx installed in {home / 'models'} (the ONNX asset: " + \
        ("PyTorch is not installed)" if blocked else "no CUDA GPU visible to torch)")


def test_default_rule_on_a_cuda_gpu_takes_the_checkpoint(untrained_path, record_only_onnx, tmp_path, monkeypatch):
    """Where torch sees a CUDA GPU the .pt runs there (bf16 autocast); the ONNX runners are CPU-only.
    This machine has no GPU, so torch's answer is replaced: what is tested is the rule's branch."""
    from menet_qgis.core.inference import runtimes
    store = tmp_path / "models"
    install_both_forms(store, untrained_path, record_only_onnx)
    monkeypatch.setattr(runtimes, "torch_sees_cuda", lambda: True)
    found = model_store.find_default_model(models_dir=store)
    assert found.path == store / f"{BASE}.pt"
    assert found.why == f"{BASE}.pt installed in {store} (the PyTorch checkpoint: torch sees a CUDA GPU)"
    assert model_store.find_default_model("auto", "cpu", models_dir=store).path == store / f"{BASE}.onnx"


def test_installed_copies_come_before_the_plugins_and_a_form_that_runs_before_either(untrained_path,
                                                                                      record_only_onnx, tmp_path):
    shipped = resources.shipped_model_path(f"{BASE}.pt")
    assert shipped.is_file(), "the source checkout keeps resources/models/menet_coasts_v2.pt"
    store = tmp_path / "models"
    assert model_store.find_default_model(models_dir=store).path == shipped
    model_store.install_model(str(untrained_path), name=f"{BASE}.pt", sha256=sha_of(untrained_path),
                              models_dir=store)
    assert model_store.find_default_model(models_dir=store).path == store / f"{BASE}.pt"
    model_store.install_model(str(record_only_onnx), name=f"{BASE}.onnx", sha256=sha_of(record_only_onnx),
                              models_dir=store)
    assert model_store.find_default_model("torch", models_dir=store).path == store / f"{BASE}.pt"
    assert model_store.find_default_model("auto", "cpu", models_dir=store).path == store / f"{BASE}.onnx"


@pytest.mark.integration
def test_no_default_model_says_install_it(tmp_path, monkeypatch):
    """Nothing in the store nor in the plugin (the lean ZIP): the error says how to install the asset."""
    import subprocess
    import sys
    from helpers import ROOT
    monkeypatch.setenv("MENET_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(resources, "resources_dir", lambda: tmp_path / "plugin_resources")
    from menet_qgis import jobs
    with pytest.raises(ValueError) as err:
        jobs.resolve_model(None)
    text = str(err.value)
    assert text == (f"no model given and no default model installed (looked for {BASE}.onnx and .pt in "
                    f"{tmp_path / 'home' / 'models'} and {tmp_path / 'plugin_resources' / 'models'}): install it "
                    f"with the 'Install model' algorithm (menet:installmodel) or `python -m menet_qgis "
                    f"install-model dist/{BASE}.onnx`, or give a model")
    assert "train" not in text.lower()
    # the CLI says it in one line, before reading any input
    proc = subprocess.run([sys.executable, "-c", "import sys; from menet_qgis import cli, resources; "
                           f"resources.resources_dir = lambda: __import__('pathlib').Path({str(tmp_path)!r}); "
                           "sys.exit(cli.main(sys.argv[1:]))", "predict", __file__, "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=dict(os.environ, MENET_HOME=str(tmp_path / "home")), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("menet_qgis: error: no model given and no default "
                                                           "model installed")
    assert "install-model dist/menet_coasts_v2.onnx" in proc.stderr


def test_install_model_source_takes_a_file_or_a_url(menet_provider, server, tmp_path, monkeypatch):
    """SOURCE is a file parameter with a model filter (the dialog's picker) that still accepts a typed URL;
    the log says where the expected hash came from and ends with the store's index."""
    import processing
    from qgis.core import QgsApplication, QgsProcessingContext
    from test_worker import RecordingFeedback
    monkeypatch.setenv("MENET_HOME", str(tmp_path / "home"))
    alg = QgsApplication.processingRegistry().algorithmById("menet:installmodel")
    source = alg.parameterDefinition("SOURCE")
    assert source.type() == "file" and source.fileFilter().startswith("ME-Net models (*.onnx *.pt)")
    for value in (f"{server}/good/model.pt", "https://example.org/download?id=3", "/data/menet_coasts_v2.onnx"):
        assert source.checkValueIsAcceptable(value), value
    feedback = RecordingFeedback()
    result = processing.run("menet:installmodel", {"SOURCE": f"{server}/good/model.pt"}, feedback=feedback)
    assert Path(result["OUTPUT"]).read_bytes() == GOOD
    log = feedback.text()
    assert f"sha256 {GOOD_SHA} matches, from model.pt.sha256 beside the source ({server}/good/model.pt.sha256)" in log
    store = tmp_path / "home" / "models"
    assert f"model store {store}: 1 model" in log and f"from {server}/good/model.pt" in log
    feedback = RecordingFeedback()
    processing.run("menet:installmodel", {"SOURCE": f"{server}/good/model.pt", "SHA256": GOOD_SHA,
                                          "NAME": "copy.pt"}, feedback=feedback)
    assert "matches, from the given SHA256" in feedback.text()
    assert f"model store {store}: 2 models" in feedback.text()
    context = QgsProcessingContext()
    ok, _ = alg.checkParameterValues({"SOURCE": f"{server}/no-suffix"}, context)
    assert ok


def test_export_channels_reads_either_form_and_defaults_to_the_onnx(untrained_path, record_only_onnx, tmp_path,
                                                                    monkeypatch):
    """Export channels needs only the model's PCA and recipe: with MODEL empty it takes the .onnx (no
    torch needed), and both forms of one model give the same channels."""
    from helpers import read, write_s2
    from menet_qgis import jobs
    from menet_qgis.core.reporting import Reporter

    class Lines(Reporter):
        def __init__(self):
            self.lines = []

        def info(self, message):
            self.lines.append(message)
    home = tmp_path / "home"
    monkeypatch.setenv("MENET_HOME", str(home))
    install_both_forms(home / "models", untrained_path, record_only_onnx)
    src = write_s2(tmp_path / "in.tif", 40, 30)
    reporter = Lines()
    jobs.export_channels({"input": str(src), "output": str(tmp_path / "from_onnx.tif")}, reporter)
    assert reporter.lines[0] == f"default model: {BASE}.onnx installed in {home / 'models'} (the ONNX asset: " \
                                "the CPU was asked for)"
    jobs.export_channels({"input": str(src), "output": str(tmp_path / "from_pt.tif"),
                          "model": str(untrained_path)}, Lines())
    assert read(tmp_path / "from_onnx.tif").shape[0] == 11
    assert (read(tmp_path / "from_onnx.tif") == read(tmp_path / "from_pt.tif")).all()


@pytest.mark.integration
def test_install_model_dialog_has_a_picker_and_takes_a_typed_url(tmp_path):
    """QGIS's own Processing dialog (a fresh GUI QgsApplication: the suite's has no GUI): SOURCE is a file
    widget filtered to models, with its browse button, and a URL typed into it reaches the algorithm."""
    from helpers import run_in_fresh_qgis
    url = "http://127.0.0.1:8765/download?id=3"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", XDG_DATA_HOME=str(tmp_path / "profile"),
               QGIS_CUSTOM_CONFIG_PATH=str(tmp_path / "profile"))
    report = run_in_fresh_qgis(tmp_path / "dialog.py", f"""\
        from qgis.core import QgsProcessingContext
        from processing.gui.AlgorithmDialog import AlgorithmDialog
        from qgis.gui import QgsFileWidget
        from qgis.PyQt.QtTest import QTest
        from qgis.PyQt.QtWidgets import QLineEdit, QToolButton
        dialog = AlgorithmDialog(QgsApplication.processingRegistry().createAlgorithmById("menet:installmodel"))
        dialog.show()
        [picker] = dialog.findChildren(QgsFileWidget)
        QTest.keyClicks(picker.findChild(QLineEdit), {url!r})
        typed = dialog.createProcessingParameters()
        ok, _ = dialog.algorithm().checkParameterValues(typed, QgsProcessingContext())
        print(json.dumps({{"filter": picker.filter(), "buttons": [b.text() for b in picker.findChildren(QToolButton)],
                          "source": typed["SOURCE"], "accepted": ok}}))
        dialog.close()
        """, env, gui=True, timeout=300)
    assert "…" in report.pop("buttons")  # the browse button
    assert report == {"filter": "ME-Net models (*.onnx *.pt);;All files (*)", "source": url, "accepted": True}
