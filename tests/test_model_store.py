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

from menet_qgis import model_store, resources

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

    def full(self, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(model_store.tempfile._TemporaryFileWrapper, "write", full, raising=False)
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
    assert resources.default_model_path() == shipped
    src = tmp_path / resources.DEFAULT_MODEL_NAME
    src.write_bytes(GOOD)
    model_store.install_model(str(src), sha256=GOOD_SHA)
    assert resources.default_model_path() == tmp_path / "home" / "models" / resources.DEFAULT_MODEL_NAME


def test_the_default_model_verifies_against_the_hash_the_plugin_ships(tmp_path):
    known = model_store.known_sha256(resources.DEFAULT_MODEL_NAME)
    assert known == (resources.resources_dir() / "models" / "menet_coasts_v2.pt.sha256").read_text().split()[0]
    installed = model_store.install_model(str(resources.shipped_model_path()), models_dir=tmp_path)
    assert installed.sha256 == known


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
    src = tmp_path / resources.DEFAULT_MODEL_NAME
    src.write_bytes(GOOD)
    result = processing.run("menet:installmodel", {"SOURCE": str(src), "SHA256": GOOD_SHA})
    target = tmp_path / "home" / "models" / resources.DEFAULT_MODEL_NAME
    assert result["OUTPUT"] == str(target) and target.read_bytes() == GOOD
    assert resources.default_model_path() == target
    with pytest.raises(QgsProcessingException, match="sha256 mismatch"):
        processing.run("menet:installmodel", {"SOURCE": str(src), "SHA256": OTHER_SHA, "NAME": "second.pt"})
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name, target.name + ".sha256"]


def test_an_older_installed_default_model_is_named_when_it_runs(untrained_path, tmp_path):
    """The installed copy of the default model comes first; one from an earlier release says so."""
    import subprocess
    import sys
    from helpers import ROOT, write_s2
    home = tmp_path / "home"
    env = dict(os.environ, MENET_HOME=str(home))
    old_sha = hashlib.sha256(untrained_path.read_bytes()).hexdigest()
    model_store.install_model(str(untrained_path), name=resources.DEFAULT_MODEL_NAME, sha256=old_sha,
                              models_dir=home / "models")
    raster = write_s2(tmp_path / "small.tif", 64, 64)
    proc = subprocess.run([sys.executable, "-m", "menet_qgis", "predict", str(raster), "--out-dir", str(tmp_path / "out"),
                           "--device", "cpu", "--runtime", "torch"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{resources.DEFAULT_MODEL_NAME} in {home / 'models'} is not the version this plugin ships" in proc.stderr
    assert f"sha256 {old_sha[:12]}" in proc.stderr
    assert model_store.outdated_copy_note(resources.shipped_model_path()) is None   # the shipped one is current
