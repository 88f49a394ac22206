"""Raster reading and writing with rasterio: windowed, thread-safe, atomic.

Reads go through ``rasterio.windows.Window`` on per-thread dataset handles
(a GDAL dataset must not be shared between threads).  Outputs are written to a
hidden temporary file beside the target and renamed into place only when the
run succeeds, so a cancelled or failed run never leaves a half-written layer.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import RasterioIOError
from rasterio.windows import Window, from_bounds

from .compat import compose
from .bands import InputPlan, plan_input


#: Window edges closer than this (in pixels) to a grid line snap to it.
SNAP_TOLERANCE = 1e-6


#: GDAL block cache for headless runs (CLI, benchmark). GDAL's default is 5 % of RAM,
#: which on a whole tile fills with decoded input and dirty output blocks that are
#: never needed again (each window is read once, each strip written once).
HEADLESS_GDAL_CACHE_MB = 256


def limit_gdal_cache(megabytes: int = HEADLESS_GDAL_CACHE_MB) -> None:
    """Cap GDAL's block cache unless the user set GDAL_CACHEMAX.  Only for processes
    we own: inside QGIS the cache is QGIS's (and the user's) to size."""
    if "GDAL_CACHEMAX" not in os.environ:
        from osgeo import gdal
        gdal.SetCacheMax(megabytes * 2**20)


class InputError(ValueError):
    """An input raster that cannot be processed; the message says why."""


@dataclass(frozen=True)
class Area:
    """The processed part of the input, in input pixels (the whole raster by default)."""

    row_off: int
    col_off: int
    height: int
    width: int


class RasterInput:
    """An opened input raster plus the plan for turning its bands into model input."""

    def __init__(self, path, band_numbers: Optional[Sequence[int]] = None, dn_offset: Optional[float] = None,
                 bounds: Optional[Tuple[float, float, float, float]] = None):
        self.path = str(path)
        is_gdal_name = "://" in self.path or self.path.startswith("/vsi") or re.match(r"^[A-Z0-9_]+:", self.path)
        if not is_gdal_name and not Path(self.path).exists():
            raise InputError(f"input raster not found: {self.path}")
        try:
            with rasterio.open(self.path) as ds:
                self.crs = ds.crs
                self.transform = ds.transform
                self.full_width, self.full_height = ds.width, ds.height
                self.nodata = ds.nodata
                self.dtype = ds.dtypes[0]
                descriptions = [d or "" for d in ds.descriptions]
                tags = [ds.tags(i) for i in range(1, ds.count + 1)]
                dataset_tags = ds.tags()
        except RasterioIOError as exc:
            raise InputError(f"{Path(self.path).name} is not a raster GDAL can read ({str(exc).splitlines()[0][:160]})") from None
        if self.crs is None:
            raise InputError(f"{Path(self.path).name} has no coordinate reference system; assign one first")
        if self.transform.is_identity or self.transform.b != 0 or self.transform.d != 0:
            if self.transform.is_identity:
                raise InputError(f"{Path(self.path).name} has no georeferencing (identity geotransform)")
            raise InputError(f"{Path(self.path).name} is rotated; warp it to a north-up grid first")
        self.plan: InputPlan = plan_input(descriptions, tags, dataset_tags, self.dtype, band_numbers, dn_offset)
        self.area = self._area(bounds)
        self._local = threading.local()
        self._handles: List = []
        self._lock = threading.Lock()

    # --- geometry -------------------------------------------------------
    def _area(self, bounds) -> Area:
        full = Window(0, 0, self.full_width, self.full_height)
        if bounds is None:
            return Area(0, 0, self.full_height, self.full_width)
        try:
            win = snapped_window(self.transform, full, bounds)
        except ValueError:
            raise InputError(f"the processing extent {tuple(bounds)} does not overlap {Path(self.path).name}") from None
        return Area(int(win.row_off), int(win.col_off), int(win.height), int(win.width))

    @property
    def width(self) -> int:
        return self.area.width

    @property
    def height(self) -> int:
        return self.area.height

    def area_transform(self, stride: int = 1) -> Affine:
        """Transform of the processed area at ``stride`` x the input pixel size (same origin)."""
        return compose(self.transform, Affine.translation(self.area.col_off, self.area.row_off), Affine.scale(stride))

    # --- reading --------------------------------------------------------
    def _dataset(self):
        ds = getattr(self._local, "ds", None)
        if ds is None:
            ds = rasterio.open(self.path)
            self._local.ds = ds
            with self._lock:
                self._handles.append(ds)
        return ds

    def read(self, y0: int, x0: int, size: int) -> Tuple[np.ndarray, np.ndarray]:
        """(bands, size, size) float32 values and a (size, size) validity mask for
        the window at area pixel (y0, x0).  Parts outside the area and no-data
        pixels are marked invalid and hold 0, never NaN."""
        h = min(size, self.height - y0)
        w = min(size, self.width - x0)
        win = Window(self.area.col_off + x0, self.area.row_off + y0, w, h)
        data = self._dataset().read(self.plan.band_indexes, window=win, out_dtype="float32")
        valid = np.isfinite(data).all(axis=0)
        if self.nodata is not None and not (isinstance(self.nodata, float) and math.isnan(self.nodata)):
            valid &= (data != self.nodata).all(axis=0)
        if self.plan.zero_is_nodata:
            valid &= (data != 0).all(axis=0)
        data[:, ~valid] = 0.0
        if h < size or w < size:
            data = np.pad(data, ((0, 0), (0, size - h), (0, size - w)))
            valid = np.pad(valid, ((0, size - h), (0, size - w)), constant_values=False)
        return data, valid

    def close(self) -> None:
        with self._lock:
            for ds in self._handles:
                ds.close()
            self._handles.clear()
        self._local = threading.local()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Read once at import: ``os.umask`` can only be read by setting it, which is not thread-safe.
UMASK = _umask()


def temp_beside(path: Path) -> Path:
    """A hidden temporary file in ``path``'s folder (same file system: the final rename is
    atomic), with the permissions a normally created file would get (mkstemp makes 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.stem + ".", suffix=".partial" + path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~UMASK)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it only if the block succeeds."""
    tmp = temp_beside(path)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def snapped_window(transform, within: Window, bounds: Sequence[float]) -> Window:
    """The part of ``within`` covering ``bounds`` (xmin, ymin, xmax, ymax), grown outwards
    to whole pixels of ``transform``'s grid; ValueError when nothing is left."""
    w = from_bounds(*bounds, transform=transform)
    c0 = max(within.col_off, math.floor(w.col_off + SNAP_TOLERANCE))
    r0 = max(within.row_off, math.floor(w.row_off + SNAP_TOLERANCE))
    c1 = min(within.col_off + within.width, math.ceil(w.col_off + w.width - SNAP_TOLERANCE))
    r1 = min(within.row_off + within.height, math.ceil(w.row_off + w.height - SNAP_TOLERANCE))
    if c1 <= c0 or r1 <= r0:
        raise ValueError(f"the area {tuple(round(v, 3) for v in bounds)} does not overlap the raster "
                         "(or the other clip area)")
    return Window(c0, r0, c1 - c0, r1 - r0)


