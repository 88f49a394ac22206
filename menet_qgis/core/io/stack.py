"""Files made from Sentinel-2 inputs: Prepare's 6-band 10 m stack of a product (``build_stack``) and the 11
recipe channels of a raster (``export_channels``), so one can look at exactly what the model is fed.

Apart from ``sentinel2_product`` (which only opens and reads products, and which ``raster_io`` uses to map
them directly), since these writers need ``raster_io``'s atomic rasters and inputs.  torch is imported by
``export_channels`` only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import rasterio
from rasterio.features import bounds as geometry_bounds
from rasterio.features import geometry_mask
from rasterio.windows import Window

from ..files import refuse_overwriting_inputs
from ..model.channels import N_CHANNELS, RECIPE_V1, SOURCE_BANDS, PCABasis, Recipe, compute_channels
from ..reporting import Cancelled, Reporter
from .raster_io import AtomicRaster, RasterInput, check_writable, snapped_window
from .sentinel2_product import RESAMPLING, Sentinel2Product, band_readers, check_bands, gdal_name, open_product

#: Rows written per step by ``build_stack`` (S2 JP2 tiles are 1024 px tall at 10 m).
STACK_ROWS = 1024
#: Square tile (and strip height) ``export_channels`` computes at a time.
EXPORT_BLOCK = 128


@dataclass
class StackResult:
    path: Path
    width: int
    height: int
    product: Sentinel2Product



# --- the 6-band stack -----------------------------------------------------------
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
    product = open_product(folder)
    refuse_overwriting_inputs([out_path], [p for p in product.band_files.values() if not str(p).startswith("/vsi")])
    reporter.info(product.describe())
    with contextlib.ExitStack() as stack:
        sources = {b: stack.enter_context(rasterio.open(gdal_name(p))) for b, p in product.band_files.items()}
        check_bands(sources)
        ref = sources["B2"]
        window = Window(0, 0, ref.width, ref.height)
        for box in (bounds, polygon_geojson and geometry_bounds(polygon_geojson)):
            if box is not None:
                window = snapped_window(ref.transform, window, box)
        readers = band_readers(sources, stack, resampling)
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
    """Write the 11 recipe channels of a Sentinel-2 raster as float32 (NaN = no data) (needs torch).

    Bands are identified and scaled exactly as for extraction (``RasterInput``
    and its plan), so the file shows what the model is fed before
    normalisation.  Computed in strips of ``EXPORT_BLOCK`` rows: memory
    depends on the raster's width only.
    """
    import torch
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
