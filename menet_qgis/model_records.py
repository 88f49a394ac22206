"""What a model file says about itself (recipe, PCA, threshold, training record), read with the standard
library alone: the QGIS process, a bare Python and the model store list models without torch or an ONNX
runtime.  The engine side (``core.model.checkpoint``, ``core.inference.runtimes``) reads and writes the
same records with torch / ONNX; a test keeps the format names equal.
"""
from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Dict, Optional

from .core.model.stages import check_window  # stdlib only

#: What the engine writes into its files (core/model/checkpoint.py FORMAT, core/inference/onnx_model.py ONNX_FORMAT and
#: METADATA_KEY), repeated here because those modules import torch / numpy; a test keeps them equal.
CHECKPOINT_FORMAT = "menet_qgis.checkpoint"
ONNX_FORMAT = "menet_qgis.onnx"
ONNX_METADATA_KEY = "menet_qgis"


class ModelRecordError(ValueError):
    """A file whose ME-Net record cannot be read without torch or an ONNX runtime."""


#: The largest record pickle (``data.pkl``) read: a real one is a few kB (the weights live beside it).
MAX_RECORD_BYTES = 16 * 2**20


# --- what a model file says about itself, without torch or an ONNX runtime ----------------------
def _no_tensor(*_args, **_kwargs):
    return None


