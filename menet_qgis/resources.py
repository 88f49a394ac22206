"""Where the plugin's resources (icon, default model, example models) live.

In the repository they sit in ``resources/`` beside the package; in the
installed plugin (``make package``) they are copied into the plugin folder.
"""
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_NAME = "menet_jambeli_v1.pt"


def resources_dir() -> Path:
    for candidate in (PACKAGE_DIR / "resources", PACKAGE_DIR.parent / "resources"):
        if candidate.is_dir():
            return candidate
    return PACKAGE_DIR / "resources"


def icon_path() -> Path:
    return resources_dir() / "icon.svg"


def default_model_path() -> Path:
    return resources_dir() / "models" / DEFAULT_MODEL_NAME
