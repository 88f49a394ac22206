"""From an unzipped Sentinel-2 product to rasters the ME-Net pipeline reads.

``build_stack`` turns a product folder (a ``.SAFE`` tree, or a flat folder of
per-band JP2/GeoTIFF files named like the product's) into one 6-band 10 m
GeoTIFF of DN: B2, B3, B4, B8 as they are, B11 and B12 resampled from 20 m,
with the product's DN offset stored as a tag so ``bands.plan_input`` applies
it.  ``export_channels`` writes the 11 recipe channels of a raster, so one can
look at exactly what the model is fed.

Sentinel-2 facts used here: reflectance = (DN + offset) / 10000; the offset is
-1000 from processing baseline 04.00 (products after 25 Jan 2022) and 0
before; DN 0 is no data.
"""
from __future__ import annotations

import contextlib
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.features import bounds as geometry_bounds
from rasterio.features import geometry_mask
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from .bands import ALIASES, OFFSET_KEYS, band_label, checked_dn_offset
from ..model.channels import N_CHANNELS, RECIPE_V1, SOURCE_BANDS, PCABasis, Recipe, compute_channels
from ..reporting import Cancelled, Reporter
from ..files import refuse_overwriting_inputs
from .raster_io import AtomicRaster, RasterInput, check_writable, snapped_window

#: Resolution (m) each needed band has in the product; finer copies are preferred.
NATIVE_RESOLUTION = {"B2": 10, "B3": 10, "B4": 10, "B8": 10, "B11": 20, "B12": 20}
#: ``band_id`` 0..12 in product metadata is B1..B12 with B8A after B8: the order of ``bands.ALIASES``.
METADATA_BAND_ORDER: List[str] = list(ALIASES)
RESAMPLING = {"bilinear": Resampling.bilinear, "nearest": Resampling.nearest}
#: Band file names: L2A ``T17MPN_20230105T153621_B11_20m.jp2``, L1C ``T17MPN_20200101T153619_B02.jp2``.
BAND_FILE = re.compile(r"_(?P<band>B(?:\d{1,2}|8A))(?:_(?P<res>\d+)m)?\.(?:jp2|tiff?)$", re.IGNORECASE)
#: Rows written per step by ``build_stack`` (S2 JP2 tiles are 1024 px tall at 10 m).
STACK_ROWS = 1024
#: Square tile (and strip height) ``export_channels`` computes at a time.
EXPORT_BLOCK = 128


@dataclass
class Sentinel2Product:
    """The six band files ME-Net needs from one product, and its radiometric metadata."""

    name: str
    band_files: Dict[str, Path]
    offset: Optional[float] = None
    offset_key: str = "BOA_ADD_OFFSET"
    baseline: Optional[str] = None
    metadata: Optional[Path] = None

    @property
    def crs(self):
        with rasterio.open(self.band_files["B2"]) as ds:
            return ds.crs

    def tags(self) -> Dict[str, str]:
        """Dataset tags of the stack: ``bands.plan_input`` reads the offset from them."""
        tags = {"SOURCE_PRODUCT": self.name}
        if self.offset is not None:
            tags[self.offset_key] = f"{self.offset:g}"
        if self.baseline:
            tags["PROCESSING_BASELINE"] = self.baseline
        return tags

    def describe(self) -> str:
        if self.offset is not None:
            baseline = f", processing baseline {self.baseline}" if self.baseline else ""
            return f"{self.name}: DN offset {self.offset:+g} ({self.offset_key} in {self.metadata.name}{baseline})"
        source = self.metadata.name if self.metadata else "no product metadata (MTD_MSIL*.xml) found"
        return (f"{self.name}: no DN offset known ({source}), none stored; set the DN offset when extracting "
                "(-1000 for processing baseline 04.00 and later)")


@dataclass
class StackResult:
    path: Path
    width: int
    height: int
    product: Sentinel2Product


