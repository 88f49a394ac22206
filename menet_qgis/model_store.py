"""Installs ME-Net models into the user's model folder ("Install model"), verified by sha256.

QGIS-free and stdlib-only.  A model comes from a URL (streamed with urllib) or a
local file; it is written to a hidden temporary file beside the target while its
sha256 is computed, checked against the expected size and hash, and only then
renamed over the target (``os.replace``, atomic on one filesystem).  Any failure
removes the temporary file, so the folder never holds a half-written model and a
model installed before stays byte-identical.

The project has no public release of its model yet, so :func:`default_model_url`
is empty unless ``MENET_MODEL_URL`` (or the provider setting) names one.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import user_paths

CHUNK = 1 << 20
#: Extra free space kept beyond the model's size before a download starts.
SPACE_MARGIN = 16 << 20
MODEL_SUFFIXES = (".pt", ".onnx")
NO_RELEASE = ("no model URL is configured: the project has no public model release yet. Give a URL or a file "
              "(e.g. dist/menet_coasts_v2.pt from 'make package'), or set the download location in "
              "Processing › Options › Providers › ME-Net (or MENET_MODEL_URL)")
_SHA = re.compile(r"^[0-9a-fA-F]{64}$")


class ModelStoreError(ValueError):
    """A model could not be installed; the message is one line and nothing was changed."""


@dataclass
class InstalledModel:
    path: Path
    sha256: str
    size: int
    source: str


def default_model_url() -> str:
    """Where 'Install model' downloads from when no source is given ('' = no public release)."""
    return os.environ.get("MENET_MODEL_URL", "").strip()


def _is_url(source: str) -> bool:
    return bool(re.match(r"^(https?|file)://", source, re.IGNORECASE))


def _name_from_source(source: str) -> str:
    path = urllib.parse.urlparse(source).path if _is_url(source) else source
    return Path(urllib.parse.unquote(path)).name


def check_model_name(name: str) -> str:
    if not name or name != Path(name).name or name.startswith(".") or not name.endswith(MODEL_SUFFIXES):
        raise ModelStoreError(f"model name '{name}' must be a plain file name ending in "
                              f"{' or '.join(MODEL_SUFFIXES)}")
    return name


def parse_sha256(text: str, where: str) -> str:
    """The hash from '<hex>' or sha256sum's '<hex>  <file>' format."""
    token = (text.strip().split() or [""])[0]
    if not _SHA.match(token):
        raise ModelStoreError(f"{where} is not a sha256 (64 hex digits)")
    return token.lower()


def known_sha256(name: str) -> Optional[str]:
    """The sha256 the plugin ships for a model it knows by name (resources/models/<name>.sha256)."""
    from .resources import resources_dir
    sidecar = resources_dir() / "models" / f"{name}.sha256"
    return parse_sha256(sidecar.read_text(), sidecar.name) if sidecar.is_file() else None


def outdated_copy_note(path) -> Optional[str]:
    """A warning when ``path`` is a copy of a model the plugin knows by name (e.g. the default, installed
    with 'Install model') whose install record holds another sha256 than the one this plugin version
    ships: an older release of that model, still used because the installed copy comes first."""
    path = Path(path)
    record, known = path.with_name(path.name + ".sha256"), known_sha256(path.name)
    if not known or not record.is_file():
        return None
    try:
        recorded = parse_sha256(record.read_text(), record.name)
    except (OSError, ModelStoreError):
        return None
    if recorded == known:
        return None
    return (f"{path.name} in {path.parent} is not the version this plugin ships (sha256 {recorded[:12]}… instead "
            f"of {known[:12]}…): reinstall it with 'Install model' to use the current one")


