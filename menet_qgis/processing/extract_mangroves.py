"""Processing algorithm "Extract mangroves (ME-Net)", id ``menet:extractmangroves``."""
from __future__ import annotations

from pathlib import Path

from qgis.core import (QgsProcessingException, QgsProcessingOutputMultipleLayers, QgsProcessingOutputNumber,
                       QgsProcessingParameterBoolean, QgsProcessingParameterEnum,
                       QgsProcessingParameterExtent, QgsProcessingParameterFile, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterDestination, QgsProcessingParameterRasterLayer)

from ..options import DEFAULT_OVERLAP, PRECISIONS, RUNTIMES  # stdlib only
from ..core.model.stages import STAGES, STAGE_NAMES  # torch-free, like ..core.tiling
from ..core.inference.tiling import check_window
from .common import (DEVICES, MENetAlgorithm, advanced, band_choice, band_parameters, check_band_parameters,
                     gdal_raster_path, has_value, load_results, refuse_overwriting_input)
from .engine_client import run_job

STAGE_MODES = ["compact (mean, max, std of channels)", "all channels"]
#: What the stage selector lists: the name with its stride and channel count.
STAGE_OPTIONS = [f"{s.name} — 1/{s.stride} resolution, {s.channels} channels" for s in STAGES]


def stage_table_html(window: int = 256) -> str:
    """The stage table, compact enough for the help panel at the dialog's default size."""
    rows = "".join(f"<tr><td>{s.name}</td><td>{s.node}</td><td>{s.stride}</td><td>{s.channels}</td>"
                   f"<td>{s.map_size(window)}×{s.map_size(window)}×{s.channels}</td></tr>" for s in STAGES)
    return ("<table border='0' cellspacing='0' cellpadding='2'><tr><th>stage</th><th>node</th><th>stride</th>"
            f"<th>ch.</th><th>map at {window}²</th></tr>{rows}</table>")


