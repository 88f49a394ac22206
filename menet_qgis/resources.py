"""Where the plugin's resources (icon, default model, example models) live.

In the repository they sit in ``resources/`` beside the package; in the
installed plugin (``make package``) they are copied into the plugin folder.
The plugin ZIP ships no weights: the default model is installed into the
user's model store ("Install model"), or comes inside the offline ZIP.
Which file is the default is decided in one place: ``model_store.find_default_model``
(through ``jobs.resolve_model`` for every front end).
"""
from pathlib import Path


PACKAGE_DIR = Path(__file__).resolve().parent
#: The default model's name without its suffix; installed as .onnx (the asset) and/or .pt (torch).
DEFAULT_MODEL_BASE = "menet_coasts_v2"
#: The default model as the asset every runtime maps with (ONNX Runtime, OpenVINO; no torch).
DEFAULT_ASSET_NAME = DEFAULT_MODEL_BASE + ".onnx"
#: The default model as a torch checkpoint (training, fine-tuning, CUDA).
DEFAULT_CHECKPOINT_NAME = DEFAULT_MODEL_BASE + ".pt"


def resources_dir() -> Path:
    for candidate in (PACKAGE_DIR / "resources", PACKAGE_DIR.parent / "resources"):
        if candidate.is_dir():
            return candidate
    return PACKAGE_DIR / "resources"


def icon_path() -> Path:
    return resources_dir() / "icon.svg"


def shipped_model_path(name: str = DEFAULT_CHECKPOINT_NAME) -> Path:
    """A default model file inside the plugin (source checkout, offline ZIP); absent from the lean ZIP."""
    return resources_dir() / "models" / name