def _open_url(url: str, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "menet_qgis model installer"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (the user's own URL)
    except urllib.error.HTTPError as exc:
        raise ModelStoreError(f"download failed: HTTP {exc.code} {exc.reason} for {url}") from None
    except urllib.error.URLError as exc:
        raise ModelStoreError(f"cannot reach {urllib.parse.urlparse(url).netloc or url}: {exc.reason}") from None
    except (socket.timeout, TimeoutError):
        raise ModelStoreError(f"no answer from {urllib.parse.urlparse(url).netloc} within {timeout:g} s") from None


def _expected_sha256(source: str, name: str, sha256: Optional[str], timeout: float) -> str:
    if sha256:
        return parse_sha256(sha256, "the given SHA256")
    if _is_url(source):
        try:
            with _open_url(source + ".sha256", timeout) as response:
                return parse_sha256(response.read(4096).decode("utf-8", "replace"), f"{source}.sha256")
        except ModelStoreError:
            pass
    else:
        sidecar = Path(source + ".sha256")
        if sidecar.is_file():
            return parse_sha256(sidecar.read_text(), sidecar.name)
    known = known_sha256(name)
    if known:
        return known
    raise ModelStoreError(f"no SHA256 given and no {name}.sha256 beside {source}: the model cannot be verified")


def _check_space(folder: Path, size: Optional[int]) -> None:
    if size is None:
        return
    free = shutil.disk_usage(folder).free
    if free < size + SPACE_MARGIN:
        raise ModelStoreError(f"not enough free space in {folder}: the model needs {size / 1e6:.0f} MB, "
                              f"{free / 1e6:.0f} MB are free")


def _copy_hashing(read, write, expected_size: Optional[int], reporter) -> tuple:
    digest = hashlib.sha256()
    done = 0
    while True:
        if reporter is not None and reporter.cancelled():
            raise ModelStoreError("cancelled: no model was installed")
        chunk = read(CHUNK)
        if not chunk:
            break
        write(chunk)
        digest.update(chunk)
        done += len(chunk)
        if reporter is not None and expected_size:
            reporter.progress(min(99.0, 100.0 * done / expected_size))
    return done, digest.hexdigest()


def install_model(source: str, name: Optional[str] = None, sha256: Optional[str] = None, models_dir=None,
                  timeout: float = 60.0, reporter=None) -> InstalledModel:
    """Download or copy ``source`` into the model folder as ``name`` after checking its size and sha256."""
    source = (source or "").strip()
    if not source:
        raise ModelStoreError(NO_RELEASE)
    name = check_model_name(name or _name_from_source(source))
    if not _is_url(source) and not Path(source).is_file():
        raise ModelStoreError(f"model file {source} does not exist")
    expected_sha = _expected_sha256(source, name, sha256, timeout)
    folder = Path(models_dir) if models_dir else user_paths.installed_models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name

    handle = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.partial.", delete=False)
    partial = Path(handle.name)
    try:
        with handle:
            if _is_url(source):
                size, digest = _download(source, handle, folder, timeout, reporter)
            else:
                expected_size = Path(source).stat().st_size
                _check_space(folder, expected_size)
                with open(source, "rb") as src:
                    size, digest = _copy_hashing(src.read, handle.write, expected_size, reporter)
            handle.flush()
            os.fsync(handle.fileno())
        if digest != expected_sha:
            raise ModelStoreError(f"sha256 mismatch for {name}: expected {expected_sha}, got {digest}; "
                                  "the model was not installed")
        os.chmod(partial, 0o644)  # mkstemp made it private; a model is an ordinary readable file
        os.replace(partial, target)
    except OSError as exc:
        if getattr(exc, "errno", None) == 28:  # ENOSPC
            raise ModelStoreError(f"no space left in {folder} while writing {name}; nothing was installed") from None
        raise ModelStoreError(f"could not install {name}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    sidecar_tmp = folder / f".{name}.sha256.partial"
    sidecar_tmp.write_text(f"{digest}  {name}\n")
    os.replace(sidecar_tmp, folder / f"{name}.sha256")
    if reporter is not None:
        reporter.progress(100)
        reporter.info(f"installed {name} ({size / 1e6:.1f} MB, sha256 {digest}) in {folder}")
    return InstalledModel(target, digest, size, source)


def _download(url: str, handle, folder: Path, timeout: float, reporter) -> tuple:
    if reporter is not None:
        reporter.info(f"downloading {url}")
    with _open_url(url, timeout) as response:
        length = response.headers.get("Content-Length")
        expected_size = int(length) if length and length.isdigit() else None
        _check_space(folder, expected_size)
        try:
            size, digest = _copy_hashing(response.read, handle.write, expected_size, reporter)
        except http.client.IncompleteRead as exc:
            raise ModelStoreError(f"truncated download from {url}: the server closed the connection after "
                                  f"{len(exc.partial)} more bytes; nothing was installed") from None
        except (ConnectionError, http.client.HTTPException) as exc:
            raise ModelStoreError(f"the server went away during the download from {url} "
                                  f"({type(exc).__name__}); nothing was installed") from None
        except (socket.timeout, TimeoutError):
            raise ModelStoreError(f"the download from {url} stalled: no data for {timeout:g} s; "
                                  "nothing was installed") from None
    if expected_size is not None and size != expected_size:
        raise ModelStoreError(f"truncated download from {url}: got {size} of {expected_size} bytes; "
                              "nothing was installed")
    return size, digest
