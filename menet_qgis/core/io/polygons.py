"""Polygons and rasters brought onto another raster's grid: reference masks and labels for Assess accuracy
and for training from rasters with polygon labels (both need the same burning and warping)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.vrt import WarpedVRT

from ..compat import osgeo_exceptions


def read_on_grid(path, like: rasterio.io.DatasetReader, band: int = 1) -> np.ndarray:
    """Band of ``path`` resampled (nearest) onto the grid of ``like``; NaN where it has no data."""
    with rasterio.open(path) as src:
        if src.crs is None:
            raise ValueError(f"{Path(path).name} has no coordinate reference system")
        with WarpedVRT(src, crs=like.crs, transform=like.transform, width=like.width, height=like.height,
                       resampling=Resampling.nearest, src_nodata=src.nodata, nodata=np.nan, dtype="float32") as vrt:
            return vrt.read(band)


def burn_polygons(geometries: Sequence[Dict], like) -> np.ndarray:
    """GeoJSON-like polygons (in ``like``'s CRS) -> bool mask on ``like``'s grid."""
    if not geometries:
        return np.zeros((like.height, like.width), bool)
    return rasterize([(g, 1) for g in geometries], out_shape=(like.height, like.width), transform=like.transform,
                     fill=0, dtype="uint8", all_touched=False).astype(bool)


def read_polygons(path, target_crs) -> List[Dict]:
    """Polygons of a vector file (any OGR format) as GeoJSON-like dicts in ``target_crs``."""
    from osgeo import ogr, osr
    name = Path(path).name
    with osgeo_exceptions():
        try:
            ds = ogr.Open(str(path))
        except RuntimeError:
            ds = None
        if ds is None:
            raise ValueError(f"{name} is not a vector file OGR can read")
        try:
            layer = ds.GetLayer(0)
            target = osr.SpatialReference()
            target.ImportFromWkt(rasterio.crs.CRS.from_user_input(target_crs).to_wkt())
            target.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
            source = layer.GetSpatialRef()
            if source is None:
                raise ValueError(f"{name} has no coordinate reference system")
            source.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
            transform = osr.CoordinateTransformation(source, target)
            shapes = []
            for feature in layer:
                geom = feature.GetGeometryRef()
                if geom is None:
                    continue
                geom = geom.Clone()
                geom.Transform(transform)
                shapes.append(json.loads(geom.ExportToJson()))
        except RuntimeError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return shapes
