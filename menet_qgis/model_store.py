"""The model store: models installed with "Install model" (verified by sha256), their index, and
the rule that picks the default model from them.

QGIS-free and stdlib-only (the QGIS process and a bare Python without numpy or
torch run it).  A model comes from a URL (streamed with urllib) or a local
file; it is written to a hidden temporary file beside the target while its
sha256 is computed, checked against the expected size and hash, and only then
renamed over the target (``os.replace``, atomic on one filesystem).  Any failure
removes the temporary file, so the folder never holds a half-written model and a
model installed before, and the index, stay byte-identical.

The store is ``user_paths.installed_models_dir()``.  ``index.json`` in it
describes every installed model (name, version, recipe, threshold, sha256,
size, source, installed-at), read from the model file itself without torch or
an ONNX runtime (:func:`read_model_record`), so ``install-model --list`` and the
Install model log can show it anywhere.

The project has no public release of its model yet, so :func:`default_model_url`
is empty unless ``MENET_MODEL_URL`` (or the provider setting) names one.

What a download may go through (:func:`transport_refusal`, :func:`redirect_refusal`):
https; plain http only to this machine (loopback: nothing on the network can
alter it) or with ``allow_http`` and a sha256 the user gives (a ``.sha256`` from
the same unprotected server proves nothing); an https download stays https
through its redirects; redirects to other hosts (release assets on a CDN) are
followed and logged.  A download may be at most :data:`MAX_MODEL_BYTES`, with or
without a Content-Length, and the partial file of a download that was killed is
removed by the next install.
"""
from __future__ import annotations

import datetime
import hashlib
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import user_paths
from .model_records import ModelRecordError, read_model_record
from . import resources
from .resources import DEFAULT_ASSET_NAME, DEFAULT_MODEL_BASE
from .model_records import decision_threshold
from .core.files import HOST, atomic_write_text, remove_stale_partials, temp_beside

CHUNK = 1 << 20
#: Extra free space kept beyond the model's size before a download starts.
SPACE_MARGIN = 16 << 20
#: The largest model accepted (ME-Net's are ~100 MB): a server that announces or sends more is stopped there,
#: so a broken or hostile server cannot fill the disk.
MAX_MODEL_BYTES = 2_000_000_000
#: How to proceed over plain http, for the refusals that need it.
HTTP_HOW = ("use an https URL, or allow plain http (--allow-http) and give the model's sha256 from a source you "
            "trust (--sha256)")
MODEL_SUFFIXES = (".pt", ".onnx")
NO_RELEASE = ("no model URL is configured: the project has no public model release yet. Give a URL or a file "
              "(e.g. dist/menet_coasts_v2.onnx from 'make package'), or set the download location in "
              "Processing › Options › Providers › ME-Net (or MENET_MODEL_URL)")
#: The index of installed models, in the store.
INDEX_NAME = "index.json"
INDEX_FORMAT = "menet_qgis.model_index"
INDEX_FORMAT_VERSION = 1
_SHA = re.compile(r"^[0-9a-fA-F]{64}$")


class ModelStoreError(ValueError):
    """A model could not be installed; the message is one line and nothing was changed."""


class InsecureSourceError(ModelStoreError):
    """A download that could be altered on its way (plain http, a redirect from https to http); never passed
    over in silence, not even while looking for a ``.sha256`` beside the source."""


@dataclass
class InstalledModel:
    path: Path
    sha256: str
    size: int
    source: str
    #: Where the expected sha256 came from, for the log ("the given SHA256", "... beside the source", ...).
    sha256_from: str = ""
    #: The model's entry in the index.
    entry: Dict = field(default_factory=dict)


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
    sidecar = resources.resources_dir() / "models" / f"{name}.sha256"
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


