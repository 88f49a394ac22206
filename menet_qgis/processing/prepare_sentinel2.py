"""Processing algorithm "Prepare Sentinel-2 stack", id ``menet:preparesentinel2``."""
from __future__ import annotations

import json

from qgis.core import (QgsFeatureRequest, QgsGeometry, QgsProcessing, QgsProcessingException,
                       QgsProcessingParameterExtent, QgsProcessingParameterFeatureSource, QgsProcessingParameterFile,
                       QgsProcessingParameterRasterDestination)

from .. import options
from .base import MENetAlgorithm
from .parameters import bounds_of, has_value


class PrepareSentinel2Algorithm(MENetAlgorithm):
    INPUT_FOLDER, EXTENT, CLIP_LAYER, OUTPUT = "INPUT_FOLDER", "EXTENT", "CLIP_LAYER", "OUTPUT"
    job, guide = "prepare", "prepare-sentinel2"

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
        self.addParameter(QgsProcessingParameterFile(self.INPUT_FOLDER, "Sentinel-2 product folder",
                                                     behavior=QgsProcessingParameterFile.Behavior.Folder))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Clip to extent", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(self.CLIP_LAYER, "Clip to polygons",
                                                              [QgsProcessing.SourceType.TypeVectorPolygon], optional=True))
        self.add_options(options.PREPARE)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Sentinel-2 stack"))

    def job_parameters(self, parameters, context, values):
        job = {"folder": self.parameterAsFile(parameters, self.INPUT_FOLDER, context),
               "output": self.parameterAsOutputLayer(parameters, self.OUTPUT, context), **values}
        if has_value(parameters, self.EXTENT):
            job["bounds"] = bounds_of(self.parameterAsExtent(parameters, self.EXTENT, context), "clip")
            job["bounds_crs"] = self.parameterAsExtentCrs(parameters, self.EXTENT, context).toWkt()
        source = self.parameterAsSource(parameters, self.CLIP_LAYER, context)
        if source is not None:
            # dissolved here, in the layer's CRS; the engine reprojects it into the product's
            geometry = QgsGeometry.unaryUnion([f.geometry() for f in source.getFeatures(QgsFeatureRequest())
                                               if f.hasGeometry()])
            if geometry.isNull() or geometry.isEmpty():
                raise QgsProcessingException("the clip layer has no polygons")
            job["polygon"] = json.loads(geometry.asJson())
            job["polygon_crs"] = source.sourceCrs().toWkt()
        return job

    def load_outputs(self, parameters, context, feedback, job, result):
        feedback.pushInfo(result.get("product", ""))
        return {self.OUTPUT: job["output"]}
