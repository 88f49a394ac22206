"""What the user-path tests (tests/test_user_path.py) need besides QGIS: a wheel cache, a loopback model
server, a clean user environment and the unpacked plugin for ``qgis_process``.

Nothing here imports QGIS or the plugin's engine, so the same helpers serve the desktop driver's test and the
headless ``qgis_process`` test.
"""
from __future__ import annotations

import fcntl
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from helpers import ROOT

REQUIREMENTS_DIR = ROOT / "menet_qgis" / "requirements"
#: Everything the user-path tests keep between runs (the wheel cache) and write per run (sessions, shots).
BUILD = ROOT / "build"
DIST = ROOT / "dist"
MODEL_BASE = "menet_coasts_v2"
#: The model asset 'make package' writes for users (ONNX: runs without torch); the .pt is for training.
ASSET_SUFFIXES = (".onnx", ".pt")
#: Environment variables of a developer's setup that a new user does not have (prefixes end in '_').
DEVELOPER_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "MENET_", "QGIS_PLUGINPATH",
                       "QGIS_CUSTOM_CONFIG_PATH", "QGIS_OPTIONS_PATH", "QGIS_PREFIX_PATH", "QT_QPA_PLATFORM",
                       "CONDA_PREFIX", "PIP_")


class WheelCacheError(RuntimeError):
    """The wheel folder could not be filled (first run without access to the package index)."""


# ------------------------------------------------------------------------------------------- wheel cache
def requirement_files(variant: str) -> List[Path]:
    """The variant's requirement file and those it includes with ``-r``, in reading order."""
    files, todo = [], [REQUIREMENTS_DIR / f"{variant}.txt"]
    while todo:
        path = todo.pop(0)
        files.append(path)
        for line in path.read_text().splitlines():
            if line.strip().startswith("-r "):
                todo.append(path.parent / line.strip()[3:].strip())
    return files


@contextmanager
def _locked(path: Path):
    """An exclusive lock file: two pytest processes never fill the same wheel folder at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def wheel_folder(variant: str = "cpu-light", python: str = sys.executable) -> Path:
    """build/wheels/<variant>-py<X.Y>: every wheel the variant needs for this Python, downloaded once.

    The folder is what a user of an offline machine carries over (``pip download -r <variant>.txt -d DIR``)
    and what *Install ME-Net dependencies* takes as WHEEL_FOLDER.  Filled with ``pip download`` from the
    package index on the first run; later runs (same requirement files, same Python) need no network.
    ``--only-binary``: an offline install must not build anything from source.
    """
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    folder = BUILD / "wheels" / f"{variant}-py{version}"
    key = hashlib.sha256(b"".join(p.read_bytes() for p in requirement_files(variant))).hexdigest()
    stamp = folder / ".requirements.sha256"
    with _locked(BUILD / "wheels" / ".lock"):
        if stamp.is_file() and stamp.read_text().strip() == key and any(folder.glob("*.whl")):
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        command = [python, "-m", "pip", "download", "--disable-pip-version-check", "--no-input", "--progress-bar",
                   "off", "--only-binary=:all:", "-r", str(REQUIREMENTS_DIR / f"{variant}.txt"), "-d", str(folder)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                              env={k: v for k, v in os.environ.items() if not k.startswith("PIP_")})
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
            raise WheelCacheError(f"could not fill the wheel cache {folder} (the first run needs the package "
                                  f"index; later runs are offline): {' '.join(command)}\n{tail}")
        stamp.write_text(key + "\n")
    return folder


# ------------------------------------------------------------------------------------------- the release files
def model_asset(dist: Path = DIST) -> Optional[Path]:
    """The default model 'make package' put beside the plugin ZIP for *Install model*: the .onnx, else the .pt."""
    for suffix in ASSET_SUFFIXES:
        path = dist / f"{MODEL_BASE}{suffix}"
        if path.is_file() and path.with_name(path.name + ".sha256").is_file():
            return path
    return None


def unzip_plugin(plugin_zip: Path, plugins_dir: Path) -> Path:
    """What QGIS's installer does with the ZIP, for qgis_process (which has no installer): unpack it into the
    profile's python/plugins folder."""
    plugins_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(plugin_zip) as archive:
        archive.extractall(plugins_dir)
    return plugins_dir / "menet_qgis"


# ------------------------------------------------------------------------------------------- loopback server
class ModelServer:
    """An HTTP server on 127.0.0.1 (a free port, its own thread) serving only the files it was given, and
    remembering every request (method, path, status) so a test can tell what was fetched.

    ``http.server`` is the standard library's server; it needs no network beyond loopback.
    """

    def __init__(self, files: Dict[str, Path]):
        self.files = {name: Path(path) for name, path in files.items()}
        self.requests: List[tuple] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802
                self._serve(body=False)

            def do_GET(self):  # noqa: N802
                self._serve(body=True)

            def _serve(self, body: bool):
                name = self.path.split("?", 1)[0].lstrip("/")
                path = server.files.get(name)
                if path is None:
                    server.requests.append((self.command, self.path, 404))
                    self.send_error(404)
                    return
                server.requests.append((self.command, self.path, 200))
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(path.stat().st_size))
                self.end_headers()
                if body:
                    with open(path, "rb") as handle:
                        while chunk := handle.read(1 << 20):
                            self.wfile.write(chunk)

            def log_message(self, *args):  # quiet: the requests list is the log
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="model-server", daemon=True)

    def url(self, name: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def fetched(self, name: str) -> bool:
        return any(m == "GET" and p.lstrip("/") == name and s == 200 for m, p, s in self.requests)

    def __enter__(self) -> "ModelServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@contextmanager
def serve_model(asset: Path) -> Iterator[ModelServer]:
    """The model and its ``.sha256`` over loopback HTTP, as a release page would serve them."""
    sidecar = asset.with_name(asset.name + ".sha256")
    with ModelServer({asset.name: asset, sidecar.name: sidecar}) as server:
        yield server


# ------------------------------------------------------------------------------------------- a new user's environment
def _is_virtualenv_bin(folder: str) -> bool:
    return (Path(folder).parent / "pyvenv.cfg").is_file()


def user_environment(base: Optional[Dict[str, str]] = None, **extra: str) -> Dict[str, str]:
    """The environment of a user who installed QGIS and nothing else for ME-Net: no PYTHONPATH, no MENET_*
    variables, no QGIS plugin path into a checkout, no virtual environment's bin/ on PATH (its ``python3``
    would be the engine's last-resort candidate).  Loopback never goes through a proxy.  ``extra`` is set last.
    """
    base = dict(os.environ if base is None else base)
    env = {k: v for k, v in base.items() if not any(k == d or (d.endswith("_") and k.startswith(d))
                                                     for d in DEVELOPER_VARIABLES)}
    env["PATH"] = os.pathsep.join(p for p in base.get("PATH", "").split(os.pathsep)
                                  if p and not _is_virtualenv_bin(p))
    no_proxy = [h for h in (base.get("NO_PROXY") or base.get("no_proxy") or "").split(",") if h]
    env["NO_PROXY"] = env["no_proxy"] = ",".join(no_proxy + ["127.0.0.1", "localhost"])
    env.update(extra)
    return env


def fresh_runtime_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # Qt refuses a runtime folder others can read
    return path
