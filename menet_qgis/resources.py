"""Where the plugin's resources (icon, default model, example models) live.

In the repository they sit in ``resources/`` beside the package; in the
installed plugin (``make package``) they are copied into the plugin folder.
The plugin ZIP ships no weights: the default model is installed into the
user's model folder ("Install model"), or comes inside the offline ZIP.
"""
from pathlib import Path

from .user_paths import installed_models_dir

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_NAME = "menet_coasts_v2.pt"


def resources_dir() -> Path:
    for candidate in (PACKAGE_DIR / "resources", PACKAGE_DIR.parent / "resources"):
        if candidate.is_dir():
            return candidate
    return PACKAGE_DIR / "resources"


def icon_path() -> Path:
    return resources_dir() / "icon.svg"


def shipped_model_path() -> Path:
    """The default model inside the plugin (source checkout, offline ZIP); absent from the lean ZIP."""
    return resources_dir() / "models" / DEFAULT_MODEL_NAME


def default_model_path() -> Path:
    """The installed default model first, then the shipped one; where to install it when neither exists."""
    installed = installed_models_dir() / DEFAULT_MODEL_NAME
    if installed.is_file():
        return installed
    shipped = shipped_model_path()
    return shipped if shipped.is_file() else installed
