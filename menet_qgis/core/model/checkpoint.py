"""One checkpoint file = weights + everything needed to use them.

The file is a plain ``torch.save`` of a dict holding only tensors, numbers,
strings, lists and dicts, so it loads with ``torch.load(weights_only=True)``:
no arbitrary object is ever unpickled.  Besides the state dict it records the
architecture (name, version, input channels, head width), the channel recipe,
the PCA basis and per-channel normalisation fitted on training data, the window
size and the training metadata.
"""
from __future__ import annotations

import io
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from . import channels as ch
from .menet import (ARCHITECTURE, ARCHITECTURE_VERSION, ARCHITECTURE_VERSIONS, DEFAULT_HEAD_WIDTH, N_CHANNELS, MENet,
                    find_imagenet_weights, imagenet_weight_candidates)
from ..files import atomic_write_bytes
from ...model_records import (ModelRecordError, TrainingRecord, check_checkpoint_archive, check_description,
                              check_record_types)

FORMAT = "menet_qgis.checkpoint"
FORMAT_VERSION = 1
#: Rough channel statistics of coastal Sentinel-2 reflectance, used only by
#: untrained checkpoints; trained checkpoints carry statistics fitted on their data.
UNTRAINED_MEAN = [0.06, 0.07, 0.05, 0.22, 0.15, 0.45, -0.3, 0.11, 2.0, 1.5, 0.0]
UNTRAINED_STD = [0.05, 0.05, 0.05, 0.12, 0.09, 0.35, 0.35, 0.1, 2.0, 1.5, 0.2]
#: Widths a checkpoint's head may record: the plugin trains 64 (refinement: 0 to 256, options.py); the bound
#: keeps a crafted record from building a network of any size.
MAX_HEAD_WIDTH = 1024


class CheckpointError(ValueError):
    """A model file that cannot be used; the message says why."""


@dataclass
class ModelBundle(TrainingRecord):
    """A loaded checkpoint: the model plus what the pipeline needs to feed it."""

    model: MENet
    norm_mean: List[float]
    norm_std: List[float]
    pca: ch.PCABasis
    window_size: int = 256
    training: Dict = field(default_factory=dict)
    path: Optional[str] = None
    recipe: ch.Recipe = ch.RECIPE_V1