# --- what a download may go through ---------------------------------------------------------------
def is_loopback_host(host: Optional[str]) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1: traffic that never leaves this machine (pip and the W3C's secure
    contexts treat these as secure origins too)."""
    host = (host or "").strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def transport_refusal(url: str, allow_http: bool = False) -> Optional[str]:
    """Why ``url`` may not be downloaded from (one line), or None: https always; plain http only to loopback
    or with ``allow_http`` (which :func:`install_model` accepts only together with a given sha256)."""
    parts = urllib.parse.urlparse(url)
    scheme = parts.scheme.lower()
    if scheme in ("https", "file"):
        return None
    if scheme == "http":
        if allow_http or is_loopback_host(parts.hostname):
            return None
        return (f"plain http refused for {url}: anyone on the way can replace the model, and a .sha256 from the "
                f"same server proves nothing; {HTTP_HOW}")
    return f"{url}: only https (or plain http with --allow-http) is downloaded from"


def redirect_refusal(first_url: str, new_url: str, allow_http: bool = False) -> Optional[str]:
    """Why a redirect of a download that started at ``first_url`` to ``new_url`` is not followed, or None.

    Only http(s); a download that started on https stays on https (or the log, and the user, would believe
    it protected); plain http otherwise as :func:`transport_refusal`.  Other hosts are allowed (release
    assets are served from CDNs) and logged by the caller.
    """
    scheme = urllib.parse.urlparse(new_url).scheme.lower()
    if scheme not in ("http", "https"):
        return f"{first_url} was redirected to {new_url}: only https (or plain http with --allow-http) is followed"
    if scheme == "http" and not allow_http:
        if urllib.parse.urlparse(first_url).scheme.lower() == "https":
            return (f"{first_url} was redirected to plain http ({new_url}), where the download could be "
                    f"altered on its way: refused; {HTTP_HOW}")
        refusal = transport_refusal(new_url)
        if refusal:
            return f"{first_url} was redirected to {new_url}: {refusal}"
    return None


class _RedirectPolicy(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, with :func:`redirect_refusal` applied to every hop and each hop logged
    (with the host when it changes)."""

    def __init__(self, allow_http: bool, reporter=None):
        super().__init__()
        self.allow_http, self.reporter = allow_http, reporter

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        first = getattr(req, "menet_first_url", req.full_url)
        refusal = redirect_refusal(first, newurl, self.allow_http)
        if refusal:
            fp.close()
            raise InsecureSourceError(refusal + "; nothing was installed")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.menet_first_url = first
            if self.reporter is not None:
                old_host, new_host = (urllib.parse.urlparse(u).hostname for u in (req.full_url, newurl))
                self.reporter.info(f"redirected (HTTP {code}) to {newurl}"
                                   + (f" (another host: {new_host})" if new_host != old_host else ""))
        return new


def _open_url(url: str, timeout: float, allow_http: bool = False, reporter=None):
    request = urllib.request.Request(url, headers={"User-Agent": "menet_qgis model installer"})
    opener = urllib.request.build_opener(_RedirectPolicy(allow_http, reporter))
    try:
        return opener.open(request, timeout=timeout)  # noqa: S310 (the user's own URL, checked above)
    except urllib.error.HTTPError as exc:
        raise ModelStoreError(f"download failed: HTTP {exc.code} {exc.reason} for {url}") from None
    except urllib.error.URLError as exc:
        raise ModelStoreError(f"cannot reach {urllib.parse.urlparse(url).netloc or url}: {exc.reason}") from None
    except (socket.timeout, TimeoutError):
        raise ModelStoreError(f"no answer from {urllib.parse.urlparse(url).netloc} within {timeout:g} s") from None


def _expected_sha256(source: str, name: str, sha256: Optional[str], timeout: float,
                     reporter=None) -> Tuple[str, str]:
    """(the sha256 the model must have, where it came from, for the log)."""
    if sha256:
        return parse_sha256(sha256, "the given SHA256"), "from the given SHA256"
    if _is_url(source):
        try:
            with _open_url(source + ".sha256", timeout, reporter=reporter) as response:
                return (parse_sha256(response.read(4096).decode("utf-8", "replace"), f"{source}.sha256"),
                        f"from {_name_from_source(source)}.sha256 beside the source ({source}.sha256)")
        except InsecureSourceError:
            raise
        except ModelStoreError:
            pass
    else:
        sidecar = Path(source + ".sha256")
        if sidecar.is_file():
            return parse_sha256(sidecar.read_text(), sidecar.name), f"from {sidecar.name} beside the source"
    known = known_sha256(name)
    if known:
        return known, f"the checksum this plugin ships for {name}"
    raise ModelStoreError(f"no SHA256 given and no {name}.sha256 beside {source}: the model cannot be verified")


