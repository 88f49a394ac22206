"""Library version differences the core has to bridge, between Debian 12 (QGIS 3.22) and Debian 13+/sid.

- affine 3.0 spells composition and point mapping with ``@`` and warns (PendingDeprecationWarning)
  on ``*``; affine 2.x only has ``*``.
- GDAL >= 3.9 warns (FutureWarning) on the first GDAL/OGR/OSR call of a process that has not said
  whether it wants exceptions, because GDAL 4 turns them on.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from affine import Affine

_HAS_MATMUL = hasattr(Affine, "__matmul__")


def compose(first: Affine, *then: Affine) -> Affine:
    """``first @ then[0] @ then[1] ...``: ``first`` applied last, as with affine's own operator."""
    result = first
    for transform in then:
        result = result @ transform if _HAS_MATMUL else result * transform
    return result


def apply(transform: Affine, col: float, row: float) -> tuple:
    """The world (x, y) of pixel position (col, row)."""
    return transform @ (col, row) if _HAS_MATMUL else transform * (col, row)


@contextlib.contextmanager
def osgeo_exceptions() -> Iterator[None]:
    """GDAL, OGR and OSR calls inside raise RuntimeError on failure, as they will by default in GDAL 4.

    Only for the calls inside: the process-wide setting (QGIS's, other plugins') is restored on exit.
    GDAL >= 3.7 has ``ExceptionMgr`` for that (thread-local); older GDAL is switched and switched back.
    """
    from osgeo import gdal, ogr, osr
    with contextlib.ExitStack() as stack:
        for module in (gdal, ogr, osr):
            if hasattr(module, "ExceptionMgr"):
                stack.enter_context(module.ExceptionMgr(useExceptions=True))
            elif not module.GetUseExceptions():
                module.UseExceptions()
                stack.callback(module.DontUseExceptions)
        yield