def new_bundle(head_width: int = DEFAULT_HEAD_WIDTH, imagenet_state=None, seed: Optional[int] = None,
               recipe: ch.Recipe = ch.DEFAULT_RECIPE, refine_width: int = 0, label_styles: int = 1) -> ModelBundle:
    """An untrained model with placeholder statistics (tests, demos, start of training)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = MENet(ch.N_CHANNELS, head_width, imagenet_state, refine_width, label_styles)
    return ModelBundle(model, list(UNTRAINED_MEAN), list(UNTRAINED_STD), recipe.default_pca(),
                       training={"trained": False, "note": "untrained: random weights"}, recipe=recipe)


def saved_bytes(bundle: ModelBundle, half: bool = False) -> int:
    """About how large ``save`` makes the file (the weights; the rest is a few KiB)."""
    return sum(v.numel() * (2 if half and v.is_floating_point() else v.element_size())
               for v in bundle.model.state_dict().values()) + 2**20


def model_description(bundle: ModelBundle) -> Dict:
    """What a model needs besides its weights (architecture, channel recipe, PCA, normalisation,
    window), as plain types: a checkpoint stores it, and so does an ONNX export."""
    return {
        "architecture": bundle.model.architecture_record(),
        "recipe": bundle.recipe.record(),
        "pca": bundle.pca.to_record(),
        "normalisation": {"mean": [float(v) for v in bundle.norm_mean], "std": [float(v) for v in bundle.norm_std]},
        "window_size": int(bundle.window_size),
    }


def save(bundle: ModelBundle, path, half: bool = False) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in bundle.model.state_dict().items()}
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **model_description(bundle),
              "training": bundle.training, "state_dict": state}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialised in memory first: torch's own file writer turns a full disk into
    # "[enforce fail at inline_container.cc] unexpected pos"; a plain write names it.
    buffer = io.BytesIO()
    torch.save(record, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def load(path) -> ModelBundle:
    """Load and validate; every refusal is a ``CheckpointError`` naming the problem."""
    path = Path(path)
    record = read_record(path)
    arch = record["architecture"]
    model = MENet(ch.N_CHANNELS, int(arch.get("head_width", DEFAULT_HEAD_WIDTH)),
                  refine_width=int(arch.get("refine_width", 0)))
    check_weights_fit(record["state_dict"], model, path.name, arch["version"])  # before any tensor is copied
    state = {k: v.float() if v.is_floating_point() else v for k, v in record["state_dict"].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path.name}: weights do not fit {ARCHITECTURE} v{arch['version']} "
                              f"({first_sentence(exc) or type(exc).__name__})") from None
    model.eval()
    norm = record["normalisation"]
    return ModelBundle(model, list(norm["mean"]), list(norm["std"]), ch.PCABasis.from_record(record["pca"]),
                       int(record.get("window_size", 256)), dict(record.get("training", {})), str(path),
                       ch.recipe_for(record["recipe"]))


def check_weights_fit(state: Dict[str, torch.Tensor], model: torch.nn.Module, label: str, version) -> None:
    """Every weight the architecture has, under its name and in its shape, and nothing else, checked on the
    tensors' shapes alone: ``load_state_dict`` would say the same, but only after each tensor had been
    converted to fp32, which for a crafted file means allocating whatever shape it claims."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [k for k in want if k in state and tuple(state[k].shape) != want[k]]
    if missing or unexpected or wrong:
        what = (f"size mismatch for {wrong[0]}: the file has {list(state[wrong[0]].shape)}, the architecture "
                f"{list(want[wrong[0]])}" if wrong else
                f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}" if missing else
                f"unexpected {', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''}")
        raise CheckpointError(f"{label}: weights do not fit {ARCHITECTURE} v{version} ({what})")


def check_stored_tensors(tensors: Dict, path: Path, error=ValueError) -> None:
    """Each tensor laid out as ``torch.save`` writes weights (contiguous, in bytes of its own) and all of them
    together no larger than the file.  A crafted file can hold views that repeat a few stored bytes (zero
    strides: ``expand``, or many views of one storage): they pass ``torch.load`` and every shape check
    yet turn into gigabytes the moment they are copied (8.8 GB measured from a 9 kB file)."""
    total = 0
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise error(f"{path.name}: weight {name} is a view (shape {list(tensor.shape)}, strides "
                        f"{list(tensor.stride())}), not stored as torch.save writes weights; refused: copying it "
                        "would take far more memory than the file holds")
        total += tensor.numel() * tensor.element_size()
    if total > path.stat().st_size:
        raise error(f"{path.name}: its weights claim {total / 1e6:.1f} MB in a file of "
                    f"{path.stat().st_size / 1e6:.1f} MB (tensors sharing their bytes); refused: copying them "
                    "would take far more memory than the file holds")


def read_pca(path) -> ch.PCABasis:
    """The checkpoint's PCA basis, validated, without building the network."""
    return ch.PCABasis.from_record(read_record(Path(path))["pca"])


def read_recipe(path) -> ch.Recipe:
    """The checkpoint's channel recipe, validated, without building the network."""
    return ch.recipe_for(read_record(Path(path))["recipe"])


#: What we say about a file whose pickle holds anything but tensors and plain data.
UNSAFE_PICKLE = ("refused: the file contains Python objects that could run code; "
                 "only weights-only checkpoints are loaded")


def first_sentence(text: str, limit: int = 240) -> str:
    """The first sentence of an error message on one line, never cut mid-sentence
    (a sentence longer than ``limit`` is cut at a word and marked with '…')."""
    text = " ".join(str(text).split())
    if not text:
        return ""
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = match.group(1) if match else text
    if len(sentence) > limit:
        head = sentence[:limit]  # at the last space; a first word longer than the limit (a path) stays whole
        sentence = (head.rsplit(" ", 1)[0] if " " in head else sentence.split(" ", 1)[0]) + " …"
    return sentence


