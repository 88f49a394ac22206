"""What a model file says about itself (recipe, PCA, threshold, training record), read with the standard
library alone: the QGIS process, a bare Python and the model store list models without torch or an ONNX
runtime.  The engine side (``core.model.checkpoint``, ``core.inference.runtimes``) reads and writes the
same records with torch / ONNX; a test keeps the format names equal.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Dict

#: What the engine writes into its files (core/model/checkpoint.py FORMAT, core/inference/onnx_model.py ONNX_FORMAT and
#: METADATA_KEY), repeated here because those modules import torch / numpy; a test keeps them equal.
CHECKPOINT_FORMAT = "menet_qgis.checkpoint"
ONNX_FORMAT = "menet_qgis.onnx"
ONNX_METADATA_KEY = "menet_qgis"


class ModelRecordError(ValueError):
    """A file whose ME-Net record cannot be read without torch or an ONNX runtime."""


# --- what a model file says about itself, without torch or an ONNX runtime ----------------------
def _no_tensor(*_args, **_kwargs):
    return None


class _CheckpointUnpickler(pickle.Unpickler):
    """Reads the pickle inside a ``torch.save`` file without torch: tensors become None (their bytes are
    never read) and every global but the few torch.save writes for tensors is refused, so no code runs.

    Hand-rolled because the process reading it may be QGIS's, which must never import torch (its
    native libraries clash with QGIS's), and the record is plain dicts, lists, numbers and strings."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2") or \
                (module == "torch" and name.endswith("Storage")):
            return _no_tensor
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")

    def persistent_load(self, pid):
        return None  # a tensor's storage, kept in the archive's data/ entries: not needed for the record


def checkpoint_record(path, label: str = "") -> Dict:
    """The record of an ME-Net ``.pt`` checkpoint (core/model/checkpoint.py) without its weights.
    ``label``: the file's name in messages (default: its own)."""
    path = Path(path)
    label = label or path.name
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not pickles:
                raise ModelRecordError(f"{label} is not a torch checkpoint (no data.pkl inside)")
            record = _CheckpointUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as exc:
        if isinstance(exc, ModelRecordError):
            raise
        raise ModelRecordError(f"{label} is not a readable torch checkpoint ({type(exc).__name__}: "
                               f"{str(exc)[:120]})") from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ModelRecordError(f"{label} is not an ME-Net checkpoint (no '{CHECKPOINT_FORMAT}' header)")
    return {k: v for k, v in record.items() if k != "state_dict"}


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
    except (ModelRecordError, UnicodeDecodeError) as exc:
        raise ModelRecordError(f"{label} is not an ONNX model ({exc})") from None
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
    except ValueError:
        raise ModelRecordError(f"{label}: its ME-Net record is not JSON") from None
    if not isinstance(record, dict) or record.get("format") != ONNX_FORMAT:
        raise ModelRecordError(f"{label} is not an ME-Net ONNX model (no '{ONNX_FORMAT}' record)")
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
