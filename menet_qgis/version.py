"""The version of this menet_qgis, from its one source: ``version=`` in the plugin's ``metadata.txt``.

``metadata.txt`` sits beside the package in the plugin ZIP and in a ``pip install`` (both copy it into
``menet_qgis/``), and one folder up in the source checkout; ``pyproject.toml`` takes the wheel's version
from the same line (setup.py).  Standard library only: a Dask worker imports this to say which
version it has before any scene is sent to it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parent


def read_metadata_version(path) -> Optional[str]:
    """``version=`` of a QGIS plugin ``metadata.txt``, or None when the file or the line is missing."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "version" and value.strip():
            return value.strip()
    return None


def version() -> str:
    """This package's version ("unknown" when no metadata.txt is found beside it or in its checkout)."""
    for path in (PACKAGE_DIR / "metadata.txt", PACKAGE_DIR.parent / "metadata.txt"):
        found = read_metadata_version(path)
        if found:
            return found
    return "unknown"