class _CheckpointUnpickler(pickle._Unpickler):  # noqa: SLF001 (the pure-Python unpickler, on purpose)
    """Reads the pickle inside a ``torch.save`` file without torch: tensors become None (their bytes are
    never read) and every global but the few torch.save writes for tensors is refused, so no code runs.

    Hand-rolled because the process reading it may be QGIS's, which must never import torch (its
    native libraries clash with QGIS's), and the record is plain dicts, lists, numbers and strings.
    The pure-Python unpickler, not the C one: the C unpickler's memo is an array sized by the largest
    index a pickle names, so one ``LONG_BINPUT 2**31`` in a 9 kB file made it allocate 17 GB (found by
    the fuzz run, tests/test_faults_models.py); the Python one keeps its memo in a dict, and a record is
    a few kB, read in milliseconds either way (torch's own weights-only unpickler is Python too)."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2") or \
                (module == "torch" and name.endswith("Storage")):
            return _no_tensor
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")

    def persistent_load(self, pid):
        return None  # a tensor's storage, kept in the archive's data/ entries: not needed for the record


def check_checkpoint_archive(archive: zipfile.ZipFile, size: int, label: str) -> None:
    """Refuse a torch zip archive that could make reading it allocate more than the file holds: every entry
    stored as ``torch.save`` writes it (uncompressed), none claiming more bytes than the file has.  torch
    reads deflated entries too, so a 0.5 MB file could otherwise unpack into a 512 MB tensor (and more)."""
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise ModelRecordError(f"{label} is not a checkpoint as torch.save writes it (entry {info.filename} "
                                   "is compressed); refused: a compressed entry can unpack into far more memory "
                                   "than the file holds")
        if info.file_size > size:
            raise ModelRecordError(f"{label} is not a readable torch checkpoint (entry {info.filename} claims "
                                   f"{info.file_size} bytes in a file of {size})")


def checkpoint_record(path, label: str = "") -> Dict:
    """The record of an ME-Net ``.pt`` checkpoint (core/model/checkpoint.py) without its weights.
    ``label``: the file's name in messages (default: its own)."""
    path = Path(path)
    label = label or path.name
    try:
        with zipfile.ZipFile(path) as archive:
            check_checkpoint_archive(archive, path.stat().st_size, label)
            pickles = [i for i in archive.infolist() if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
            if not pickles:
                raise ModelRecordError(f"{label} is not a torch checkpoint (no data.pkl inside)")
            if pickles[0].file_size > MAX_RECORD_BYTES:
                raise ModelRecordError(f"{label} is not an ME-Net checkpoint (its record holds {pickles[0].file_size} "
                                       f"bytes, more than the {MAX_RECORD_BYTES // 2**20} MB any record needs)")
            record = _CheckpointUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
    except ModelRecordError:
        raise
    except (OSError, MemoryError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise ModelRecordError(f"{label} not found") from None
        raise ModelRecordError(f"{label} is not a readable torch checkpoint ({_one_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 (a hostile pickle or zip can make the readers raise almost any type)
        raise ModelRecordError(f"{label} is not a readable torch checkpoint ({_one_line(exc)})") from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ModelRecordError(f"{label} is not an ME-Net checkpoint (no '{CHECKPOINT_FORMAT}' header)")
    record = {k: v for k, v in record.items() if k != "state_dict"}
    check_record_types(record, label)
    return record


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, whole words only (a longer message is cut at a space, marked '…')."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: The sections of a model record and the type each must have (checked before any caller reads them).
SECTIONS = {"architecture": dict, "recipe": dict, "training": dict, "normalisation": dict, "pca": dict,
            "outputs": list}


def check_record_types(record: Dict, label: str, error=ModelRecordError) -> None:
    """Every section of a record the type readers expect (``SECTIONS``; the recipe's names strings, its
    version an integer), so a damaged or crafted record is refused here in one line instead of failing
    in whichever caller touches it first."""
    for key, kind in SECTIONS.items():
        if key in record and not isinstance(record[key], kind):
            raise error(f"{label}: its record's {key} is not a {'JSON object' if kind is dict else 'list'}; "
                                   "the file is damaged or was not written by this plugin")
    recipe = record.get("recipe", {})
    for key in ("channels", "source_bands"):
        if key in recipe and not (isinstance(recipe[key], list) and all(isinstance(v, str) for v in recipe[key])):
            raise error(f"{label}: its record's recipe {key} is not a list of names")
    for section, key in (("recipe", "version"), ("architecture", "version")):
        value = record.get(section, {}).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise error(f"{label}: its record's {section} version is not a whole number ({value!r:.40})")


def _numbers(values, count: Optional[int]) -> bool:
    """``values`` is a list of ``count`` (any number if None) finite numbers (no booleans)."""
    return isinstance(values, list) and (count is None or len(values) == count) and \
        all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def check_description(record: Dict, label: str, n_channels: Optional[int] = None,
                      n_source_bands: Optional[int] = None, error=ModelRecordError) -> None:
    """What feeds the network, checked before it is used: per-channel normalisation (finite means, finite
    standard deviations above 0: dividing by 0 would turn every pixel into inf/NaN, which the engine
    would then quietly map as 'no mangrove'), a finite PCA basis and a usable window size (the same
    bounds as a user's ``window``, ``stages.check_window``; a crafted 1000000 px window would ask for
    terabytes).  ``n_channels`` / ``n_source_bands``: the lengths this plugin's recipe gives, when known."""
    check_record_types(record, label, error)
    for key, what in (("normalisation", "normalisation statistics"), ("pca", "PCA basis")):
        if key not in record:
            raise error(f"{label}: its record has no {what}; the file is damaged or was not written by this "
                        "plugin: export or train the model again")
    norm = record.get("normalisation", {})
    mean, std = norm.get("mean"), norm.get("std")
    if not (isinstance(mean, list) and isinstance(std, list)) or \
            (n_channels is not None and (len(mean), len(std)) != (n_channels, n_channels)):
        raise error(f"{label}: normalisation statistics do not have {n_channels or 'one value per'} channels")
    bad = [i for i, v in enumerate(std) if not _numbers([v], 1) or v <= 0]
    if not _numbers(mean, None) or bad:
        detail = f" (standard deviation of channel {bad[0] + 1} is {std[bad[0]]!r:.40})" if bad else ""
        raise error(f"{label}: normalisation statistics are not finite and positive{detail}: the file is damaged "
                    "or was not written by this plugin; export or train the model again")
    pca = record.get("pca", {})
    if not (_numbers(pca.get("mean"), n_source_bands) and _numbers(pca.get("component"), n_source_bands)
            and len(pca["mean"]) == len(pca["component"])):
        raise error(f"{label}: the PCA basis does not hold {n_source_bands or 'the same number of'} finite values "
                    "per vector")
    window = record.get("window_size", 256)
    try:
        if isinstance(window, bool) or not isinstance(window, int):
            raise ValueError(f"window size must be a whole number of px, got {window!r:.40}")
        check_window(window, 0)
    except ValueError as exc:
        raise error(f"{label}: its recorded window_size cannot be used ({exc})") from None


def _varint(read) -> int:
    shift = value = 0
    while True:
        byte = read(1)
        if not byte:
            raise ModelRecordError("the file ends inside a protobuf field")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ModelRecordError("a protobuf varint longer than 64 bits")


def _protobuf_fields(stream, end: int):
    """(field number, bytes or None) for each top-level field of a protobuf message, skipping the
    content of length-delimited fields the caller does not want (``stream.seek``) unless it asks."""
    while stream.tell() < end:
        key = _varint(stream.read)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _varint(stream.read)
            yield number, None
        elif wire in (1, 5):
            stream.seek(8 if wire == 1 else 4, io.SEEK_CUR)
            yield number, None
        elif wire == 2:
            length = _varint(stream.read)
            start = stream.tell()
            if start + length > end:
                raise ModelRecordError("a protobuf field runs past the end of the file")
            yield number, (start, length)
            stream.seek(start + length)
        else:
            raise ModelRecordError(f"protobuf wire type {wire} is not valid here")


def onnx_metadata(path, label: str = "") -> Dict[str, str]:
    """The ``metadata_props`` of an ONNX file (ModelProto field 14: key 1, value 2), read from the protobuf
    wire format with the standard library: the graph (field 7, the weights) is skipped with a seek.

    Hand-rolled rather than through onnxruntime/openvino (``runtimes.read_onnx_model``) because the reader
    may be QGIS's process or a Python with no runtime at all, and loading a 50 MB graph to read 5 kB of
    JSON costs seconds; the ``onnx`` package is no dependency of the plugin."""
    path = Path(path)
    label = label or path.name
    props: Dict[str, str] = {}
    has_graph = False
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            for number, span in _protobuf_fields(f, end):
                if number == 7 and span is not None:
                    has_graph = True
                elif number == 14 and span is not None:
                    here = f.tell()
                    f.seek(span[0])
                    entry = io.BytesIO(f.read(span[1]))
                    f.seek(here)
                    key = value = ""
                    for sub, sub_span in _protobuf_fields(entry, span[1]):
                        if sub_span is not None and sub in (1, 2):
                            text = entry.getvalue()[sub_span[0]:sub_span[0] + sub_span[1]].decode("utf-8")
                            key, value = (text, value) if sub == 1 else (key, text)
                    props[key] = value
    except FileNotFoundError:
        raise ModelRecordError(f"{label} not found") from None
    except (ModelRecordError, UnicodeDecodeError) as exc:
        raise ModelRecordError(f"{label} is not an ONNX model ({exc})") from None
    except OSError as exc:
        raise ModelRecordError(f"{label} cannot be read ({_one_line(exc)})") from None
    if not has_graph:
        raise ModelRecordError(f"{label} is not an ONNX model (no graph)")
    return props


def onnx_record(path, label: str = "") -> Dict:
    """The ME-Net record of an exported ``.onnx`` model (its metadata, else the ``.json`` beside it)."""
    path = Path(path)
    label = label or path.name
    text = onnx_metadata(path, label).get(ONNX_METADATA_KEY)
    sidecar = path.with_suffix(".json")
    if text is None and sidecar.is_file():
        text = sidecar.read_text()
    if text is None:
        raise ModelRecordError(f"{label} carries no ME-Net record ('{ONNX_METADATA_KEY}' metadata)")
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        raise ModelRecordError(f"{label}: its ME-Net record is not JSON") from None
    if not isinstance(record, dict) or record.get("format") != ONNX_FORMAT:
        raise ModelRecordError(f"{label} is not an ME-Net ONNX model (no '{ONNX_FORMAT}' record)")
    check_record_types(record, label)
    return record


def read_model_record(path, name: str = "") -> Dict:
    """What an ``.onnx`` or ``.pt`` model records besides its weights, read with the standard library
    alone; ``ModelRecordError`` when the file is not an ME-Net model.  ``name``: the model's file name when
    ``path`` is a temporary file (its suffix says which format to read)."""
    path = Path(path)
    name = name or path.name
    if name.lower().endswith(".onnx"):
        return onnx_record(path, name)
    return checkpoint_record(path, name)


def decision_threshold(training: Dict) -> float:
    """The probability at which a model calls a pixel mangrove: chosen on validation when it was
    trained and stored with it (``training["threshold"]``), 0.5 for models from before that."""
    value = training.get("threshold", 0.5)
    return float(value) if isinstance(value, (int, float)) and 0.0 < value < 1.0 else 0.5


class TrainingRecord:
    """What every loaded model (a torch checkpoint, an exported ONNX model) says of its training, read
    from its ``training`` dict: whether it was trained at all, and its decision threshold."""

    training: Dict

    @property
    def trained(self) -> bool:
        return bool(self.training.get("trained", False))

    @property
    def threshold(self) -> float:
        return decision_threshold(self.training)
