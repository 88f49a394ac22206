"""Processing algorithm "Prepare Sentinel-2 stack", id ``menet:preparesentinel2``."""
from __future__ import annotations

import json

from qgis.core import (QgsFeatureRequest, QgsGeometry, QgsProcessing, QgsProcessingException,
                       QgsProcessingParameterExtent, QgsProcessingParameterFeatureSource, QgsProcessingParameterFile,
                       QgsProcessingParameterMultipleLayers, QgsProcessingParameterRasterDestination)

from .. import options
from .base import MENetAlgorithm
from .parameters import bounds_of, has_value


class PrepareSentinel2Algorithm(MENetAlgorithm):
    INPUT_FOLDER, MORE_DATES, EXTENT, CLIP_LAYER, OUTPUT = "INPUT_FOLDER", "MORE_DATES", "EXTENT", "CLIP_LAYER", "OUTPUT"
    job, guide = "prepare", "prepare-sentinel2"

    def name(self):
        return "preparesentinel2"

    def displayName(self):  # noqa: N802
        return "Prepare Sentinel-2 stack"

    def shortDescription(self):  # noqa: N802
        return ("One 6-band 10 m raster (B2, B3, B4, B8, B11, B12) from a Sentinel-2 product, or a cloud-free "
                "composite of several dates")

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
            "clip polygons become no data.</p>"
            "<p><b>More dates of the same area</b> (Sentinel-2 layers: a product's subdataset, its MTD_MSIL2A.xml "
            "or zip, or 6-band rasters): with two or more dates in all (the product folder counts as the "
            "first), the output is a <b>composite of the clear observations</b> only, on the first date's grid, "
            "with a 7th band <i>CLEAR_COUNT</i> counting the clear dates of each pixel (0 = no date clear: no "
            "data). A pixel is clear where the product's scene classification (SCL, L2A) says so; without one, "
            "where the cloud detector finds no cloud, shadow or cirrus.</p>"
            "<p><b>Composite</b>: <i>medoid</i> (default: per pixel, the whole spectrum of the clear date "
            "closest to the others; of two, the darker blue) keeps the map closest to a cloud-free one when "
            "cloud rims slip through the masks; <i>median</i> per band; <i>greatest NDVI</i> (picks clouds "
            "over water: not for coasts).</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile(self.INPUT_FOLDER, "Sentinel-2 product folder",
                                                     behavior=QgsProcessingParameterFile.Behavior.Folder,
                                                     optional=True))
        self.addParameter(QgsProcessingParameterMultipleLayers(self.MORE_DATES,
                                                               "More dates (composite)",
                                                               QgsProcessing.SourceType.TypeRaster, optional=True))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Clip to extent", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(self.CLIP_LAYER, "Clip to polygons",
                                                              [QgsProcessing.SourceType.TypeVectorPolygon], optional=True))
        self.add_options(options.PREPARE)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Sentinel-2 stack"))

    def job_parameters(self, parameters, context, values):
        folder = self.parameterAsFile(parameters, self.INPUT_FOLDER, context)
        dates = [layer.source() for layer in self.parameterAsLayerList(parameters, self.MORE_DATES, context)]
        if not folder and not dates:
            raise QgsProcessingException("give a Sentinel-2 product folder, or two or more dates to composite")
        job = {"folder": folder or None, "dates": dates,
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
