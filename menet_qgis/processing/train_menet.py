"""Processing algorithm "Train ME-Net", id ``menet:trainmenet``."""
from __future__ import annotations

from pathlib import Path

from qgis.core import (QgsProcessing, QgsProcessingException, QgsProcessingOutputLayerDefinition,
                       QgsProcessingOutputNumber, QgsProcessingParameterFeatureSource,
                       QgsProcessingParameterFileDestination, QgsProcessingParameterMultipleLayers,
                       QgsProcessingParameterRasterLayer)

from .. import options
from .base import MENetAlgorithm
from .parameters import optional_raster_path, polygons_as_geojson

#: The tile folder comes first in the dialog; the rasters with labels are the other way to give data.
TILES = options.by_name(options.TRAIN, "tiles")


def default_model_output() -> str:
    """Where a trained model goes unless the user says otherwise: a real file, never a temporary one
    (QGIS deletes those on exit, and a trained model takes hours)."""
    return str(Path.home() / "menet_model.pt")


class TrainMENetAlgorithm(MENetAlgorithm):
    IMAGES, LABEL_RASTER, LABEL_POLYGONS, OUTPUT_MODEL = "IMAGES", "LABEL_RASTER", "LABEL_POLYGONS", "OUTPUT_MODEL"
    job, guide = "train", "train-menet"

    def name(self):
        return "trainmenet"

    def displayName(self):  # noqa: N802
        return "Train ME-Net"

    def shortDescription(self):  # noqa: N802
        return "Trains ME-Net on your labelled Sentinel-2 tiles, rasters or polygons; writes a model checkpoint"

    def shortHelpString(self):  # noqa: N802
        return ("<p>Trains ME-Net on your labelled Sentinel-2 data and writes a checkpoint that "
                "'Extract mangroves (ME-Net)' accepts.</p>"
                "<p><b>Training data</b>: either a folder of image/mask tile pairs (tile_NNNN.tif + mask_NNNN.tif), "
                "or Sentinel-2 rasters with labels as a mask raster (mangrove = value ≥ 0.5) or mangrove polygons; "
                "rasters are cut into 128 px windows.</p>"
                "<p>Soft mask values are thresholded at 0.5, NaN pixels are ignored, duplicated windows are kept "
                "once (where their labels disagree, the copy whose label matches the image's vegetation, else none; "
                "logged), the mangrove class is weighted against imbalance. The validation windows are chosen by "
                "location (overlapping windows and 3.84 km blocks stay on one side). Augmentation: flips and 90° "
                "rotations. The checkpoint of the best validation F1 is kept; the log shows loss and validation "
                "F1/IoU per epoch. CUDA with bf16 mixed precision when available.</p>"
                "<p><b>Channel recipe</b>: v2 (default) reads B2, B3, B4, B8, B11 — every export has them; v1 also "
                "needs B12. <b>Start from a model</b>: its weights (either recipe) are fine-tuned; a model of the "
                "chosen recipe keeps its channel statistics (another recipe's are fitted on your data). The "
                "decision threshold that maximises validation F1 (0.2–0.8) is stored in the model and used "
                "wherever it is thresholded. A stopped run continues with <b>Continue</b>.</p>"
                "<p><b>ImageNet weights</b>: optional torchvision ResNet-101 file (resnet101-*.pth); conv1 then "
                "starts as the mean of the RGB kernels × 3/11. Nothing is downloaded.</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.add_options([TILES])
        self.addParameter(QgsProcessingParameterMultipleLayers(self.IMAGES, "Or: Sentinel-2 rasters",
                                                               QgsProcessing.SourceType.TypeRaster, optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer(self.LABEL_RASTER, "Labels as a mask raster",
                                                            optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(self.LABEL_POLYGONS, "Labels as mangrove polygons",
                                                              [QgsProcessing.SourceType.TypeVectorPolygon], optional=True))
        self.add_options(o for o in options.TRAIN if o is not TILES)
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT_MODEL, "Trained model",
                                                                "ME-Net checkpoint (*.pt)",
                                                                defaultValue=default_model_output()))
        for key in ("VAL_F1", "VAL_IOU", "VAL_KAPPA"):
            self.addOutput(QgsProcessingOutputNumber(key, f"Best validation {key[4:]}"))
        self.addOutput(QgsProcessingOutputNumber("THRESHOLD", "Mangrove threshold chosen on validation"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        value = parameters.get(self.OUTPUT_MODEL)
        if isinstance(value, QgsProcessingOutputLayerDefinition):
            value = value.sink.staticValue()
        if value in (QgsProcessing.TEMPORARY_OUTPUT, "memory:"):
            return False, "choose a file for the trained model: a temporary file is deleted when QGIS closes"
        return super().checkParameterValues(parameters, context)

    def job_parameters(self, parameters, context, values):
        images = self.parameterAsLayerList(parameters, self.IMAGES, context)
        label_raster = optional_raster_path(self, parameters, self.LABEL_RASTER, context)
        polygons = self.parameterAsSource(parameters, self.LABEL_POLYGONS, context)
        out = Path(self.parameterAsFileOutput(parameters, self.OUTPUT_MODEL, context))
        if out.suffix != ".pt":
            raise QgsProcessingException(f"the model file {out.name} must end in .pt")
        if values["tiles"] and images:
            raise QgsProcessingException("give either a tile folder or rasters with labels, not both")
        if not values["tiles"] and not images:
            raise QgsProcessingException("no training data: give a tile folder, or rasters with labels")
        if images and (label_raster is None) == (polygons is None):
            raise QgsProcessingException("with rasters, give the labels as a mask raster or as polygons")
        job = {"output": str(out), **values}
        if images:
            job["images"] = [layer.source().split("|")[0] for layer in images]  # raster layers: GDAL sources
            job["label_raster"] = label_raster
            if polygons is not None:
                job["label_polygons"] = [polygons_as_geojson(polygons, layer.crs(), context) for layer in images]
        return job

    def load_outputs(self, parameters, context, feedback, job, result):
        best = result.get("best", {})
        return {self.OUTPUT_MODEL: job["output"], "VAL_F1": best.get("f1"), "VAL_IOU": best.get("iou"),
                "VAL_KAPPA": best.get("kappa"), "THRESHOLD": result.get("threshold")}
