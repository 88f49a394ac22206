"""Processing algorithm "Extract mangroves (ME-Net)", id ``menet:extractmangroves``."""
from __future__ import annotations

from pathlib import Path

from qgis.core import (QgsProcessingContext,
                       QgsProcessingException, QgsProcessingOutputMultipleLayers,
                       QgsProcessingParameterEnum, QgsProcessingParameterExtent, QgsProcessingParameterFile,
                       QgsProcessingParameterFolderDestination, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterDestination, QgsProcessingParameterRasterLayer)

from ..core.stages import STAGE_NAMES  # torch-free, like ..core.tiling
from ..core.tiling import check_window
from ..resources import default_model_path
from .common import (KEEP_ALIVE, GroupInserter, MENetAlgorithm, ProbabilityStyler, advanced, band_choice,
                     band_parameters, check_band_parameters, gdal_raster_path, load_core, make_reporter,
                     processing_errors)

STAGE_MODES = ["compact (mean, max, std of channels)", "all channels"]
DEVICES = ["auto", "cuda", "cpu"]


def resolve_model(path: str) -> Path:
    """The user's model file, else the default model shipped with the plugin."""
    if path:
        return Path(path)
    default = default_model_path()
    if not default.is_file():
        raise QgsProcessingException(f"no model given and no default model installed at {default}; "
                                     "train one with 'Train ME-Net' and pass it as MODEL")
    return default


