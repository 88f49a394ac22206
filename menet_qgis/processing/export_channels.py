"""Processing algorithm "Export ME-Net input channels", id ``menet:exportchannels``."""
from __future__ import annotations

from qgis.core import QgsProcessingParameterRasterDestination, QgsProcessingParameterRasterLayer

from .. import options
from ..core.files import refuse_overwriting_inputs  # stdlib only
from .base import MENetAlgorithm
from .parameters import gdal_raster_path

#: The recipes' channels (core/model/channels.py, kept out of the dialog's imports): name and formula for the help.
CHANNEL_HELP = [("red", "B4"), ("green", "B3"), ("blue", "B2"), ("nir", "B8"), ("swir1", "B11"),
                ("ndvi", "(B8 - B4) / (B8 + B4)"), ("mndwi", "(B3 - B11) / (B3 + B11)"), ("fdi", "B8 - (B4 + B2)"),
                ("mvi (recipe v2) / wfi (v1)", "(B8 - B3) / (B11 - B3) / (B8 - B4) / B12"),
                ("mdi11 (v2) / mdi (v1)", "(B8 - B11) / B11 / (B8 - B12) / B12"),
                ("pc1", "first principal component of B2, B3, B4, B8, B11 (v2; v1 adds B12)")]


class ExportChannelsAlgorithm(MENetAlgorithm):
    INPUT, OUTPUT = "INPUT", "OUTPUT"
    job, guide = "export_channels", "export-channels"

    def name(self):
        return "exportchannels"

    def displayName(self):  # noqa: N802
        return "Export ME-Net input channels"

    def shortDescription(self):  # noqa: N802
        return "The 11 channels ME-Net computes from a Sentinel-2 raster, as a float32 raster to inspect"

    def shortHelpString(self):  # noqa: N802
        rows = "".join(f"<li><b>{name}</b> = {formula}</li>" for name, formula in CHANNEL_HELP)
        return (
            "<p>Writes the channels exactly as 'Extract mangroves (ME-Net)' computes them before normalisation: "
            "bands identified and DN scaled to reflectance the same way, one float32 band per channel "
            "(named), NaN where the input has no data.</p>"
            f"<ol>{rows}</ol>"
            "<p>The model's channel recipe decides channels 9 and 10: v2 (the default model) needs no B12, v1 "
            "does. Ratios have 0 where their denominator is 0; the ratio indices are clipped to ±50. The pc1 basis "
            "comes from the <b>model</b> (empty = the default model), as it was fitted on its training data.</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Sentinel-2 raster"))
        self.add_options([options.MODEL, *options.INPUT])  # the model's PCA basis gives pc1
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "ME-Net input channels"))

    def job_parameters(self, parameters, context, values):
        source = gdal_raster_path(self, parameters, self.INPUT, context)
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        refuse_overwriting_inputs([output], [source])
        return {"input": source, "output": output, **values}

    def load_outputs(self, parameters, context, feedback, job, result):
        return {self.OUTPUT: job["output"]}
