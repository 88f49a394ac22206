"""Processing algorithm "Export ME-Net input channels", id ``menet:exportchannels``."""
from __future__ import annotations

from qgis.core import (QgsProcessingException, QgsProcessingParameterFile,
                       QgsProcessingParameterRasterDestination, QgsProcessingParameterRasterLayer)

from .common import (MENetAlgorithm, band_choice, band_parameters, check_band_parameters, gdal_raster_path,
                     load_core, make_reporter, processing_errors)
from .extract_mangroves import resolve_model


class ExportChannelsAlgorithm(MENetAlgorithm):
    INPUT, MODEL, OUTPUT = "INPUT", "MODEL", "OUTPUT"

    def name(self):
        return "exportchannels"

    def displayName(self):  # noqa: N802
        return "Export ME-Net input channels"

    def shortDescription(self):  # noqa: N802
        return "The 11 channels ME-Net computes from a Sentinel-2 raster, as a float32 raster to inspect"

    def shortHelpString(self):  # noqa: N802
        try:
            from ..core.channels import CHANNELS
        except ImportError:  # no torch: processAlgorithm explains how to install it
            CHANNELS = ()
        rows = "".join(f"<li><b>{c.name}</b> = {c.formula}</li>" for c in CHANNELS)
        return (
            "<p>Writes the channels exactly as 'Extract mangroves (ME-Net)' computes them before normalisation: "
            "bands identified and DN scaled to reflectance the same way, one float32 band per channel "
            "(named), NaN where the input has no data.</p>"
            f"<ol>{rows}</ol>"
            "<p>Ratios have 0 where their denominator is 0; wfi and mdi are clipped to ±50. The pc1 basis "
            "comes from the <b>model</b> (empty = the default model), as it was fitted on its training data.</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Sentinel-2 raster"))
        self.addParameter(QgsProcessingParameterFile(self.MODEL, "Model checkpoint (empty = default model)",
                                                     extension="pt", optional=True))
        for param in band_parameters(self.INPUT):
            self.addParameter(param)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "ME-Net input channels"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        problem = check_band_parameters(self, parameters, context)
        if problem:
            return False, problem
        return super().checkParameterValues(parameters, context)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        checkpoint, engine, _raster_io = load_core()
        from ..core import sentinel2_product

        source_path = gdal_raster_path(self, parameters, self.INPUT, context)
        bands, dn_offset = band_choice(self, parameters, context)
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        model_path = resolve_model(self.parameterAsFile(parameters, self.MODEL, context))
        with processing_errors():
            pca = checkpoint.read_pca(model_path)
            try:
                path = sentinel2_product.export_channels(source_path, output, pca, bands, dn_offset,
                                                         make_reporter(feedback))
            except engine.Cancelled:
                raise QgsProcessingException("cancelled: no output was written") from None
        return {self.OUTPUT: str(path)}
