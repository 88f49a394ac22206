"""Raster reading and writing with rasterio: windowed, thread-safe, atomic.

Reads go through ``rasterio.windows.Window`` on per-thread dataset handles
(a GDAL dataset must not be shared between threads).  Outputs are written to a
hidden partial file beside the target (named by ``core/files.py``) and renamed
into place only when the run succeeds, so a cancelled or failed run never leaves
a half-written layer.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import RasterioIOError
from rasterio.windows import Window, from_bounds

from ..compat import compose
from ..files import InputError, sync_file, temp_beside, write_failure
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
        try:
            from osgeo import gdal
        except ImportError:  # rasterio's PyPI wheels bring GDAL without its Python bindings:
            os.environ["GDAL_CACHEMAX"] = str(megabytes)  # read when GDAL first sizes its cache
            return
        gdal.SetCacheMax(megabytes * 2**20)


#: Sample dtypes Sentinel-2 products and their usual exports use: DN (uint16, also int16/int32
#: after some tools) and reflectance (float32/float64).
ACCEPTED_DTYPES = ("uint16", "int16", "uint32", "int32", "float32", "float64")


@contextlib.contextmanager
def gdal_errors() -> Iterator[List[str]]:
    """Collect GDAL's error messages (CE_Failure and worse) raised on *this thread* while
    the block runs, instead of GDAL printing them.  rasterio's ``close()`` and buffered
    ``write()`` do not raise on failed writes (a full disk), so writers check this list."""
    messages: List[str] = []
    try:
        from osgeo import gdal
    except ImportError:  # no GDAL Python bindings: writes are still checked by verify_geotiff
        yield messages
        return

    def handler(err_class, err_no, message):
        if err_class >= gdal.CE_Failure:
            messages.append(" ".join(str(message).split()))

    gdal.PushErrorHandler(handler)
    try:
        yield messages
    finally:
        gdal.PopErrorHandler()


def verify_geotiff(path: Path, expect: Tuple[int, int, int]) -> Optional[str]:
    """A cheap check that a finished GeoTIFF is whole: it opens with the expected size and
    band count, and every block's bytes lie inside the file.  None when fine, else why not."""
    size = os.path.getsize(path)
    with gdal_errors() as errors:
        try:
            with rasterio.open(path) as ds:
                if (ds.count, ds.height, ds.width) != expect:
                    return f"it has {ds.count} x {ds.height} x {ds.width} values, expected {expect}"
                for (row, col), _ in ds.block_windows(1):
                    offset = ds.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1)
                    length = ds.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1)
                    if not offset or not length or int(offset) + int(length) > size:
                        return f"block {row},{col} was not written"
        except RasterioIOError as exc:
            return " ".join(str(exc).split())
    return errors[0] if errors else None


@dataclass(frozen=True)
class Area:
    """The processed part of the input, in input pixels (the whole raster by default)."""

    row_off: int
    col_off: int
    height: int
    width: int


#: Mapping refuses rasters thinner than this (px) either way: a window of the model is then almost all padding
#: and the map departs from the same pixels mapped in context (measured on the Jambeli scene: a 1-row strip
#: changes the class of 53 % of its pixels, 8 rows 5.5 %, 16 rows 4.0 %, 64 rows 2.8 %; docs/robustness.md).
MIN_MAP_SIDE = 16
#: Pixel sizes (m): the model learned Sentinel-2's 10 m pixels.  Coarser than PIXEL_WARN_M warns (a 20 m
#: stack of an L2A product's R20m bands), coarser than PIXEL_MAX_M is refused (Landsat's 30 m, MODIS...).
PIXEL_WARN_M = 12.0
PIXEL_MAX_M = 20.0
#: Mean Earth radius (m): degrees of a geographic CRS to metres at the raster's latitude.
EARTH_RADIUS_M = 6371008.8


