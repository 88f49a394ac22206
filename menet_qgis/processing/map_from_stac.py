"""Processing algorithm "Map mangroves from STAC (area and dates)", id ``menet:mapfromstac``."""
from __future__ import annotations

from qgis.core import (QgsProcessing, QgsProcessingException, QgsProcessingLayerPostProcessorInterface,
                       QgsProcessingOutputNumber, QgsProcessingParameterDateTime, QgsProcessingParameterExtent,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterRasterDestination, QgsRasterLayer)

from .. import options
from ..core.files import refuse_overwriting_inputs  # stdlib only
from ..core.io.clouds import quality_path  # numpy only
from .base import MENetAlgorithm
from .layers import KEEP_ALIVE, style_probability
from .parameters import bounds_of, has_value, tooltip

#: What the dialog shows of the STAC group (the area and the dates are the dialog's own parameters).
DIALOG_OPTIONS = [o for o in options.STAC if "processing" in o.fronts]
#: Engine options without the stage layers (a composite's stages are not offered here).
ENGINE_OPTIONS = [o for o in options.ENGINE if o.name not in ("stages", "stage_mode")]


class _StyleProbability(QgsProcessingLayerPostProcessorInterface):
    def postProcessLayer(self, layer, context, feedback):  # noqa: N802
        if isinstance(layer, QgsRasterLayer):
            style_probability(layer)


class MapFromStacAlgorithm(MENetAlgorithm):
    EXTENT, AREA, START, END = "EXTENT", "AREA", "START_DATE", "END_DATE"
    OUTPUT, COMPOSITE, THRESHOLD = "OUTPUT", "OUTPUT_COMPOSITE", "THRESHOLD"
    job, guide = "stac_map", "map-from-stac"

    def name(self):
        return "mapfromstac"

    def displayName(self):  # noqa: N802
        return "Map mangroves from STAC (area and dates)"

    def shortDescription(self):  # noqa: N802
        return "Search Sentinel-2 L2A over an area and dates, composite the clear observations and map them"

    def shortHelpString(self):  # noqa: N802
        return (
            "<p>Searches a STAC API (Earth Search by default) for Sentinel-2 L2A scenes over the area between the "
            "two dates whose scene cloud cover is at most the limit, reads over HTTP only the area's windows of "
            "their cloud-optimised GeoTIFFs, keeps per pixel the observations the scene classification (SCL) "
            "calls clear, composites them (per-pixel median) and maps the composite with ME-Net as Extract "
            "mangroves does.</p>"
            "<p><b>Area</b>: an extent, or a polygon layer (its extent). <b>Composite</b>: six bands and a band "
            "counting the clear observations per pixel; pixels never clear are no data in the map.</p>"
            "<p>Microsoft Planetary Computer needs signed asset URLs: see the guide.</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Area (extent)", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(self.AREA, "Area (polygon layer's extent)",
                                                              [QgsProcessing.SourceType.TypeVectorPolygon],
                                                              optional=True))
        for key, name, label in ((self.START, "start", "First day"), (self.END, "end", "Last day")):
            param = QgsProcessingParameterDateTime(key, label, type=QgsProcessingParameterDateTime.Type.Date)
            param.setHelp(tooltip(options.by_name(options.STAC, name)))
            self.addParameter(param)
        self.add_options(DIALOG_OPTIONS)
        self.add_options([options.MODEL])
        self.add_options(ENGINE_OPTIONS)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Mangrove probability"))
        self.addParameter(QgsProcessingParameterRasterDestination(self.COMPOSITE, "Composite (6 bands + count)"))
        self.addOutput(QgsProcessingOutputNumber(self.THRESHOLD, "Model's mangrove threshold"))

    def job_parameters(self, parameters, context, values):
        if has_value(parameters, self.AREA):
            source = self.parameterAsSource(parameters, self.AREA, context)
            if source is None:
                raise QgsProcessingException("the area layer cannot be read")
            bounds, crs = bounds_of(source.sourceExtent(), "area layer's"), source.sourceCrs()
        elif has_value(parameters, self.EXTENT):
            bounds = bounds_of(self.parameterAsExtent(parameters, self.EXTENT, context), "area")
            crs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
        else:
            raise QgsProcessingException("give the area: an extent or a polygon layer")
        if not crs.isValid():
            raise QgsProcessingException("the area has no coordinate reference system")
        start, end = (self.parameterAsDateTime(parameters, key, context).date() for key in (self.START, self.END))
        if not (start.isValid() and end.isValid()):
            raise QgsProcessingException("give the first and the last day")
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        composite = self.parameterAsOutputLayer(parameters, self.COMPOSITE, context)
        refuse_overwriting_inputs([output, composite], [values["model"]])
        return {"output": output, "composite": composite, "bounds": bounds,
                "bounds_crs": crs.authid() or crs.toWkt(),
                "start": start.toString("yyyy-MM-dd"), "end": end.toString("yyyy-MM-dd"),
                "model": values["model"], **{o.name: values[o.name] for o in DIALOG_OPTIONS},
                "options": {o.name: values[o.name] for o in ENGINE_OPTIONS}}

    def files_written(self, job):
        masking = job["options"].get("cloud_mask") != "off" or job["options"].get("mask_layer")
        return [job["output"], job["composite"]] + ([str(quality_path(job["output"]))] if masking else [])

    def load_outputs(self, parameters, context, feedback, job, result):
        feedback.pushInfo(f"dates: {', '.join(result.get('dates', []))}; scenes: {', '.join(result.get('items', []))}")
        if context.willLoadLayerOnCompletion(job["output"]):
            details = context.layerToLoadOnCompletionDetails(job["output"])
            details.name = "mangrove probability (STAC composite)"
            details.forceName = True
            styler = _StyleProbability()
            KEEP_ALIVE.append(styler)
            details.setPostProcessor(styler)
        return {self.OUTPUT: job["output"], self.COMPOSITE: job["composite"],
                self.THRESHOLD: float(result.get("threshold", 0.5))}