def _check_space(folder: Path, size: Optional[int]) -> None:
    if size is None:
        return
    free = shutil.disk_usage(folder).free
    if free < size + SPACE_MARGIN:
        raise ModelStoreError(f"not enough free space in {folder}: the model needs {size / 1e6:.0f} MB, "
                              f"{free / 1e6:.0f} MB are free")


def _size_text(size: int) -> str:
    return f"{size / 1e9:.3g} GB" if size >= 1e9 else f"{size / 1e6:.3g} MB"


def _copy_hashing(read, write, expected_size: Optional[int], reporter, limit: Optional[int] = None,
                  where: str = "") -> tuple:
    digest = hashlib.sha256()
    done = 0
    while True:
        if reporter is not None and reporter.cancelled():
            raise ModelStoreError("cancelled: no model was installed")
        chunk = read(CHUNK)
        if not chunk:
            break
        if limit is not None and done + len(chunk) > limit:
            raise ModelStoreError(f"the download from {where} goes on past {_size_text(limit)}, the most a model "
                                  f"may have (ME-Net's are ~100 MB): stopped there; nothing was installed")
        write(chunk)
        digest.update(chunk)
        done += len(chunk)
        if reporter is not None and expected_size:
            reporter.progress(min(99.0, 100.0 * done / expected_size))
    return done, digest.hexdigest()


