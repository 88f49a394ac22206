"""Output files that are whole or absent: atomic writes, partial-file names, stale partials, no input overwritten.

Every output (maps, checkpoints, reports, the model store's files, the batch manifest) is written to a hidden
partial file beside its target and renamed onto it (after fsync) only when complete, so a cancelled, failed or
killed run never leaves half a file and never replaces a good one.  Partial files are named here and only here
(``.STEM.HOST-PID-XXXX.partial.SUFFIX``): the host and pid let a later run tell a live run's partial file from one a
killed process left behind.  The one name for stage files (``stage_path``) lives here too, so the engine and
its front ends cannot disagree about where a stage map goes.

Text side outputs (reports, tables, training histories) replace only a previous output of their own kind
(``TextOutput``, ``refuse_replacing``): a mistyped path never turns a raster or a checkpoint into a CSV.

Standard library only: the QGIS process (model store, Processing) imports it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple


class InputError(ValueError):
    """An input that cannot be processed (or an output that would destroy one); the message says why."""


class WriteError(OSError):
    """An output could not be written completely; nothing was replaced."""


def _umask() -> int:
    """The process umask, read from /proc where Linux shows it (``os.umask`` can only be read by setting it,
    which is not thread-safe, and the QGIS process has threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Read once at import.
UMASK = _umask()

#: This machine in partial-file names (a pid means nothing on another host sharing the folder).
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


# --- partial files ------------------------------------------------------------------------------
def _partial_prefix(path: Path) -> str:
    return "." + path.stem + "."


def temp_beside(path) -> Path:
    """A hidden partial file in ``path``'s folder (same file system: the final rename is atomic), with
    the permissions a normally created file would get (mkstemp makes 0600), named
    ``.STEM.HOST-PID-XXXX.partial.SUFFIX``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_partial_prefix(path)}{HOST}-{os.getpid()}-",
                               suffix=".partial" + path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~UMASK)
    return Path(tmp)


def best_so_far_path(path) -> Path:
    """Where training keeps the best checkpoint so far (hidden, beside the output) until the run ends;
    a client that cancels a run removes it too."""
    path = Path(path)
    return path.parent / f".{path.name}.best-so-far"


def partial_files(path) -> List[Path]:
    """The partial files of ``path`` in its folder, of any host and process (what a client removes
    after a run it cancelled)."""
    path = Path(path)
    return sorted(path.parent.glob(f"{_partial_prefix(path)}*.partial{path.suffix}"))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_partials(path) -> List[Path]:
    """Delete partial files of ``path`` left by ended processes on this host (SIGKILL, power
    loss); keep those of live runs.  Returns what was removed, for the caller to log."""
    path = Path(path)
    pattern = re.compile(re.escape(_partial_prefix(path)) + re.escape(HOST) + r"-(\d+)-[^/]*\.partial"
                         + re.escape(path.suffix) + "$")
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match and int(match.group(1)) != os.getpid() and not _process_alive(int(match.group(1))):
            try:
                os.remove(path.parent / name)
                removed.append(path.parent / name)
            except OSError:
                pass
    return removed


# --- atomic writes ---------------------------------------------------------------------------------
def write_failure(path: Path, detail: str, errno_value: Optional[int] = None) -> WriteError:
    """The one-line error for a failed write at ``path``; names a full disk as such."""
    no_space = errno_value in (errno.ENOSPC, errno.EDQUOT) or "no space left" in detail.lower() \
        or "quota" in detail.lower()
    if not no_space:
        try:  # GDAL's messages may be localised: ask the file system itself
            no_space = shutil.disk_usage(path.parent).free < 2**20
        except OSError:
            pass
    error = WriteError(f"no space left on device at {path} (nothing was replaced)" if no_space else
                       f"writing {path} failed: {detail} (nothing was replaced)")
    error.errno = errno.ENOSPC if no_space else (errno_value or errno.EIO)
    return error


def sync_file(path) -> None:
    """fsync: write errors that the OS reports late (network file systems) show up here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_file(tmp: Path, path: Path) -> Path:
    """fsync ``tmp`` and rename it onto ``path``; a failure removes ``tmp`` and names the cause."""
    try:
        sync_file(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_failure(path, exc.strerror or str(exc), exc.errno) from None
    return path


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A partial file beside ``path``, renamed onto it (after fsync) only if the block succeeds."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        try:
            yield Path(tmp)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise write_failure(path, exc.strerror or str(exc), exc.errno) from None
            raise
        finish_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data) -> Path:
    """Write ``data`` to ``path`` atomically: partial file, full write, fsync, rename.
    A full disk raises ``WriteError`` ("no space left on device at PATH") and replaces nothing."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def atomic_write_text(path, text: str, kind: Optional["TextOutput"] = None) -> Path:
    """``atomic_write_bytes`` for UTF-8 text (reports, tables, JSON); with ``kind``, an existing file at
    ``path`` is replaced only if it is a previous output of that kind (``refuse_replacing``)."""
    if kind is not None:
        refuse_replacing(path, kind)
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_text(data, indent: int = 2) -> str:
    """Strict JSON (RFC 8259): a non-finite float becomes ``null``, never the ``NaN`` or ``Infinity`` that
    Python writes by default and that other JSON readers refuse."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value
    return json.dumps(finite(data), indent=indent, allow_nan=False)


def file_sha256(path) -> str:
    """A file's sha256 (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- which files a run may write ---------------------------------------------------------------------
def refuse_overwriting_inputs(outputs: Iterable, inputs: Iterable) -> None:
    """Refuse a run whose output would replace one of its own inputs, before anything is written.
    Compares real paths (symlinks resolved) and, for existing files, device + inode (hard links)."""
    def identity(p):
        real = os.path.realpath(os.fspath(p))
        try:
            st = os.stat(real)
            return real, (st.st_dev, st.st_ino)
        except OSError:
            return real, None

    known = {}
    for item in inputs:
        if item is None or "://" in os.fspath(item) or os.fspath(item).startswith("/vsi"):
            continue
        real, inode = identity(item)
        known[real] = item
        if inode is not None:
            known[inode] = item
    for out in outputs:
        if out is None:
            continue
        real, inode = identity(out)
        hit = known.get(real) or (known.get(inode) if inode is not None else None)
        if hit is not None:
            raise InputError(f"output {out} is the input {hit}: writing it would destroy the input; "
                             "choose another output path")


@dataclass(frozen=True)
class TextOutput:
    """A kind of text side output: what it is called in messages, the file name endings it may have, and
    how every file of that kind that this program writes begins (``signature``: what tells a previous
    output, which a rerun may replace, from anything else at that path)."""
    what: str
    suffixes: Tuple[str, ...]
    signature: "re.Pattern[bytes]"


HTML_REPORT = TextOutput("HTML report", (".html", ".htm"),
                         re.compile(rb"<!DOCTYPE html><html><head><meta charset='utf-8'><title>"))
CSV_TABLE = TextOutput("CSV table", (".csv",), re.compile(rb"name,threshold,overall_accuracy,"))
JSON_HISTORY = TextOutput("training history", (".json",), re.compile(rb'\[\s*(\]|\{\s*"epoch":)'))

#: How much of an existing file is read to recognise it.
_SNIFF_BYTES = 4096


def _what_it_is(head: bytes) -> str:
    """A few words on what a file that is not ours holds (from its first bytes), for the refusal."""
    if head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return "a TIFF raster"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (a PyTorch checkpoint is one)"
    if b"\0" in head:
        return "binary data"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sniffed bytes
            return "binary data"
    return "text that this program did not write"


def refuse_replacing(path, kind: TextOutput) -> None:
    """Refuse to write ``kind`` at ``path`` unless the name ends as that kind's files do and whatever is already
    there is a previous output of that kind (or empty): a report, table or history must never replace a raster,
    a checkpoint or any other file.  Called before any work starts and again just before writing."""
    if path is None or os.fspath(path) == "":  # no such output asked for
        return
    path = Path(path)
    endings = " or ".join(kind.suffixes)
    if path.suffix.lower() not in kind.suffixes:
        raise InputError(f"the {kind.what} must go to a file ending in {endings}, not {path} (nothing was written)")
    if not os.path.lexists(path):
        return
    if not path.is_file():
        raise InputError(f"{path} exists and is not a file: choose another path for the {kind.what}")
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as exc:
        raise InputError(f"{path} exists and cannot be read ({exc.strerror or exc}) to check that it is a previous "
                         f"{kind.what}: choose another path") from None
    if head and not kind.signature.match(head):
        raise InputError(f"{path} exists and holds {_what_it_is(head)}, not a previous {kind.what}: writing would "
                         f"destroy it; choose another path (or move that file away)")


def stage_path(probability_path, stage_dir, stage: str) -> Path:
    """Where the map of ``stage`` goes for the probability map ``probability_path``: ``STEM_STAGE.tif`` in
    ``stage_dir``, or beside the probability when no folder is given."""
    probability_path = Path(probability_path)
    folder = Path(stage_dir) if stage_dir else probability_path.parent
    return folder / f"{probability_path.stem}_{stage}.tif"