def pixel_size_m(crs, transform: Affine, height: int) -> Optional[Tuple[float, float]]:
    """(width, height) of a pixel in metres: projected units through the CRS's unit factor (US feet too),
    degrees at the raster's central latitude; None when the CRS says neither."""
    try:
        if crs.is_geographic:
            latitude = max(-89.0, min(89.0, transform.f + transform.e * height / 2))
            per_degree = math.radians(1.0) * EARTH_RADIUS_M
            return (abs(transform.a) * per_degree * math.cos(math.radians(latitude)),
                    abs(transform.e) * per_degree)
        factor = crs.linear_units_factor[1]
    except Exception:  # rasterio's CRSError, or a CRS without units: nothing to check against
        return None
    return abs(transform.a) * factor, abs(transform.e) * factor


def resample_advice(crs, transform: Affine, width: int, height: int, name: str) -> str:
    """The gdalwarp command that brings a raster to 10 m pixels (into UTM when its CRS is geographic)."""
    stem = Path(name).stem
    if crs.is_geographic:
        lon = transform.c + transform.a * width / 2
        lat = transform.f + transform.e * height / 2
        zone = min(60, max(1, int((lon + 180) // 6) + 1))
        return (f"gdalwarp -t_srs EPSG:{(32600 if lat >= 0 else 32700) + zone} -tr 10 10 -r bilinear {name} "
                f"{stem}_10m.tif")
    ten_metres = 10 / crs.linear_units_factor[1]  # in the CRS's units (US feet...)
    return f"gdalwarp -tr {ten_metres:g} {ten_metres:g} -r bilinear {name} {stem}_10m.tif"


def check_input_exists(path: str) -> None:
    """``InputError`` for a local input path that does not exist (GDAL names such as /vsi… and
    URLs are left to GDAL), before anything slow such as loading the model."""
    is_gdal_name = "://" in path or path.startswith("/vsi") or re.match(r"^[A-Z0-9_]+:", path)
    if not is_gdal_name and not Path(path).exists():
        raise InputError(f"input raster not found: {path}")


def open_product_input(path: str):
    """The Sentinel-2 product ``path`` names as delivered (a ``.SAFE`` folder or a folder holding
    ``MTD_MSIL*.xml``, a ``.zip``, an ``MTD_MSIL*.xml``, a GDAL SENTINEL2 subdataset), found with
    ``sentinel2_product.open_product``; None for any other raster.  ``InputError`` in one line for a
    product ME-Net cannot map (a band missing, a zip holding no product)."""
    from . import sentinel2_product
    kind = sentinel2_product.product_source_name(path)
    if kind is None:
        return None
    if kind == "folder" and not (Path(path).suffix.upper() == ".SAFE" or any(Path(path).glob("MTD_MSIL*.xml"))):
        return None  # some rasters are folders (an ESRI grid): GDAL opens those
    try:
        return sentinel2_product.open_product(path)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def input_stem(path) -> str:
    """The stem outputs are named after: a file's stem, or for a Sentinel-2 product as delivered the
    product's name (``S2B_MSIL2A_20200615T153621_N0509_..._20200615T180000`` for its folder, zip,
    MTD_MSIL*.xml or subdataset names alike)."""
    from . import sentinel2_product
    text = str(path).strip()
    kind = sentinel2_product.product_source_name(text)
    if kind is None:
        return Path(text).stem
    match = sentinel2_product.SUBDATASET.match(text)
    if match:
        text = match["path"].strip('"')
    parts = [p for p in text.replace("\\", "/").split("/") if p]
    if parts and sentinel2_product.METADATA_FILE.match(parts[-1]):
        parts = parts[:-1]
    name = parts[-1] if parts else text
    for suffix in (".zip", ".SAFE"):
        if name.upper().endswith(suffix.upper()):
            name = name[:-len(suffix)]
    return name or Path(text).stem


def _product_reader(product):
    """The product's six bands on the 10 m grid, read like a rasterio dataset (``ProductReader``)."""
    from .sentinel2_product import ProductReader
    return ProductReader(product)


class ThreadHandles:
    """GDAL datasets opened once per reader thread (a GDAL handle must not be shared across threads), all
    closed together by ``close``."""

    def __init__(self):
        self._local = threading.local()
        self._handles: List = []
        self._lock = threading.Lock()

    def _keep(self, *datasets) -> None:
        with self._lock:
            self._handles.extend(datasets)

    def close(self) -> None:
        with self._lock:
            for ds in self._handles:
                ds.close()
            self._handles.clear()
        self._local = threading.local()


class RasterInput(ThreadHandles):
    """An opened input raster plus the plan for turning its bands into model input."""

    def __init__(self, path, band_numbers: Optional[Sequence[int]] = None, dn_offset: Optional[float] = None,
                 bounds: Optional[Tuple[float, float, float, float]] = None, recipe=None,
                 georeferenced: bool = True):
        """``recipe``: the model's channel recipe (which bands to find); when not given, the bands every
        recipe reads (v2's), and ``use_recipe`` (called by the engine) re-plans for the model's.
        ``georeferenced=False`` accepts rasters without CRS or geotransform (training tiles only:
        maps must land on a grid)."""
        from ..model.channels import RECIPE_V2
        self.path = str(path)
        check_input_exists(self.path)
        #: The Sentinel-2 product (``sentinel2_product.Sentinel2Product``: bands, DN offset, ``scl``) when the
        #: input is one as delivered (.SAFE folder, .zip, MTD_MSIL*.xml, SENTINEL2 subdataset); else None.
        self.product = open_product_input(self.path)
        try:
            with (_product_reader(self.product) if self.product else rasterio.open(self.path)) as ds:
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
        except ValueError as exc:  # a product whose bands do not fit together
            raise InputError(str(exc)) from None
        if self.dtype not in ACCEPTED_DTYPES:
            raise InputError(f"{Path(self.path).name} holds {self.dtype} values, which no Sentinel-2 product has; "
                             f"accepted: integer DN ({', '.join(d for d in ACCEPTED_DTYPES if 'int' in d)}) or "
                             f"reflectance ({', '.join(d for d in ACCEPTED_DTYPES if 'float' in d)})")
        if georeferenced and self.crs is None:
            raise InputError(f"{Path(self.path).name} has no coordinate reference system; assign one first")
        if georeferenced and (self.transform.is_identity or self.transform.b != 0 or self.transform.d != 0):
            if self.transform.is_identity:
                raise InputError(f"{Path(self.path).name} has no georeferencing (identity geotransform)")
            raise InputError(f"{Path(self.path).name} is rotated; warp it to a north-up grid first")
        self._plan_inputs = (descriptions, tags, dataset_tags, self.dtype, band_numbers, dn_offset)
        self.recipe = recipe or RECIPE_V2
        self.plan: InputPlan = plan_input(*self._plan_inputs, recipe=self.recipe, name=Path(self.path).name)
        self.area = self._area(bounds)
        ThreadHandles.__init__(self)

    def use_recipe(self, recipe) -> None:
        """Plan the bands for ``recipe`` (the model's): a v1 model also needs B12 (BandError if absent)."""
        if recipe is not self.recipe:
            self.plan = plan_input(*self._plan_inputs, recipe=recipe, name=Path(self.path).name)
            self.recipe = recipe

    # --- geometry -------------------------------------------------------
    def _area(self, bounds) -> Area:
        full = Window(0, 0, self.full_width, self.full_height)
        if bounds is None:
            return Area(0, 0, self.full_height, self.full_width)
        try:
            finite = len(bounds) == 4 and all(math.isfinite(float(v)) for v in bounds)
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise InputError(f"the processing extent {tuple(bounds)} is not four finite numbers (xmin, ymin, xmax, ymax)")
        try:
            win = snapped_window(self.transform, full, bounds)
        except ValueError:
            raise InputError(f"the processing extent {tuple(bounds)} does not overlap {Path(self.path).name}") from None
        return Area(int(win.row_off), int(win.col_off), int(win.height), int(win.width))

    def check_mappable(self) -> List[str]:
        """Refuse (``InputError``) a raster the model cannot map sensibly: thinner than ``MIN_MAP_SIDE`` or
        with pixels coarser than ``PIXEL_MAX_M``; the warnings for pixels coarser than ``PIXEL_WARN_M``."""
        name = Path(self.path).name
        if min(self.full_width, self.full_height) < MIN_MAP_SIDE:
            raise InputError(f"{name} is {self.full_width} x {self.full_height} px, too thin to map: the model needs "
                             f"at least {MIN_MAP_SIDE} px each way for the context around each pixel; map the "
                             "raster it was cut from (in QGIS with this area as the processing extent) and clip "
                             "the map")
        size = pixel_size_m(self.crs, self.transform, self.full_height) if self.crs is not None else None
        if size is None or max(size) <= PIXEL_WARN_M:
            return []
        seen = f"{size[0]:.3g} x {size[1]:.3g} m"
        if self.crs.is_geographic:
            seen += f" ({abs(self.transform.a):.3g}° x {abs(self.transform.e):.3g}° at its latitude)"
        advice = resample_advice(self.crs, self.transform, self.full_width, self.full_height, name)
        if max(size) > PIXEL_MAX_M:
            raise InputError(f"{name} has pixels of {seen}, coarser than the {PIXEL_MAX_M:g} m the model can map "
                             f"(it learned Sentinel-2's 10 m pixels): resample it to 10 m first, e.g. {advice}")
        return [f"{name} has pixels of {seen}; the model learned Sentinel-2's 10 m pixels and maps coarser ones "
                f"less reliably: for the best map resample it to 10 m, e.g. {advice}"]

    def context_area(self, window: int, overlap: int) -> Area:
        """The part of the raster read to map ``area``: every window of the whole raster's grid (origins at
        multiples of ``window - overlap`` from the raster's corner) that touches the area.  An extent is
        then mapped from the same windows, with the same context, as in a run over the whole raster, so a
        small extent maps as it does there; the whole raster's context is the area itself."""
        stride = window - overlap

        def span(start: int, length: int, full: int) -> Tuple[int, int]:
            last_origin = 0 if full <= window else -(-(full - window) // stride) * stride
            first = max(0, -(-(start - window + 1) // stride) * stride)     # first origin reaching into the area
            last = min(last_origin, (start + length - 1) // stride * stride)  # last origin starting inside it
            return first, min(full, last + window) - first

        row_off, height = span(self.area.row_off, self.area.height, self.full_height)
        col_off, width = span(self.area.col_off, self.area.width, self.full_width)
        return Area(row_off, col_off, height, width)

    @property
    def width(self) -> int:
        return self.area.width

    @property
    def height(self) -> int:
        return self.area.height

    def area_transform(self, stride: int = 1, row_off: Optional[int] = None, col_off: Optional[int] = None) -> Affine:
        """Transform of the processed area at ``stride`` x the input pixel size (same origin), or of a grid
        starting at input pixel (``row_off``, ``col_off``)."""
        row_off = self.area.row_off if row_off is None else row_off
        col_off = self.area.col_off if col_off is None else col_off
        return compose(self.transform, Affine.translation(col_off, row_off), Affine.scale(stride))

    # --- reading --------------------------------------------------------
    def _dataset(self):
        ds = getattr(self._local, "ds", None)
        if ds is None:
            ds = _product_reader(self.product) if self.product else rasterio.open(self.path)
            self._local.ds = ds
            self._keep(ds)
        return ds

    def read(self, y0: int, x0: int, size: int, area: Optional[Area] = None) -> Tuple[np.ndarray, np.ndarray]:
        """(bands, size, size) float32 values and a (size, size) validity mask for
        the window at pixel (y0, x0) of ``area`` (default: the processed area).  Parts
        outside the area and no-data pixels are marked invalid and hold 0, never NaN."""
        area = area or self.area
        h = min(size, area.height - y0)
        w = min(size, area.width - x0)
        data, valid = self.read_pixels(area.row_off + y0, area.col_off + x0, h, w)
        if h < size or w < size:
            data = np.pad(data, ((0, 0), (0, size - h), (0, size - w)))
            valid = np.pad(valid, ((0, size - h), (0, size - w)), constant_values=False)
        return data, valid

    def read_pixels(self, row_off: int, col_off: int, h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
        """(bands, h, w) float32 values and an (h, w) validity mask of the raster's pixels from (row_off,
        col_off) (whole-raster pixel coordinates); no-data pixels are invalid and hold 0."""
        win = Window(col_off, row_off, w, h)
        with gdal_errors() as errors:  # GDAL's 20-30 lines per bad block become one message
            try:
                data = self._dataset().read(self.plan.band_indexes, window=win, out_dtype="float32")
            except RasterioIOError as exc:
                errors.append(" ".join(str(exc).split()))
        if errors:
            raise InputError(f"{Path(self.path).name} is corrupt or truncated at window col {win.col_off}, "
                             f"row {win.row_off} ({w} x {h} px): {errors[0][:200]}")
        valid = np.isfinite(data).all(axis=0)
        if self.nodata is not None and not (isinstance(self.nodata, float) and math.isnan(self.nodata)):
            valid &= (data != self.nodata).all(axis=0)
        if self.plan.zero_is_nodata:
            valid &= (data != 0).all(axis=0)
        data[:, ~valid] = 0.0
        return data, valid

    def reflectance(self, row_off: int, col_off: int, h: int, w: int) -> Optional[np.ndarray]:
        """(bands, h, w) float32 reflectance of the recipe's source bands (``recipe.source_bands`` order), NaN
        where the input has no data; None for inputs that are not Sentinel-2 bands (ready-made stacks)."""
        if self.plan.kind != "sentinel2":
            return None
        data, valid = self.read_pixels(row_off, col_off, h, w)
        data = (data + np.float32(self.plan.offset)) * np.float32(self.plan.scale)
        data[:, ~valid] = np.nan
        return data


#: Plausibility limits for the sampled values (reflectance; DN before the offset).
MAX_MEDIAN_REFLECTANCE = 2.0   # scenes have median reflectance well below 1; x10000 DN give hundreds
PLAUSIBILITY_WINDOWS = 4       # 4 x 4 windows spread over the area
PLAUSIBILITY_SIZE = 128


#: Refuse a value found in every band of at least this share of the sampled valid pixels: no surface has
#: the same reflectance in all six bands, so it is a fill value (-9999, 65535, 0, -32768...) nobody declared.
FILL_SHARE = 0.01


def check_undeclared_fill(source: "RasterInput", raw: np.ndarray, seen: str) -> None:
    """``InputError`` when one value fills every band of ``FILL_SHARE`` or more of the sampled pixels ``raw``
    (bands x pixels): an undeclared no-data value, read as data, changes the class of the pixels around it."""
    uniform = (raw == raw[:1]).all(axis=0)
    if not uniform.any():
        return
    values, counts = np.unique(raw[0, uniform], return_counts=True)
    value, share = float(values[counts.argmax()]), counts.max() / raw.shape[1]
    if share < FILL_SHARE:
        return
    if source.plan.scale != 1.0:  # DN: the raw value before the offset
        value = round(value)
    name = Path(source.path).name
    raise InputError(f"{name} holds {value:g} in every band of {share:.1%} of the sampled pixels ({seen}): a no-data "
                     f"value the raster does not declare, read as data it changes the map of the pixels around "
                     f"it. Declare it, e.g. gdal_translate -of VRT -a_nodata {value:g} {name} "
                     f"{Path(name).stem}_nodata.vrt (or gdal_edit.py -a_nodata {value:g} {name}), and map that")


def check_plausible_values(source: RasterInput, warn: Callable[[str], None]) -> None:
    """Read a sample of windows spread over the area before the run and check the values
    make sense as Sentinel-2: refuse (``InputError``) where nothing sensible can come out,
    warn where the result is doubtful.  Each message names what was seen and the likely cause."""
    plan, name = source.plan, Path(source.path).name
    if plan.kind != "sentinel2":
        return  # ready-made 11-channel stacks carry indices and PCA: no single physical range
    size = min(PLAUSIBILITY_SIZE, source.height, source.width)
    rows = sorted({round((source.height - size) * i / max(1, PLAUSIBILITY_WINDOWS - 1)) for i in range(PLAUSIBILITY_WINDOWS)})
    cols = sorted({round((source.width - size) * i / max(1, PLAUSIBILITY_WINDOWS - 1)) for i in range(PLAUSIBILITY_WINDOWS)})
    samples = []
    for y0 in rows:
        for x0 in cols:
            data, valid = source.read(y0, x0, size)
            samples.append(data[:, valid])
    raw = np.concatenate(samples, axis=1)
    if raw.shape[1] == 0:
        return  # no valid pixel in the sample: the engine reports an all-no-data input itself
    count = len(rows) * len(cols)
    seen = f"{raw.shape[1]} valid pixels in {count} window{'s' if count != 1 else ''} sampled across it"
    if plan.scale == 1.0:  # float reflectance
        if not raw.any():
            raise InputError(f"{name} holds only zeros ({seen}): there is nothing to map. Likely an empty or "
                             "failed export; if 0 marks missing data, set 0 as the raster's no-data value")
        median = float(np.median(raw))
        if median > MAX_MEDIAN_REFLECTANCE:
            cause = ("reflectance x 10000 stored as float: divide it by 10000, or store it as integer (uint16) "
                     "so it is read as DN" if median > 100 else "reflectance in percent: divide it by 100")
            raise InputError(f"{name} is a {source.dtype} raster, read as reflectance (0-1), but its values look "
                             f"scaled: median {median:.4g}, maximum {float(raw.max()):.4g} ({seen}). Likely {cause}")
        check_undeclared_fill(source, raw, seen)
        return
    negative = raw < 0
    if negative.any():
        share = float(negative.any(axis=0).mean())
        values, counts = np.unique(raw[negative], return_counts=True)
        common = float(values[counts.argmax()])
        cause = (f"most are {common:g}, likely an undeclared no-data value: set it as the raster's no-data"
                 if counts.max() > 0.5 * counts.sum() else
                 "likely uint16 DN above 32767 wrapped into int16, or the offset already subtracted")
        message = (f"{name} has negative DN in {share:.1%} of the sampled pixels (minimum {float(raw.min()):g}; "
                   f"{seen}); Sentinel-2 DN are never negative: {cause}")
        if share > 0.5:
            raise InputError(message)
        check_undeclared_fill(source, raw, seen)  # a fill value is refused, not only warned about
        warn(message + "; these pixels give wrong probabilities")
        return
    check_undeclared_fill(source, raw, seen)


def require_free_space(folder, nbytes: int, what: str) -> None:
    """Refuse work whose result cannot be saved: ``nbytes`` must fit in ``folder``'s file system."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if nbytes > free:
        raise InputError(f"not enough free space for {what} at {folder}: needs about {nbytes / 2**20:.0f} MiB, "
                         f"{free / 2**20:.0f} MiB free")


def check_free_space(needs: Dict[Path, int], reporter_warn: Callable[[str], None], what: str = "outputs",
                     worst_compression: float = 2.0) -> None:
    """Compare estimated uncompressed output sizes with the free space of each target file system.
    Refuse when even ``worst_compression``:1 (deflate on float32 rarely does better) cannot fit;
    warn when only the uncompressed size does not fit."""
    by_fs: Dict[int, List] = {}
    for path, size in needs.items():
        folder = Path(path).parent
        try:
            dev = os.stat(folder).st_dev
        except OSError:
            continue
        entry = by_fs.setdefault(dev, [folder, 0])
        entry[1] += size
    for folder, size in by_fs.values():
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            continue
        if size / worst_compression > free:
            raise InputError(f"not enough free space for the {what} at {folder}: about {size / 2**20:.0f} MiB "
                             f"uncompressed (at least {size / worst_compression / 2**20:.0f} MiB compressed), "
                             f"{free / 2**20:.0f} MiB free; free space or choose fewer stages / compact mode")
        if size > free:
            reporter_warn(f"the {what} need about {size / 2**20:.0f} MiB uncompressed and {folder} has "
                          f"{free / 2**20:.0f} MiB free: the run only fits if compression saves the difference")


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

    Every write and the final close collect GDAL's errors (rasterio raises on
    none of them when the disk fills); ``commit`` also fsyncs and re-checks the
    file's blocks, so a failed write removes the temporary file and leaves any
    previous output untouched.  All calls must come from one thread (the
    engine's writer thread).
    """

    def __init__(self, path, width: int, height: int, count: int, crs, transform: Affine,
                 descriptions: Optional[Sequence[str]] = None, nodata: float = float("nan"),
                 tags: Optional[Dict[str, str]] = None, dtype: str = "float32"):
        self.path = Path(path)
        self.shape = (count, height, width)
        self.dtype = np.dtype(dtype)
        self.errors: List[str] = []
        self.tmp = temp_beside(self.path)
        profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=self.dtype.name, crs=crs,
                       transform=transform, nodata=nodata, compress="deflate",
                       predictor=3 if self.dtype.kind == "f" else 2, BIGTIFF="IF_SAFER")
        if width >= 16 and height >= 16:
            profile.update(tiled=True, blockxsize=256 if width >= 256 else 16 * (width // 16),
                           blockysize=256 if height >= 256 else 16 * (height // 16))
        try:
            with self._checked():
                self.ds = rasterio.open(self.tmp, "w", **profile)
                for i, text in enumerate(descriptions or [], 1):
                    self.ds.set_band_description(i, text)
                if tags:
                    self.ds.update_tags(**tags)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _checked(self):
        """Run GDAL calls collecting their errors; the first one fails the write."""
        with gdal_errors() as errors:
            try:
                yield
            except (RasterioIOError, OSError) as exc:
                errors.append(" ".join(str(exc).split()))
        if errors:
            self.errors.extend(errors)
            raise write_failure(self.path, errors[0])

    def write_rows(self, row0: int, array: np.ndarray) -> None:
        """Write a (count, rows, width) block starting at output row ``row0``."""
        with self._checked():
            self.ds.write(array.astype(self.dtype, copy=False),
                          window=Window(0, row0, array.shape[2], array.shape[1]))

    def close(self) -> None:
        """Finish writing (flushes GDAL's caches, where a full disk shows up); the file is
        still the temporary one."""
        if not self.ds.closed:
            with self._checked():
                self.ds.close()

    def verify(self) -> None:
        """Closed, fsynced and whole, or ``WriteError``."""
        self.close()
        try:
            sync_file(self.tmp)
        except OSError as exc:
            raise write_failure(self.path, exc.strerror or str(exc), exc.errno) from None
        problem = verify_geotiff(self.tmp, self.shape)
        if problem:
            raise write_failure(self.path, problem)

    def commit(self) -> Path:
        try:
            self.verify()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        try:
            self.close()
        except OSError:
            pass  # the write failed already; the temporary file goes either way
        finally:
            self.tmp.unlink(missing_ok=True)


def commit_all(rasters: Sequence["AtomicRaster"]) -> None:
    """Close and verify every output first (where writing errors show up), then rename
    them all into place, so a failure while writing replaces none of the previous outputs."""
    for raster in rasters:
        raster.verify()
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



# --- pixels without ground evidence: the quality of each input pixel (issue 27) -------------------------
#: Vector files a mask layer may be (polygons: masked inside); anything else is read as a raster.
VECTOR_SUFFIXES = (".gpkg", ".shp", ".geojson", ".json", ".kml", ".gml", ".fgb", ".sqlite")
#: Pixels of context around each block the cloud detector sees (more than its opening + buffer reach, 3 px).
DETECTOR_HALO = 8


class MaskSource(ThreadHandles):
    """The quality code (``clouds``) of any block of an input's pixels, from the sources a run uses: the
    scene classification (``scl``: a GDAL name, resampled nearest onto the input's grid), a user's mask
    (``mask_layer``: a raster, nonzero = masked, or a polygon file, masked inside) and/or the spectral
    detector (``detector``: ``cloud_detector.detect`` on the block's reflectance).  Pixels the input itself
    has no data for are ``NO_DATA``.  Thread-safe: one dataset handle per thread."""

    def __init__(self, source: RasterInput, scl: Optional[str] = None, mask_layer: Optional[str] = None,
                 detector: bool = False):
        from rasterio.crs import CRS
        self.source, self.scl, self.mask_layer, self.detector = source, scl, mask_layer, detector
        self.polygons = None
        ThreadHandles.__init__(self)
        if detector and source.plan.kind != "sentinel2":
            raise InputError(f"{Path(source.path).name} holds ready-made model channels, not Sentinel-2 bands: "
                             "the cloud detector cannot read it; give a mask layer or turn cloud masking off")
        if detector:
            from . import cloud_detector  # noqa: F401 (fails here, not on a reader thread)
        for name, what in ((scl, "scene classification"), (mask_layer, "mask layer")):
            if name and Path(name).suffix.lower() not in VECTOR_SUFFIXES:
                check_input_exists(str(name))
                try:
                    with rasterio.open(name) as ds:
                        if ds.crs is None and source.crs is not None:
                            raise InputError(f"the {what} {Path(name).name} has no coordinate reference system")
                except RasterioIOError as exc:
                    raise InputError(f"the {what} {Path(name).name} is not a raster GDAL can read "
                                     f"({str(exc).splitlines()[0][:160]})") from None
        if mask_layer and Path(mask_layer).suffix.lower() in VECTOR_SUFFIXES:
            from .polygons import read_polygons
            check_input_exists(str(mask_layer))
            try:
                self.polygons = read_polygons(mask_layer, CRS.from_user_input(source.crs))
            except ValueError as exc:
                raise InputError(f"mask layer: {exc}") from None

    def describe(self) -> str:
        parts = []
        if self.scl:
            parts.append(f"the scene classification ({Path(str(self.scl)).name})")
        if self.mask_layer:
            parts.append(f"the mask layer {Path(str(self.mask_layer)).name}")
        if self.detector:
            parts.append("the cloud detector on the bands read")
        return " + ".join(parts)

    def _warped(self, name: str):
        """A nearest-neighbour view of raster ``name`` on the input's whole grid, one per thread."""
        views = getattr(self._local, "views", None)
        if views is None:
            views = self._local.views = {}
        if name not in views:
            from rasterio.enums import Resampling
            from rasterio.vrt import WarpedVRT
            src = rasterio.open(name)
            vrt = WarpedVRT(src, crs=self.source.crs, transform=self.source.transform,
                            width=self.source.full_width, height=self.source.full_height,
                            resampling=Resampling.nearest, src_nodata=src.nodata, nodata=0)
            views[name] = vrt
            self._keep(vrt, src)
        return views[name]

    def _read(self, name: str, win: Window) -> np.ndarray:
        with gdal_errors() as errors:
            try:
                return self._warped(name).read(1, window=win)
            except RasterioIOError as exc:
                errors.append(" ".join(str(exc).split()))
        raise InputError(f"{Path(name).name} cannot be read at col {win.col_off}, row {win.row_off}: {errors[0][:200]}")

    def quality(self, row_off: int, col_off: int, h: int, w: int) -> np.ndarray:
        """(h, w) uint8 quality codes of the input's pixels from (row_off, col_off) (whole-raster pixels)."""
        from . import clouds
        win = Window(col_off, row_off, w, h)
        _, valid = self.source.read_pixels(row_off, col_off, h, w)
        parts = [np.where(valid, clouds.CLEAR, clouds.NO_DATA).astype(np.uint8)]
        if self.scl:
            # outside the classification's footprint (its no-data, read as 0): no evidence either way, so clear
            scl = self._read(self.scl, win)
            parts.append(np.where(scl == 0, clouds.CLEAR, clouds.scl_quality(scl)).astype(np.uint8))
        if self.polygons is not None:
            from rasterio.features import rasterize
            transform = compose(self.source.transform, Affine.translation(col_off, row_off))
            burnt = (rasterize([(g, 1) for g in self.polygons], out_shape=(h, w), transform=transform, fill=0,
                               dtype="uint8") if self.polygons else np.zeros((h, w), np.uint8))
            parts.append(clouds.user_mask_quality(burnt))
        elif self.mask_layer:
            parts.append(clouds.user_mask_quality(self._read(self.mask_layer, win)))
        if self.detector:
            parts.append(self._detected(row_off, col_off, h, w))
        return clouds.combine(*parts)

    def _detected(self, row_off: int, col_off: int, h: int, w: int) -> np.ndarray:
        """The detector's codes for a block, computed with ``DETECTOR_HALO`` px of the raster around it (its
        opening and buffer look a few pixels around each), so a pixel's code does not depend on which
        block (a window, a strip of rows) it was computed in."""
        from .cloud_detector import detect
        top, left = max(0, row_off - DETECTOR_HALO), max(0, col_off - DETECTOR_HALO)
        bottom = min(self.source.full_height, row_off + h + DETECTOR_HALO)
        right = min(self.source.full_width, col_off + w + DETECTOR_HALO)
        reflectance = self.source.reflectance(top, left, bottom - top, right - left)
        codes = np.asarray(detect(reflectance, list(self.source.recipe.source_bands)), np.uint8)
        return codes[row_off - top:row_off - top + h, col_off - left:col_off - left + w]