class ExtractMangrovesAlgorithm(MENetAlgorithm):
    INPUT, MODEL, OUTPUT = "INPUT", "MODEL", "OUTPUT"
    EXTENT = "EXTENT"
    WINDOW_SIZE, OVERLAP, BATCH_SIZE, DEVICE = "WINDOW_SIZE", "OVERLAP", "BATCH_SIZE", "DEVICE"
    RUNTIME, THREADS, PRECISION, TTA = "RUNTIME", "THREADS", "PRECISION", "TTA"
    STAGES, STAGE_MODE, STAGE_FOLDER, STAGE_LAYERS = "STAGES", "STAGE_MODE", "STAGE_FOLDER", "STAGE_LAYERS"
    THRESHOLD = "THRESHOLD"

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
            "<p>stage4/5 follow stock ResNet-101 (16² and 8² at 256²), not the paper figure's 8² / 4².</p>"
            "<p>The engine runs in its own Python process (see the log for which Python).</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Sentinel-2 raster"))
        model = QgsProcessingParameterFile(self.MODEL, "Model checkpoint", optional=True,
                                           fileFilter="ME-Net models (*.pt *.onnx)")
        model.setHelp("An ME-Net checkpoint (.pt) from 'Train ME-Net', or one exported to ONNX (.onnx: maps "
                      "without PyTorch); empty = the default model")
        self.addParameter(model)
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Process only this extent", optional=True))
        self.addParameter(QgsProcessingParameterEnum(self.STAGES, "Stage layers", STAGE_OPTIONS,
                                                     allowMultiple=True, optional=True, defaultValue=[]))
        self.addParameter(QgsProcessingParameterEnum(self.STAGE_MODE, "Stage layer content", STAGE_MODES,
                                                     defaultValue=0))
        folder = QgsProcessingParameterFile(self.STAGE_FOLDER, "Stage layer folder",
                                            behavior=QgsProcessingParameterFile.Behavior.Folder, optional=True)
        folder.setHelp("Where stage layers are written as <probability name>_stageN.tif; empty = beside the "
                       "probability")
        window = QgsProcessingParameterNumber(self.WINDOW_SIZE, "Window size (px)",
                                              QgsProcessingParameterNumber.Type.Integer, 0, minValue=0, maxValue=2048)
        window.setHelp("Multiple of 32; 0 = the model's recommendation (256)")
        overlap = QgsProcessingParameterNumber(self.OVERLAP, "Window overlap (px)",
                                               QgsProcessingParameterNumber.Type.Integer, DEFAULT_OVERLAP, minValue=0,
                                               maxValue=1024)
        overlap.setHelp("Multiple of 32, less than the window size; overlaps are blended")
        batch = QgsProcessingParameterNumber(self.BATCH_SIZE, "Batch size", QgsProcessingParameterNumber.Type.Integer, 0,
                                             minValue=0, maxValue=1024)
        batch.setHelp("Windows per forward pass; 0 = automatic (halved on GPU out-of-memory)")
        runtime = QgsProcessingParameterEnum(self.RUNTIME, "Runtime", list(RUNTIMES), defaultValue=0)
        runtime.setHelp("auto = PyTorch on a CUDA GPU, else OpenVINO if installed, else ONNX Runtime, else "
                        "PyTorch (the log says which and why). The ONNX runtimes map 1.3-1.7x faster on a quiet CPU "
                        "(more on a busy one) and "
                        "need no PyTorch once the model is exported (done once, cached)")
        threads = QgsProcessingParameterNumber(self.THREADS, "CPU threads", QgsProcessingParameterNumber.Type.Integer, 0,
                                               minValue=0, maxValue=256)
        threads.setHelp("Threads of the runtime on the CPU; 0 = every core the process may use")
        precision = QgsProcessingParameterEnum(self.PRECISION, "Precision", list(PRECISIONS), defaultValue=0)
        precision.setHelp("auto = bf16 on CUDA, fp32 on the CPU. bf16 on the CPU (OpenVINO on CPUs with "
                          "AVX512-BF16/AMX, or PyTorch) is about 2x faster; probabilities change by up to ~0.02 "
                          "and a few pixels in 10,000 change class")
        # optional: graphical models saved before this parameter existed stay valid (QGIS 3.22 refuses a
        # mandatory boolean a model's child has no value for)
        tta = QgsProcessingParameterBoolean(self.TTA, "Test-time flips (8x slower)", defaultValue=False,
                                            optional=True)
        tta.setHelp("Average the model over the 8 flips/rotations of every window: +0.04-0.8 F1 points on the "
                    "validation and held-out coasts, for 8x the model's time")
        for param in advanced([folder]) + band_parameters(self.INPUT) + advanced([
                window, overlap, batch, QgsProcessingParameterEnum(self.DEVICE, "Device", DEVICES, defaultValue=0),
                runtime, threads, precision, tta]):
            self.addParameter(param)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Mangrove probability"))
        self.addOutput(QgsProcessingOutputMultipleLayers(self.STAGE_LAYERS, "Stage feature layers"))
        # The model's decision threshold (chosen on validation): model chains threshold with it.
        self.addOutput(QgsProcessingOutputNumber(self.THRESHOLD, "Model's mangrove threshold"))

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
        source_path = gdal_raster_path(self, parameters, self.INPUT, context)
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        bands, dn_offset = band_choice(self, parameters, context)
        bounds = None
        if has_value(parameters, self.EXTENT):
            rect = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
            if rect.isNull() or rect.isEmpty():
                raise QgsProcessingException("the processing extent is empty")
            bounds = [rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()]
        stages = [STAGE_NAMES[i] for i in self.parameterAsEnums(parameters, self.STAGES, context)]
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        stage_dir = self.parameterAsFile(parameters, self.STAGE_FOLDER, context) or None
        refuse_overwriting_input(output, {"input raster": source_path})
        params = {
            "input": source_path, "output": output, "bands": bands, "dn_offset": dn_offset, "bounds": bounds,
            "model": self.parameterAsFile(parameters, self.MODEL, context) or None, "stage_dir": stage_dir,
            "options": {
                "window": self.parameterAsInt(parameters, self.WINDOW_SIZE, context),
                "overlap": self.parameterAsInt(parameters, self.OVERLAP, context),
                "batch_size": self.parameterAsInt(parameters, self.BATCH_SIZE, context),
                "device": DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)],
                "stages": stages,
                "stage_mode": ["compact", "all"][self.parameterAsEnum(parameters, self.STAGE_MODE, context)]}}
        params["options"].update(self.extra_engine_options(parameters, context))
        folder = Path(stage_dir) if stage_dir else Path(output).parent
        expected = [output] + [str(folder / f"{Path(output).stem}_{name}.tif") for name in stages]
        result = run_job("extract", params, feedback, outputs=expected)
        load_results(context, output, result.get("stages", {}), layer, source_path)
        return {self.OUTPUT: output, self.STAGE_LAYERS: list(result.get("stages", {}).values()),
                self.THRESHOLD: float(result.get("threshold", 0.5))}

    def extra_engine_options(self, parameters, context) -> dict:
        """The runtime fields of EngineOptions (see core/inference/runtimes.py)."""
        return {"runtime": RUNTIMES[self.parameterAsEnum(parameters, self.RUNTIME, context)],
                "threads": self.parameterAsInt(parameters, self.THREADS, context),
                "precision": PRECISIONS[self.parameterAsEnum(parameters, self.PRECISION, context)],
                "tta": self.parameterAsBoolean(parameters, self.TTA, context)}