# --- finding the product's pieces ---------------------------------------------
def find_band_files(folder) -> Dict[str, Path]:
    """B2, B3, B4, B8, B11, B12 files under ``folder`` (searched recursively).

    Where a band exists at several resolutions (L2A keeps B2 at 10, 20 and
    60 m) the finest is taken.  Quality masks (``QI_DATA``, ``MSK_*``) are skipped.
    """
    folder = Path(folder)
    if folder.is_file() and folder.suffix.lower() == ".zip":
        raise ValueError(f"{folder.name} is a zip archive; unzip it and give the .SAFE folder")
    if not folder.is_dir():
        raise ValueError(f"Sentinel-2 product folder not found: {folder}")
    candidates: Dict[str, Dict[int, List[Path]]] = {}
    for path in sorted(folder.rglob("*")):
        match = BAND_FILE.search(path.name)
        if not match or not path.is_file() or path.name.upper().startswith("MSK_") or "QI_DATA" in path.parts:
            continue
        band = band_label(match["band"], {})
        if band is None:
            continue
        resolution = int(match["res"]) if match["res"] else NATIVE_RESOLUTION.get(band, 0)
        candidates.setdefault(band, {}).setdefault(resolution, []).append(path)
    missing = [b for b in SOURCE_BANDS if b not in candidates]
    if missing:
        found = ", ".join(f"{b} ({'/'.join(f'{r} m' for r in sorted(rs))})"
                          for b, rs in sorted(candidates.items(), key=lambda kv: METADATA_BAND_ORDER.index(kv[0])))
        raise ValueError(f"no {', '.join(missing)} band file in {folder} (found {found or 'no band files'}); "
                         f"ME-Net needs {', '.join(SOURCE_BANDS)} as files named like "
                         "T17MPN_20230105T153621_B02_10m.jp2 (L2A) or T17MPN_20200101T153619_B02.jp2 (L1C)")
    chosen = {}
    for band in SOURCE_BANDS:
        resolution = min(candidates[band])
        files = candidates[band][resolution]
        if len(files) > 1:
            raise ValueError(f"several {band} files at {resolution} m in {folder} ({', '.join(f.name for f in files)}); "
                             "give a folder holding one product")
        chosen[band] = files[0]
    return chosen


def find_metadata_file(folder, band_files: Dict[str, Path]) -> Optional[Path]:
    """The product metadata ``MTD_MSIL*.xml`` in ``folder`` or in the ``.SAFE`` root above it or its bands."""
    folder = Path(folder).resolve()
    ancestors = [folder, *folder.parents] + [p for f in band_files.values() for p in f.resolve().parents]
    roots = [folder] + [p for p in ancestors if p.suffix.upper() == ".SAFE"]
    for root in dict.fromkeys(roots):
        hits = sorted(root.glob("MTD_MSIL*.xml"))
        if hits:
            return hits[0]
    return None