class ExtractMangrovesAlgorithm(MENetAlgorithm):
    INPUT, MODEL, OUTPUT = "INPUT", "MODEL", "OUTPUT"
    EXTENT = "EXTENT"
    WINDOW_SIZE, OVERLAP, BATCH_SIZE, DEVICE = "WINDOW_SIZE", "OVERLAP", "BATCH_SIZE", "DEVICE"
    STAGES, STAGE_MODE, STAGE_FOLDER, STAGE_LAYERS = "STAGES", "STAGE_MODE", "STAGE_FOLDER", "STAGE_LAYERS"

    def name(self):
        return "extractmangroves"

    def displayName(self):  # noqa: N802
        return "Extract mangroves (ME-Net)"

    def shortDescription(self):  # noqa: N802
        return "Mangrove probability and ResNet-101 stage feature layers from a Sentinel-2 raster"

    def shortHelpString(self):  # noqa: N802
        from ..core.stages import stage_table  # torch-free
        table = stage_table(256).replace("\n", "<br>")
        return (
            "<p>Runs ME-Net — a ResNet-101 encoder (11-channel conv1) whose stage maps feed the ME-Net head — "
            "over the raster in overlapping windows, on the GPU when torch sees one, and writes a float32 "
            "mangrove probability (0–1) on exactly the input grid; no-data where the input has none.</p>"
            "<p><b>Input</b>: a Sentinel-2 raster whose bands are named (Blue, Green, Red, NIR, SWIR1, SWIR2 or "
            "B2…B12; set the six band parameters when they are not), integer DN or reflectance, or an 11-band "
            "ME-Net stack. <b>Model</b>: a checkpoint from 'Train ME-Net'; empty = the default model.</p>"
            "<p><b>Window size / overlap</b>: multiples of 32 px; overlaps are blended with linear weights "
            "(no seams). <b>Batch size</b> 0 = automatic (smaller on GPU out-of-memory).</p>"
            "<p><b>Stage layers</b>: each chosen stage is written as a GeoTIFF at its own resolution (input "
            "pixel × stride, same origin). <i>Compact</i> writes 3 bands per stage — mean, maximum and "
            "standard deviation over the stage's channels, a summary one can look at; <i>all channels</i> "
            "writes every channel (size estimated in the log first).</p>"
            f"<pre>{table}</pre>"
            "<p>stage4/stage5 are 16×16×1024 and 8×8×2048 at 256² (stock ResNet-101), not the 8×8×1024 / 4×4×2048 "
            "of the paper's figure, which implies one more downsampling that no public code explains.</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Sentinel-2 raster"))
        self.addParameter(QgsProcessingParameterFile(self.MODEL, "Model checkpoint (empty = default model)",
                                                     extension="pt", optional=True))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Process only this extent", optional=True))
        self.addParameter(QgsProcessingParameterEnum(self.STAGES, "Stage feature layers to write", STAGE_NAMES,
                                                     allowMultiple=True, optional=True, defaultValue=[]))
        self.addParameter(QgsProcessingParameterEnum(self.STAGE_MODE, "Stage layer content", STAGE_MODES,
                                                     defaultValue=0))
        for param in band_parameters(self.INPUT) + advanced([
            QgsProcessingParameterNumber(self.WINDOW_SIZE, "Window size (px, multiple of 32; 0 = the model's, 256)",
                                         QgsProcessingParameterNumber.Type.Integer, 0, minValue=0, maxValue=2048),
            QgsProcessingParameterNumber(self.OVERLAP, "Window overlap (px, multiple of 32)",
                                         QgsProcessingParameterNumber.Type.Integer, 64, minValue=0, maxValue=1024),
            QgsProcessingParameterNumber(self.BATCH_SIZE, "Batch size (0 = automatic)",
                                         QgsProcessingParameterNumber.Type.Integer, 0, minValue=0, maxValue=1024),
            QgsProcessingParameterEnum(self.DEVICE, "Device", DEVICES, defaultValue=0),
        ]):
            self.addParameter(param)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Mangrove probability"))
        self.addParameter(QgsProcessingParameterFolderDestination(
            self.STAGE_FOLDER, "Folder for stage layers (empty = beside the probability)", optional=True,
            createByDefault=False))
        self.addOutput(QgsProcessingOutputMultipleLayers(self.STAGE_LAYERS, "Stage feature layers"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        window = self.parameterAsInt(parameters, self.WINDOW_SIZE, context)
        try:
            check_window(window or 256, self.parameterAsInt(parameters, self.OVERLAP, context))
        except ValueError as exc:
            return False, str(exc)
        problem = check_band_parameters(self, parameters, context)
        if problem:
            return False, problem
        return super().checkParameterValues(parameters, context)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        checkpoint, engine, raster_io = load_core()
        source_path = gdal_raster_path(self, parameters, self.INPUT, context)
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        bands, dn_offset = band_choice(self, parameters, context)
        bounds = None
        if parameters.get(self.EXTENT) not in (None, ""):
            rect = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
            if rect.isNull() or rect.isEmpty():
                raise QgsProcessingException("the processing extent is empty")
            bounds = (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())
        stages = [STAGE_NAMES[i] for i in self.parameterAsEnums(parameters, self.STAGES, context)]
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        stage_dir = self.parameterAsString(parameters, self.STAGE_FOLDER, context) or None
        options = engine.EngineOptions(
            window=self.parameterAsInt(parameters, self.WINDOW_SIZE, context),
            overlap=self.parameterAsInt(parameters, self.OVERLAP, context),
            batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
            device=DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)],
            stages=stages, stage_mode=["compact", "all"][self.parameterAsEnum(parameters, self.STAGE_MODE, context)])
        model_path = resolve_model(self.parameterAsFile(parameters, self.MODEL, context))
        with processing_errors():
            source = raster_io.RasterInput(source_path, band_numbers=bands,
                                           dn_offset=dn_offset, bounds=bounds)
            bundle = checkpoint.load(model_path)
            if not bundle.trained:
                feedback.reportError(f"model {model_path.name} is UNTRAINED (random weights): the probability "
                                     "is meaningless; use it only to test the pipeline", fatalError=False)
            try:
                result = engine.extract(bundle, source, output, options, make_reporter(feedback), stage_dir)
            except engine.Cancelled:
                raise QgsProcessingException("cancelled: no output was written") from None
        self._load_stage_layers(result, context, layer.name())
        return {self.OUTPUT: str(result.probability),
                self.STAGE_LAYERS: [str(p) for p in result.stages.values()]}

    def _load_stage_layers(self, result, context: QgsProcessingContext, input_name: str):
        """Style the probability layer when it loads; load stage layers into one group."""
        if context.willLoadLayerOnCompletion(str(result.probability)):
            styler = ProbabilityStyler()
            KEEP_ALIVE.append(styler)
            context.layerToLoadOnCompletionDetails(str(result.probability)).setPostProcessor(styler)
        group = f"ME-Net stages — {input_name}"
        for name, path in result.stages.items():
            inserter = GroupInserter(group)
            KEEP_ALIVE.append(inserter)
            details = QgsProcessingContext.LayerDetails(f"{input_name} {name}", context.project(), name)
            details.setPostProcessor(inserter)
            context.addLayerToLoadOnCompletion(str(path), details)