def install_model(source: str, name: Optional[str] = None, sha256: Optional[str] = None, models_dir=None,
                  timeout: float = 60.0, reporter=None, allow_http: bool = False) -> InstalledModel:
    """Download or copy ``source`` into the model folder as ``name`` after checking its size and sha256,
    and record it in the folder's index.  ``allow_http``: plain http beyond this machine, only with ``sha256``."""
    source = (source or "").strip()
    if not source:
        raise ModelStoreError(NO_RELEASE)
    name = check_model_name(name or _name_from_source(source))
    if _is_url(source):
        if allow_http and not (sha256 or "").strip():
            raise InsecureSourceError("--allow-http needs --sha256: over plain http the .sha256 beside the model "
                                      "comes from the same unprotected server and proves nothing; give the "
                                      "model's sha256 from a source you trust")
        refusal = transport_refusal(source, allow_http)
        if refusal:
            raise InsecureSourceError(refusal)
    elif not Path(source).is_file():
        raise ModelStoreError(f"model file {source} does not exist")
    expected_sha, sha_from = _expected_sha256(source, name, sha256, timeout, reporter)
    folder = Path(models_dir) if models_dir else user_paths.installed_models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    _remove_killed_installs(folder, reporter)
    if not _is_url(source):
        source = str(Path(source).resolve())

    partial = temp_beside(target)
    try:
        with open(partial, "wb") as handle:
            if _is_url(source):
                size, digest = _download(source, handle, folder, timeout, reporter, allow_http)
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
        if reporter is not None:
            reporter.info(f"sha256 {digest} matches, {sha_from}")
        entry = index_entry(partial, name, digest, size, source)
        os.chmod(partial, 0o644)  # a model is an ordinary readable file
        os.replace(partial, target)
    except OSError as exc:
        if getattr(exc, "errno", None) == 28:  # ENOSPC
            raise ModelStoreError(f"no space left in {folder} while writing {name}; nothing was installed") from None
        raise ModelStoreError(f"could not install {name}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    atomic_write_text(folder / f"{name}.sha256", f"{digest}  {name}\n")
    index = read_index(folder)
    index[name] = entry
    write_index(folder, index)
    if reporter is not None:
        reporter.progress(100)
        reporter.info(f"installed {name} ({size / 1e6:.1f} MB, sha256 {digest}) in {folder}")
        if entry.get("record_note"):
            getattr(reporter, "warn", reporter.info)(f"{name}: {entry['record_note']}")
    return InstalledModel(target, digest, size, source, sha_from, entry)


def _remove_killed_installs(folder: Path, reporter) -> None:
    """Remove the partial files that installs killed on this host left in ``folder`` (SIGKILL, power loss:
    nothing else removes them, and a download's may be up to MAX_MODEL_BYTES); live installs keep theirs.
    Which files those are and whether their process still runs is ``core.files``' to say."""
    targets, sizes = set(), {}
    for partial in folder.glob(".*.partial*"):
        stem, found, _ = partial.name.rpartition(f".{HOST}-")
        if found and stem.startswith("."):
            targets.add(folder / (stem[1:] + partial.name.rpartition(".partial")[2]))
            try:
                sizes[partial.name] = partial.stat().st_size
            except OSError:  # its install just finished
                pass
    for target in sorted(targets):
        for removed in remove_stale_partials(target):
            if reporter is not None:
                reporter.info(f"removed {removed.name} ({sizes.get(removed.name, 0) / 1e6:.0f} MB), left in "
                              f"{folder} by an install of {target.name} that was killed")


def _download(url: str, handle, folder: Path, timeout: float, reporter, allow_http: bool = False) -> tuple:
    if reporter is not None:
        reporter.info(f"downloading {url}")
    with _open_url(url, timeout, allow_http, reporter) as response:
        final = response.geturl()
        if reporter is not None and final != url:
            reporter.info(f"downloading from {final}")
        length = response.headers.get("Content-Length")
        expected_size = int(length) if length and length.isdigit() else None
        if expected_size is not None and expected_size > MAX_MODEL_BYTES:
            raise ModelStoreError(f"{final} is {_size_text(expected_size)}, more than the {_size_text(MAX_MODEL_BYTES)} "
                                  f"a model may have (ME-Net's are ~100 MB); nothing was downloaded")
        _check_space(folder, expected_size)
        try:
            size, digest = _copy_hashing(response.read, handle.write, expected_size, reporter, MAX_MODEL_BYTES,
                                         final)
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


# --- the index ------------------------------------------------------------------------------------
def _version_from_name(name: str) -> Optional[str]:
    """'menet_coasts_v2.onnx' -> 'v2': released models carry their version in their name."""
    match = re.search(r"_v(\d+)$", Path(name).stem)
    return f"v{match.group(1)}" if match else None


def describe_record(record: Dict) -> Dict:
    """The index's view of a model record: recipe, threshold, trained, architecture, weights."""
    recipe = record.get("recipe") or {}
    bands = ", ".join(recipe.get("source_bands") or [])
    training = record.get("training") or {}
    arch = record.get("architecture") or {}
    described = {
        "recipe": f"v{recipe.get('version')} ({bands})" if recipe.get("version") else None,
        "threshold": decision_threshold(training),
        "trained": bool(training.get("trained", False)),
        "architecture": f"{arch.get('name')} v{arch.get('version')}" if arch.get("name") else None,
    }
    if record.get("model_version"):
        described["version"] = str(record["model_version"])
    if record.get("weights"):
        described["weights"] = record["weights"]
    return described


def index_entry(path, name: str, sha256: str, size: int, source: str) -> Dict:
    """One model's line in the index.  A file whose record cannot be read is still described by what is
    known (name, hash, size, source) with a note saying why the rest is missing."""
    entry = {"name": name, "format": Path(name).suffix.lstrip(".").lower(), "version": _version_from_name(name),
             "recipe": None, "threshold": None, "trained": None, "sha256": sha256, "size": size,
             "source": source,
             "installed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        entry.update(describe_record(read_model_record(path, name)))
    except (ModelRecordError, OSError) as exc:
        entry["record_note"] = f"no ME-Net record could be read ({exc}); indexed by name, size and sha256 only"
    return entry


def index_path(models_dir=None) -> Path:
    return Path(models_dir or user_paths.installed_models_dir()) / INDEX_NAME


def read_index(models_dir=None) -> Dict[str, Dict]:
    """{file name: entry} from the store's index; {} when there is none or it cannot be read (the listing
    then shows the files by name, and the next install rewrites it)."""
    try:
        data = json.loads(index_path(models_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT or not isinstance(data.get("models"), dict):
        return {}
    return {name: dict(entry) for name, entry in data["models"].items() if isinstance(entry, dict)}


def write_index(models_dir, models: Dict[str, Dict]) -> None:
    """Replace the index atomically (written beside it, then renamed)."""
    text = json.dumps({"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION,
                       "models": dict(sorted(models.items()))}, indent=2) + "\n"
    atomic_write_text(index_path(models_dir), text)


def installed_models(models_dir=None) -> List[Dict]:
    """The store's models, sorted by name: index entries whose file is there, then model files the index
    does not know (copied by hand, or installed by a version without an index) with a note."""
    folder = Path(models_dir or user_paths.installed_models_dir())
    index = read_index(folder)
    found = []
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.name.endswith(MODEL_SUFFIXES) or not path.is_file():
                continue
            entry = index.get(path.name)
            if entry is None or entry.get("size") != path.stat().st_size:
                sidecar = path.with_name(path.name + ".sha256")
                try:
                    sha = parse_sha256(sidecar.read_text(), sidecar.name) if sidecar.is_file() else None
                except (OSError, ModelStoreError):
                    sha = None
                entry = {"name": path.name, "format": path.suffix.lstrip(".").lower(),
                         "version": _version_from_name(path.name), "sha256": sha, "size": path.stat().st_size,
                         "source": None, "installed_at": None,
                         "record_note": "not in the index: copied by hand or installed by an older version; "
                                        "reinstall it with Install model to record it"}
            found.append(entry)
    return found


def listing_lines(models_dir=None) -> List[str]:
    """The store as a few log lines (Install model's log, ``install-model --list``)."""
    folder = Path(models_dir or user_paths.installed_models_dir())
    entries = installed_models(folder)
    if not entries:
        return [f"model store {folder}: no model installed"]
    lines = [f"model store {folder}: {len(entries)} model{'s' if len(entries) > 1 else ''}"]
    for e in entries:
        parts = [e["name"], e.get("version") or "", f"recipe {e['recipe']}" if e.get("recipe") else "",
                 f"threshold {e['threshold']:g}" if e.get("threshold") is not None else "",
                 "UNTRAINED" if e.get("trained") is False else "",
                 f"{e['size'] / 1e6:.1f} MB", f"sha256 {e['sha256'][:12]}…" if e.get("sha256") else "",
                 f"installed {e['installed_at']}" if e.get("installed_at") else "",
                 f"from {e['source']}" if e.get("source") else ""]
        lines.append("  " + "  ".join(p for p in parts if p))
        if e.get("record_note"):
            lines.append(f"    ({e['record_note']})")
    lines.append(f"MODEL empty = {DEFAULT_RULE}")
    return lines


# --- the default model ----------------------------------------------------------------------------
DEFAULT_RULE = (f"{DEFAULT_MODEL_BASE}.onnx (ONNX Runtime/OpenVINO, no PyTorch needed); {DEFAULT_MODEL_BASE}.pt "
                "where the engine runs PyTorch (a CUDA GPU, or runtime torch) or no .onnx is there; installed "
                "copies before the plugin's own")


@dataclass
class DefaultModel:
    path: Path
    why: str


def engine_runs_torch(runtime: str = "auto", device: str = "auto") -> Tuple[bool, str]:
    """(whether the engine in this Python will run the model with torch, why) — the question that decides
    between the .pt and the .onnx.  Imports torch only for runtime and device 'auto'."""
    runtime, device = (runtime or "auto").lower(), (device or "auto").lower()
    if runtime == "torch":
        return True, "runtime torch was asked for"
    if runtime != "auto":
        return False, f"runtime {runtime} was asked for"
    if device == "cuda":
        return True, "the CUDA device was asked for"
    if device == "cpu":
        return False, "the CPU was asked for"
    try:
        from .core.inference import runtimes  # numpy: the engine's Python has it
    except ImportError:
        return False, "this Python cannot run the engine (no numpy)"
    if not runtimes.torch_importable():
        return False, "PyTorch is not installed"
    if runtimes.torch_sees_cuda():
        return True, "torch sees a CUDA GPU"
    return False, "no CUDA GPU visible to torch"


def find_default_model(runtime: str = "auto", device: str = "auto", models_dir=None) -> Optional[DefaultModel]:
    """The default model (MODEL empty) for an engine that runs ``runtime`` on ``device``, or None.

    Candidates: ``menet_coasts_v2.onnx`` and ``.pt`` among the store's installed models (the index), then the
    copies inside the plugin (resources/models: the source checkout, the offline ZIP).  Rule:

    * the ``.pt`` first only where the engine will run torch: runtime torch, device cuda, or auto with torch
      seeing a CUDA GPU.  On a GPU torch (bf16 autocast) is the fastest path and the ONNX runners are
      CPU-only; torch cannot run an ``.onnx`` at all.
    * else the ``.onnx`` first: on the CPU ONNX Runtime/OpenVINO map 1.3-1.7x faster than torch (docs/performance.md),
      it needs no PyTorch (the cpu-light environment has none) and no one-time export, and it
      is the asset the project ships for mapping.
    * the other form as a fallback (a ``.pt`` still maps on the CPU where torch can export it, or its
      export is cached; an ``.onnx`` still maps on the CPU beside a GPU).
    * within one form, the installed copy before the plugin's: the user installed it on purpose, and a
      newer release goes to the store, not into the plugin folder.
    Only when both forms are present with runtime and device 'auto' does this ask torch about CUDA.
    """
    folder = Path(models_dir or user_paths.installed_models_dir())
    installed = {e["name"] for e in installed_models(folder)}
    candidates = []
    for suffix in (".onnx", ".pt"):
        name = DEFAULT_MODEL_BASE + suffix
        if name in installed:
            candidates.append((folder / name, suffix, f"installed in {folder}"))
        shipped = resources.resources_dir() / "models" / name
        if shipped.is_file():
            candidates.append((shipped, suffix, "inside the plugin"))
    if not candidates:
        return None
    forms = {suffix for _, suffix, _ in candidates}
    if len(forms) == 1:
        path, suffix, where = candidates[0]
        only = "the only form there" if suffix == ".pt" else "the ONNX asset"
        return DefaultModel(path, f"{path.name} {where} ({only})")
    torch_runs, why = engine_runs_torch(runtime, device)
    first = ".pt" if torch_runs else ".onnx"
    path, suffix, where = sorted(candidates, key=lambda c: c[1] != first)[0]
    return DefaultModel(path, f"{path.name} {where} ({'the PyTorch checkpoint' if torch_runs else 'the ONNX asset'}: "
                              f"{why})")


def no_default_model_message() -> str:
    """What to do when MODEL is empty and no default model is anywhere (one line)."""
    return (f"no model given and no default model installed (looked for {DEFAULT_MODEL_BASE}.onnx and .pt in "
            f"{user_paths.installed_models_dir()} and {resources.resources_dir() / 'models'}): install it with the "
            f"'Install model' algorithm (menet:installmodel) or `python -m menet_qgis install-model "
            f"dist/{DEFAULT_MODEL_BASE}.onnx`, or give a model")


def default_model_path(runtime: str = "auto", device: str = "auto") -> Path:
    """The default model as ``model_store.find_default_model`` picks it; where Install model puts the asset
    when there is none (scripts use this as an argument default; jobs.resolve_model says what to do)."""
    found = find_default_model(runtime, device)
    return found.path if found is not None else user_paths.installed_models_dir() / DEFAULT_ASSET_NAME