def load_weights_only(path, what: str, kind: str, error=ValueError):
    """``torch.load(weights_only=True)`` with one-line errors: missing, empty, code-carrying
    or unreadable files each get their own message (``error`` is the exception type raised)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise error(f"{path.name} is empty (0 bytes): was it cut short while copying or saving?")
    try:  # before torch reads it: no compressed entry unpacks into gigabytes
        with zipfile.ZipFile(path) as archive:
            check_checkpoint_archive(archive, path.stat().st_size, path.name)
    except ModelRecordError as exc:
        raise error(str(exc)) from None
    except Exception:  # noqa: BLE001 (not a zip: a legacy torch file, or a damaged one; zipfile raises many
        pass           # types for those, even is_zipfile does): torch says what is wrong with it below
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "unsupported global" in str(exc).lower():
            raise error(f"{path.name}: {UNSAFE_PICKLE}") from None
        raise error(f"{path.name} is not a readable {kind} ({first_sentence(exc) or type(exc).__name__})") from None
    except Exception as exc:  # torch raises many types for corrupt/foreign files
        detail = first_sentence(exc)
        raise error(f"{path.name} is not a readable {kind} (corrupt, truncated or another format: "
                    f"{type(exc).__name__}{': ' + detail if detail else ''})") from None


def read_record(path: Path) -> Dict:
    """The checkpoint's dict after every check but the weights' fit."""
    record = load_weights_only(path, "model file", "ME-Net checkpoint", CheckpointError)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path.name} is not an ME-Net checkpoint (no '{FORMAT}' header)")
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path.name} has checkpoint format v{record.get('format_version')}, this plugin reads v{FORMAT_VERSION}")
    check_record_types(record, path.name, CheckpointError)
    arch = record.get("architecture", {})
    if arch.get("name") != ARCHITECTURE or arch.get("version") not in ARCHITECTURE_VERSIONS:
        raise CheckpointError(f"{path.name} is for architecture {arch.get('name')} v{arch.get('version')}, "
                              f"this plugin runs {ARCHITECTURE} v1 to v{ARCHITECTURE_VERSION}")
    if arch.get("version") == 1 and arch.get("refine_width"):
        raise CheckpointError(f"{path.name}: architecture v1 has no refinement, yet refine_width is set")
    for key, low, high in (("head_width", 1, MAX_HEAD_WIDTH), ("refine_width", 0, 256)):
        value = arch.get(key, DEFAULT_HEAD_WIDTH if key == "head_width" else 0)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise CheckpointError(f"{path.name}: its architecture's {key} is {value!r:.40}, this plugin builds "
                                  f"{low} to {high}")
    try:
        recipe = ch.recipe_for(record.get("recipe", {}))
    except ValueError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from None
    if arch.get("in_channels") != ch.N_CHANNELS:
        raise CheckpointError(f"{path.name} expects {arch.get('in_channels')} input channels, the recipe gives {ch.N_CHANNELS}")
    check_description(record, path.name, ch.N_CHANNELS, len(recipe.source_bands), CheckpointError)
    state = record.get("state_dict")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path.name} holds no weights (state_dict of tensors)")
    check_stored_tensors(state, path, CheckpointError)
    return record


def load_imagenet_state(path: Optional[str] = None, log: Callable[[str], None] = print) -> Optional[Dict[str, torch.Tensor]]:
    """Read torchvision's ImageNet ResNet-101 state dict if present; say which way it went."""
    found = find_imagenet_weights(path)
    if found is None:
        log("no ImageNet ResNet-101 weights found (looked in "
            + ", ".join(str(p) for p in imagenet_weight_candidates()) + "): backbone starts from random init")
        return None
    state = load_weights_only(found, "ImageNet weight file", "torchvision ImageNet weight file")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{found.name} is not a torchvision ResNet-101 weight file (no state dict of tensors)")
    check_stored_tensors(state, Path(found))
    log(f"ImageNet ResNet-101 weights from {found}; conv1 = mean of the RGB kernels x 3/{N_CHANNELS}")
    return state
