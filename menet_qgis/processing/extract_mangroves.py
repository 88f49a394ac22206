"""Processing algorithm "Extract mangroves (ME-Net)", id ``menet:extractmangroves``."""
from __future__ import annotations

from qgis.core import (QgsProcessingOutputMultipleLayers, QgsProcessingOutputNumber, QgsProcessingOutputRasterLayer,
                       QgsProcessingOutputString, QgsProcessingParameterExtent, QgsProcessingParameterFile,
                       QgsProcessingParameterRasterDestination, QgsProcessingParameterRasterLayer)

from .. import options
from ..core.files import refuse_overwriting_inputs, stage_path  # stdlib only
from ..core.io.clouds import quality_path  # numpy only
from ..core.model.stages import STAGES, check_window  # stdlib only
from .base import MENetAlgorithm
from .layers import load_results
from .parameters import advanced, bounds_of, gdal_raster_path, has_value, values_from

#: The engine options shown with the stage folder; the others are among the advanced parameters.
STAGE_CHOICES = [options.by_name(options.ENGINE, name) for name in ("stages", "stage_mode")]


def stage_table_html(window: int = 256) -> str:
    """The stage table, compact enough for the help panel at the dialog's default size."""
    rows = "".join(f"<tr><td>{s.name}</td><td>{s.node}</td><td>{s.stride}</td><td>{s.channels}</td>"
                   f"<td>{s.map_size(window)}×{s.map_size(window)}×{s.channels}</td></tr>" for s in STAGES)
    return ("<table border='0' cellspacing='0' cellpadding='2'><tr><th>stage</th><th>node</th><th>stride</th>"
            f"<th>ch.</th><th>map at {window}²</th></tr>{rows}</table>")


class ExtractMangrovesAlgorithm(MENetAlgorithm):
    INPUT, EXTENT, STAGE_FOLDER, OUTPUT = "INPUT", "EXTENT", "STAGE_FOLDER", "OUTPUT"
    STAGE_LAYERS, THRESHOLD, QUALITY, MASKED = "STAGE_LAYERS", "THRESHOLD", "QUALITY", "MASKED"
    job, guide = "extract", "extract-mangroves"

    def name(self):
        return "extractmangroves"

    def displayName(self):  # noqa: N802
        return "Extract mangroves (ME-Net)"

    def shortDescription(self):  # noqa: N802
        return "Mangrove probability and ResNet-101 stage feature layers from a Sentinel-2 raster"

    def shortHelpString(self):  # noqa: N802
        return (
            "<p>Runs ME-Net (ResNet-101 encoder + ME-Net head) over the raster in overlapping windows — on the "
            "GPU when there is one — and writes a mangrove probability (0–1) on exactly the input grid.</p>"
            "<p><b>Input</b>: Sentinel-2 bands named Blue…SWIR1 or B2…B11 (else set the band numbers), DN or "
            "reflectance; or an 11-band ME-Net stack. B12 (SWIR2) is needed only by models of channel recipe v1. "
            "<b>Model</b>: empty = the default model.</p>"
            "<p><b>Threshold</b> (output): the model's mangrove threshold, chosen on its validation data; it is "
            "also stored in the probability raster for Assess accuracy and model chains.</p>"
            "<p><b>Window / overlap</b>: multiples of 32 px, blended without seams. <b>Batch size</b> 0 = "
            "automatic.</p>"
            "<p><b>Stage layers</b>: each chosen stage as a GeoTIFF at its own resolution; <i>compact</i> = 3 "
            "bands (mean, max, std over channels), <i>all channels</i> = every channel (large). Empty stage "
            "folder = beside the probability.</p>"
            f"{stage_table_html()}"
            "<p><b>Clouds</b>: pixels without ground evidence (cloud, shadow, cirrus, defective, no data) are "
            "left as no-data; the quality layer &lt;output&gt;_quality.tif beside the probability says why for "
            "each. Sources: the product's scene classification, else the cloud detector, plus a mask layer of "
            "yours; <i>Cloud mask off</i> maps under clouds too.</p>"
            "<p>stage4/5 follow stock ResNet-101 (16² and 8² at 256²), not the paper figure's 8² / 4².</p>"
            "<p>The engine runs in its own Python process (see the log for which Python).</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Sentinel-2 raster"))
        self.add_options([options.MODEL])
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Process only this extent", optional=True))
        self.add_options(STAGE_CHOICES)
        folder = QgsProcessingParameterFile(self.STAGE_FOLDER, "Stage layer folder",
                                            behavior=QgsProcessingParameterFile.Behavior.Folder, optional=True)
        folder.setHelp("Where stage layers are written as <probability name>_stageN.tif; empty = beside the "
                       "probability")
        self.addParameter(advanced(folder))
        self.add_options(options.INPUT)
        self.add_options(o for o in options.ENGINE if o not in STAGE_CHOICES)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Mangrove probability"))
        self.addOutput(QgsProcessingOutputMultipleLayers(self.STAGE_LAYERS, "Stage feature layers"))
        # The model's decision threshold (chosen on validation): model chains threshold with it.
        self.addOutput(QgsProcessingOutputNumber(self.THRESHOLD, "Model's mangrove threshold"))
        # Why pixels have no probability (clouds...): written beside the probability unless masking is off.
        self.addOutput(QgsProcessingOutputRasterLayer(self.QUALITY, "Quality (why no probability)"))
        self.addOutput(QgsProcessingOutputString(self.MASKED, "Masked share"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        values = values_from(self, parameters, context, self.declared_options)
        try:
            check_window(values["window"] or 256, values["overlap"])
        except ValueError as exc:
            return False, str(exc)
        return super().checkParameterValues(parameters, context)

    def job_parameters(self, parameters, context, values):
        source = gdal_raster_path(self, parameters, self.INPUT, context)
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        refuse_overwriting_inputs([output], [source])
        bounds = (bounds_of(self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs()), "processing")
                  if has_value(parameters, self.EXTENT) else None)
        return {"input": source, "output": output, "bounds": bounds, "model": values["model"],
                "bands": values["bands"], "dn_offset": values["dn_offset"],
                "stage_dir": self.parameterAsFile(parameters, self.STAGE_FOLDER, context) or None,
                "options": {option.name: values[option.name] for option in options.ENGINE}}

    def files_written(self, job):
        stages = job["options"]["stages"]
        masking = job["options"].get("cloud_mask") != "off" or job["options"].get("mask_layer")
        quality = [str(quality_path(job["output"]))] if masking else []
        return [job["output"]] + [str(stage_path(job["output"], job["stage_dir"], name)) for name in stages] + quality

    def load_outputs(self, parameters, context, feedback, job, result):
        stages = result.get("stages", {})
        quality = result.get("quality")
        # the quality layer is loaded where it shows something: pixels masked for clouds, defects or the user
        load_results(context, job["output"], stages, self.parameterAsRasterLayer(parameters, self.INPUT, context),
                     job["input"], quality if result.get("masked_pixels") else None)
        if result.get("masked"):
            feedback.pushInfo(f"pixels without ground evidence: {result['masked']}")
        return {self.OUTPUT: job["output"], self.STAGE_LAYERS: list(stages.values()),
                self.THRESHOLD: float(result.get("threshold", 0.5)), self.QUALITY: quality,
                self.MASKED: result.get("masked", "")}
