"""An exported model without torch or a runtime: its record, its graph variants and where exports are cached.

An ``.onnx`` file alone is a complete model: the record (channel recipe, PCA, normalisation, window, training
record) travels in the file's metadata, read with the standard library (``model_records.onnx_record``), so a
Python with neither torch nor a runtime can list and check it.  Exports of a checkpoint are cached by the
checkpoint's sha256, beside it or in ``<menet home>/onnx``; ``runtimes.load_model`` finds or makes them and
``export.py`` writes them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..model import channels as ch
from ..model.stages import STAGE_NAMES
from ...model_records import TrainingRecord

#: The ONNX file's metadata_props key holding the model record (JSON).
METADATA_KEY = "menet_qgis"
ONNX_FORMAT = "menet_qgis.onnx"
ONNX_FORMAT_VERSION = 1
#: Graph variants: the probability alone (lean, the usual run) or with every stage map.
NEEDS = ("probability", "stages")


@dataclass
class OnnxModel(TrainingRecord):
    """An exported model plus what the pipeline needs to feed it (no torch inside).

    Duck-types the fields of ``checkpoint.ModelBundle`` the engine reads."""

    path: str
    norm_mean: List[float]
    norm_std: List[float]
    pca: ch.PCABasis
    outputs: List[str]
    window_size: int = 256
    training: Dict = field(default_factory=dict)
    source: Optional[str] = None          # the checkpoint it was exported from
    source_sha256: Optional[str] = None
    recipe: ch.Recipe = ch.RECIPE_V1

    @property
    def has_stages(self) -> bool:
        return all(name in self.outputs for name in STAGE_NAMES)


def model_record(bundle, outputs: Sequence[str], source_sha256: Optional[str]) -> Dict:
    """The JSON stored in an exported file: everything but the weights (plain types only)."""
    from ..model.checkpoint import model_description  # a bundle to export means torch is there
    return {
        "format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, **model_description(bundle),
        "training": {k: v for k, v in bundle.training.items() if k != "val_names"},
        "outputs": list(outputs),
        "source": Path(bundle.path).name if bundle.path else None,
        "source_sha256": source_sha256,
    }


def read_onnx_model(path) -> OnnxModel:
    """Load an exported model's record (from the file's metadata, else its ``.json`` sidecar) and check it.
    The record is read by ``model_records.onnx_record`` (the standard library, the weights skipped): no runtime
    session is built just to read 5 kB of JSON, and a Python without any runtime can read it too."""
    from ...model_records import ModelRecordError, check_description, onnx_record
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file not found: {path}")
    try:
        record = onnx_record(path)
    except ModelRecordError as exc:
        raise ValueError(f"{exc}: export it with `python -m menet_qgis export`") from None
    if record.get("format_version") != ONNX_FORMAT_VERSION:
        raise ValueError(f"{path.name}: ME-Net ONNX format {record.get('format')} v{record.get('format_version')}, "
                         f"this plugin reads {ONNX_FORMAT} v{ONNX_FORMAT_VERSION}")
    try:
        recipe = ch.recipe_for(record.get("recipe", {}))
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from None
    # the same checks as a checkpoint's record (checkpoint.read_record): a zero standard deviation, a
    # crafted window or a missing section is refused here, in one line, before any runtime runs it
    check_description(record, path.name, ch.N_CHANNELS, len(recipe.source_bands), ValueError)
    outputs = record.get("outputs")
    if not (isinstance(outputs, list) and "probability" in outputs and all(isinstance(o, str) for o in outputs)):
        raise ValueError(f"{path.name}: its record does not list the model's outputs (with 'probability'); "
                         "export it again with `python -m menet_qgis export`")
    for key in ("source", "source_sha256"):
        if not isinstance(record.get(key), (str, type(None))):
            raise ValueError(f"{path.name}: its record's {key} is not text; export it again")
    norm = record["normalisation"]
    return OnnxModel(str(path), list(norm["mean"]), list(norm["std"]), ch.PCABasis.from_record(record["pca"]),
                     list(record["outputs"]), int(record.get("window_size", 256)), dict(record.get("training", {})),
                     record.get("source"), record.get("source_sha256"), recipe)


# --- the export cache: by the checkpoint's sha256, beside it or in <menet home>/onnx -------------
def need_for(stages: Sequence[str]) -> str:
    return "stages" if stages else "probability"


def cache_dirs(checkpoint: Path) -> List[Path]:
    """Where exports are looked for, in order: beside the checkpoint, then ``<menet home>/onnx``."""
    from ...user_paths import menet_home
    return [Path(checkpoint).resolve().parent, menet_home() / "onnx"]


def cache_name(checkpoint: Path, sha256: str, need: str) -> str:
    return f"{Path(checkpoint).stem}.{sha256[:16]}.{need}.onnx"


def find_cached(checkpoint: Path, sha256: str, need: str) -> Optional[Path]:
    """An export of this very checkpoint: a cached one, or the ``.onnx`` of the same name beside it
    (the model asset installed with its ``.pt``) when its record names the checkpoint's sha256."""
    for folder in cache_dirs(checkpoint):
        for candidate_need in (need, "stages"):  # the stages graph also serves the probability alone
            candidate = folder / cache_name(checkpoint, sha256, candidate_need)
            if candidate.is_file():
                return candidate
    sibling = Path(checkpoint).with_suffix(".onnx")
    if sibling.is_file():
        try:
            model = read_onnx_model(sibling)
        except (ValueError, KeyError, ImportError):
            return None
        if model.source_sha256 == sha256 and (need == "probability" or model.has_stages):
            return sibling
    return None


def writable_cache_path(checkpoint: Path, sha256: str, need: str) -> Path:
    """Beside the checkpoint when that folder is writable, else ``<menet home>/onnx``."""
    for folder in cache_dirs(checkpoint):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder / cache_name(checkpoint, sha256, need)
    raise OSError(f"no writable folder for the ONNX export of {Path(checkpoint).name} "
                  f"(tried {', '.join(str(d) for d in cache_dirs(checkpoint))})")
