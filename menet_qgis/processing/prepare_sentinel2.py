"""Processing algorithm "Prepare Sentinel-2 stack", id ``menet:preparesentinel2``."""
from __future__ import annotations

import json

from qgis.core import (QgsCoordinateReferenceSystem, QgsFeatureRequest, QgsGeometry, QgsProcessing,
                       QgsProcessingException, QgsProcessingParameterEnum,
                       QgsProcessingParameterExtent, QgsProcessingParameterFeatureSource, QgsProcessingParameterFile,
                       QgsProcessingParameterRasterDestination)

from .common import MENetAlgorithm, load_core, make_reporter, processing_errors

RESAMPLING_OPTIONS = ["bilinear", "nearest"]


class PrepareSentinel2Algorithm(MENetAlgorithm):
    INPUT_FOLDER, EXTENT, CLIP_LAYER, RESAMPLING, OUTPUT = "INPUT_FOLDER", "EXTENT", "CLIP_LAYER", "RESAMPLING", "OUTPUT"

    def name(self):
        return "preparesentinel2"

    def displayName(self):  # noqa: N802
        return "Prepare Sentinel-2 stack"

    def shortDescription(self):  # noqa: N802
        return "One 6-band 10 m raster (B2, B3, B4, B8, B11, B12) from an unzipped Sentinel-2 product"

    def shortHelpString(self):  # noqa: N802
        return (
            "<p>Stacks the six bands ME-Net needs from an unzipped Sentinel-2 L2A (or L1C) product into one "
            "GeoTIFF on the product's 10 m grid, ready for 'Extract mangroves (ME-Net)'.</p>"
            "<p><b>Product folder</b>: the <i>.SAFE</i> folder, or a folder of per-band JP2/GeoTIFF files named "
            "like the product's (<i>T17MPN_20230105T153621_B02_10m.jp2</i>, <i>…_B11_20m.jp2</i>, or L1C "
            "<i>…_B02.jp2</i>).</p>"
            "<p>Values stay the product's integer DN (0 = no data). The DN offset from the product metadata "
            "(MTD_MSIL2A.xml: -1000 from processing baseline 04.00, 25 Jan 2022) is stored in the file, so "
            "extraction turns DN into reflectance = (DN + offset) / 10000 by itself.</p>"
            "<p><b>Resampling</b> of the 20 m bands B11 and B12 to 10 m: <i>bilinear</i> (reflectance varies "
            "continuously) or <i>nearest</i> (each 20 m value on its four 10 m pixels).</p>"
            "<p><b>Extent</b> and <b>clip layer</b> cut the stack to whole 10 m pixels; pixels outside the "
            "clip polygons become no data.</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile(self.INPUT_FOLDER, "Sentinel-2 product folder (.SAFE)",
                                                     behavior=QgsProcessingParameterFile.Behavior.Folder))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Clip to extent", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(self.CLIP_LAYER, "Clip to polygons",
                                                              [QgsProcessing.SourceType.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterEnum(self.RESAMPLING, "Resampling of B11 and B12 (20 m) to 10 m",
                                                     RESAMPLING_OPTIONS, defaultValue=0))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Sentinel-2 stack"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        _checkpoint, engine, _raster_io = load_core()
        from ..core import sentinel2_product

        folder = self.parameterAsFile(parameters, self.INPUT_FOLDER, context)
        resampling = RESAMPLING_OPTIONS[self.parameterAsEnum(parameters, self.RESAMPLING, context)]
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        with processing_errors():
            product = sentinel2_product.find_product(folder)
            crs = QgsCoordinateReferenceSystem.fromWkt(product.crs.to_wkt())
            bounds = self._bounds(parameters, context, crs)
            polygon = self._polygon(parameters, context, crs)
            try:
                result = sentinel2_product.build_stack(folder, output, bounds, polygon, resampling,
                                                       make_reporter(feedback))
            except engine.Cancelled:
                raise QgsProcessingException("cancelled: no output was written") from None
        feedback.pushInfo(f"wrote {result.width} x {result.height} px, bands B2, B3, B4, B8, B11, B12 "
                          f"(B11, B12 resampled {resampling}) to {result.path}")
        return {self.OUTPUT: str(result.path)}

    def _bounds(self, parameters, context, crs):
        """The EXTENT parameter in the product CRS, or None."""
        if parameters.get(self.EXTENT) in (None, ""):
            return None
        rect = self.parameterAsExtent(parameters, self.EXTENT, context, crs)
        if rect.isNull() or rect.isEmpty():
            raise QgsProcessingException("the clip extent is empty")
        return rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()

    def _polygon(self, parameters, context, crs):
        """The clip layer's polygons dissolved into one GeoJSON geometry in the product CRS, or None."""
        source = self.parameterAsSource(parameters, self.CLIP_LAYER, context)
        if source is None:
            return None
        request = QgsFeatureRequest().setDestinationCrs(crs, context.transformContext())
        geometry = QgsGeometry.unaryUnion([f.geometry() for f in source.getFeatures(request) if f.hasGeometry()])
        if geometry.isNull() or geometry.isEmpty():
            raise QgsProcessingException("the clip layer has no polygons")
        return json.loads(geometry.asJson())