def read_metadata(xml_path) -> Tuple[Optional[float], str, Optional[str], Optional[str]]:
    """(DN offset of the six bands, its key, processing baseline, product URI) from MTD_MSIL1C/2A.xml.

    Products before processing baseline 04.00 carry no offset elements: their offset is 0.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"cannot read product metadata {Path(xml_path).name}: {exc}") from None
    offsets: Dict[str, float] = {}
    key = "RADIO_ADD_OFFSET" if "MSIL1C" in Path(xml_path).name.upper() else "BOA_ADD_OFFSET"
    baseline, uri = None, None
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        text = (element.text or "").strip()
        band_id = element.get("band_id", "")
        if tag in OFFSET_KEYS and band_id.isdigit() and int(band_id) < len(METADATA_BAND_ORDER):
            band = METADATA_BAND_ORDER[int(band_id)]
            if band in SOURCE_BANDS:
                offsets[band] = checked_dn_offset(text, f"{Path(xml_path).name} ({tag} of {band})",
                                                  "the product metadata is damaged; download the product again")
                key = tag
        elif tag == "PROCESSING_BASELINE" and baseline is None:
            baseline = text
        elif tag == "PRODUCT_URI" and uri is None:
            uri = text
    if len(set(offsets.values())) > 1:
        raise ValueError(f"{Path(xml_path).name} gives different DN offsets per band "
                         f"({', '.join(f'{b}={v:g}' for b, v in offsets.items())}); ME-Net applies one offset")
    if offsets:
        return next(iter(offsets.values())), key, baseline, uri
    return (0.0 if _baseline_number(baseline) < 4.0 else None), key, baseline, uri


def _baseline_number(baseline: Optional[str]) -> float:
    """'02.14' -> 2.14; unknown or unreadable -> inf (never taken for a pre-offset product)."""
    try:
        return float(baseline)
    except (TypeError, ValueError):
        return math.inf


def find_product(folder) -> Sentinel2Product:
    """Band files and metadata of the product in ``folder``; ValueError naming what is missing."""
    folder = Path(folder)
    band_files = find_band_files(folder)
    metadata = find_metadata_file(folder, band_files)
    safe_root = next((p for p in band_files["B2"].resolve().parents if p.suffix.upper() == ".SAFE"), None)
    name = safe_root.name if safe_root else folder.resolve().name
    if metadata is None:
        return Sentinel2Product(name, band_files)
    offset, key, baseline, uri = read_metadata(metadata)
    return Sentinel2Product(uri or name, band_files, offset, key, baseline, metadata)


# --- the 6-band stack -----------------------------------------------------------
def _check_bands(sources: Dict[str, rasterio.DatasetReader]) -> None:
    """All bands in one CRS and type, the 10 m bands on one grid."""
    ref = sources["B2"]
    for band, ds in sources.items():
        name = Path(ds.name).name
        if ds.crs != ref.crs:
            raise ValueError(f"{name} ({band}) is in {ds.crs}, B2 in {ref.crs}: the bands are not from one tile")
        if ds.dtypes[0] != ref.dtypes[0]:
            raise ValueError(f"{name} ({band}) holds {ds.dtypes[0]}, B2 holds {ref.dtypes[0]}")
        if NATIVE_RESOLUTION[band] == 10 and (ds.transform, ds.shape) != (ref.transform, ref.shape):
            raise ValueError(f"{name} ({band}) is not on the grid of B2 (transform or size differ)")


def build_stack(folder, out_path, bounds: Optional[Sequence[float]] = None, polygon_geojson: Optional[Dict] = None,
                resampling: str = "bilinear", reporter: Reporter = Reporter()) -> StackResult:
    """Write the 6-band 10 m DN stack (B2, B3, B4, B8, B11, B12) of the product in ``folder``.

    B11 and B12 are resampled from 20 m onto B2's 10 m grid (bands already on
    it are copied) by GDAL's warper (``rasterio.vrt.WarpedVRT``) with DN 0 as
    source no-data, so no-data never
    blends into valid values.  ``bilinear`` (default) suits reflectance, which
    varies continuously; ``nearest`` copies each 20 m value onto its four 10 m
    pixels, keeping the original DN.  ``bounds`` (product CRS) clips to whole
    10 m pixels; ``polygon_geojson`` (a GeoJSON geometry in the product CRS)
    clips to its bounding pixels and sets pixels whose centre is outside to 0.
    The DN offset, processing baseline and product name are stored as tags.
    Nothing is left behind on failure or cancellation (``Cancelled``).
    """
    if resampling not in RESAMPLING:
        raise ValueError(f"resampling must be one of {', '.join(RESAMPLING)}, not {resampling!r}")
    if polygon_geojson is not None and polygon_geojson.get("type") not in ("Polygon", "MultiPolygon"):
        raise ValueError(f"the clip geometry must be a Polygon or MultiPolygon, not {polygon_geojson.get('type')}")
    out_path = check_writable(out_path)
    product = find_product(folder)
    refuse_overwriting_inputs([out_path], product.band_files.values())
    reporter.info(product.describe())
    with contextlib.ExitStack() as stack:
        sources = {b: stack.enter_context(rasterio.open(p)) for b, p in product.band_files.items()}
        _check_bands(sources)
        ref = sources["B2"]
        window = Window(0, 0, ref.width, ref.height)
        for box in (bounds, polygon_geojson and geometry_bounds(polygon_geojson)):
            if box is not None:
                window = snapped_window(ref.transform, window, box)
        readers = [sources[b] if (sources[b].transform, sources[b].shape) == (ref.transform, ref.shape) else
                   stack.enter_context(WarpedVRT(sources[b], crs=ref.crs, transform=ref.transform, width=ref.width,
                                                 height=ref.height, resampling=RESAMPLING[resampling],
                                                 src_nodata=0, nodata=0))
                   for b in SOURCE_BANDS]
        width, height = int(window.width), int(window.height)
        sink = AtomicRaster(out_path, width, height, len(SOURCE_BANDS), ref.crs, ref.window_transform(window),
                            SOURCE_BANDS, nodata=0, tags=product.tags(), dtype=ref.dtypes[0])
        try:
            for row in range(0, height, STACK_ROWS):
                if reporter.cancelled():
                    raise Cancelled("cancelled by the user")
                rows = min(STACK_ROWS, height - row)
                src_window = Window(window.col_off, window.row_off + row, width, rows)
                block = np.stack([r.read(1, window=src_window) for r in readers])
                if polygon_geojson is not None:
                    block[:, geometry_mask([polygon_geojson], (rows, width), ref.window_transform(src_window))] = 0
                sink.write_rows(row, block)
                reporter.progress(100.0 * (row + rows) / height)
        except BaseException:
            sink.discard()
            raise
        sink.commit()
    return StackResult(out_path, width, height, product)


# --- the 11 channels, for inspection ---------------------------------------------
def export_channels(raster_path, out_path, pca: PCABasis, band_numbers: Optional[Sequence[int]] = None,
                    dn_offset: Optional[float] = None, reporter: Reporter = Reporter(),
                    recipe: Recipe = RECIPE_V1) -> Path:
    """Write the 11 recipe channels of a Sentinel-2 raster as float32 (NaN = no data).

    Bands are identified and scaled exactly as for extraction (``RasterInput``
    and its plan), so the file shows what the model is fed before
    normalisation.  Computed in strips of ``EXPORT_BLOCK`` rows: memory
    depends on the raster's width only.
    """
    source = RasterInput(raster_path, band_numbers=band_numbers, dn_offset=dn_offset, recipe=recipe)
    try:
        plan = source.plan
        if plan.kind != "sentinel2":
            raise ValueError(f"{Path(raster_path).name} is already an 11-channel ME-Net stack: its bands are the channels")
        refuse_overwriting_inputs([out_path], [raster_path])
        reporter.info(f"input bands: {plan.describe()}")
        for message in plan.warnings:
            reporter.warn(message)
        sink = AtomicRaster(check_writable(out_path), source.width, source.height, N_CHANNELS, source.crs,
                            source.area_transform(), recipe.channel_names, tags=plan.tags)
        try:
            for y0 in range(0, source.height, EXPORT_BLOCK):
                if reporter.cancelled():
                    raise Cancelled("cancelled by the user")
                rows = min(EXPORT_BLOCK, source.height - y0)
                tiles = [source.read(y0, x0, EXPORT_BLOCK) for x0 in range(0, source.width, EXPORT_BLOCK)]
                raw = torch.from_numpy(np.stack([data for data, _ in tiles]))
                with torch.inference_mode():
                    values = compute_channels((raw + plan.offset) * plan.scale, pca, recipe).numpy()
                values = np.where(np.stack([ok for _, ok in tiles])[:, None], values, np.float32(np.nan))
                strip = np.concatenate(list(values[:, :, :rows]), axis=2)[:, :, :source.width]
                sink.write_rows(y0, strip)
                reporter.progress(100.0 * (y0 + rows) / source.height)
        except BaseException:
            sink.discard()
            raise
        return sink.commit()
    finally:
        source.close()
