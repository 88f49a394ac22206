"""Where the plugin keeps per-user state: the managed Python environment and installed models.

One place for it, QGIS-free, so the Processing layer, the worker and the CLI
agree.  ``MENET_HOME`` overrides everything (tests, servers); inside QGIS it is
``<QGIS profile>/menet_qgis``; elsewhere ``$XDG_DATA_HOME/menet_qgis``
(``~/.local/share/menet_qgis``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict

#: The environment variable that names the menet home (and so the model store) for every process.
HOME_VARIABLE = "MENET_HOME"


def qgis_profile_dir():
    """The active QGIS profile folder when running inside QGIS, else None (never imports QGIS itself)."""
    if "qgis.core" not in sys.modules:
        return None
    from qgis.core import QgsApplication
    if QgsApplication.instance() is None:
        return None
    return Path(QgsApplication.qgisSettingsDirPath())


def menet_home() -> Path:
    if os.environ.get(HOME_VARIABLE):
        return Path(os.environ[HOME_VARIABLE])
    profile = qgis_profile_dir()
    if profile is not None:
        return profile / "menet_qgis"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "menet_qgis"


def managed_env_dir() -> Path:
    """The virtual environment 'Install ME-Net dependencies' creates."""
    return menet_home() / "env"


def managed_python(env_dir=None) -> Path:
    """The Python of the managed environment (or of the venv at ``env_dir``)."""
    env = Path(env_dir) if env_dir else managed_env_dir()
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def installed_models_dir() -> Path:
    """Models installed with 'Install model' (verified by sha256)."""
    return menet_home() / "models"


def engine_environment(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` with MENET_HOME set to this process's menet home.  The engine process QGIS starts has no QGIS
    to ask for the profile: without this it would look for models in ~/.local/share/menet_qgis instead of
    the profile's store where 'Install model' put them (and keep its ONNX cache elsewhere too)."""
    return dict(env, **{HOME_VARIABLE: str(menet_home())})