class AtomicRaster:
    """A GeoTIFF written to a temporary file and renamed into place on ``commit``.

    All calls must come from one thread (the engine's writer thread).
    """

    def __init__(self, path, width: int, height: int, count: int, crs, transform: Affine,
                 descriptions: Optional[Sequence[str]] = None, nodata: float = float("nan")):
        self.path = Path(path)
        self.tmp = temp_beside(self.path)
        profile = dict(driver="GTiff", width=width, height=height, count=count, dtype="float32", crs=crs,
                       transform=transform, nodata=nodata, compress="deflate", predictor=3,
                       BIGTIFF="IF_SAFER")
        if width >= 16 and height >= 16:
            profile.update(tiled=True, blockxsize=256 if width >= 256 else 16 * (width // 16),
                           blockysize=256 if height >= 256 else 16 * (height // 16))
        try:
            self.ds = rasterio.open(self.tmp, "w", **profile)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        for i, text in enumerate(descriptions or [], 1):
            self.ds.set_band_description(i, text)

    def write_rows(self, row0: int, array: np.ndarray) -> None:
        """Write a (count, rows, width) block starting at output row ``row0``."""
        self.ds.write(array.astype(np.float32, copy=False), window=Window(0, row0, array.shape[2], array.shape[1]))

    def close(self) -> None:
        """Finish writing (flushes GDAL's caches); the file is still the temporary one."""
        if not self.ds.closed:
            self.ds.close()

    def commit(self) -> Path:
        self.close()
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        try:
            self.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def commit_all(rasters: Sequence["AtomicRaster"]) -> None:
    """Close every output first (where writing errors show up), then rename them all
    into place, so a failure while writing replaces none of the previous outputs."""
    for raster in rasters:
        raster.close()
    for raster in rasters:
        raster.commit()


def check_writable(path) -> Path:
    """Fail early, before any compute, if the output cannot be written there."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"output {path.name} must be a GeoTIFF (.tif)")
    if path.is_dir():
        raise InputError(f"output {path} is a folder, not a file")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".menet-write-check.")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise InputError(f"cannot write output to {parent}: {exc.strerror or exc}") from None
    return path


def raster_profile(path) -> Dict:
    """Georeferencing of a raster, for tests and reports."""
    with rasterio.open(path) as ds:
        return {"crs": ds.crs, "transform": ds.transform, "width": ds.width, "height": ds.height,
                "count": ds.count, "nodata": ds.nodata, "dtype": ds.dtypes[0]}
