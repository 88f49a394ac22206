"""Pieces every ME-Net algorithm shares: feedback bridge, error translation, layer styling."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from qgis.core import (QgsColorRampShader, QgsProcessingAlgorithm, QgsProcessingException,
                       QgsProcessingLayerPostProcessorInterface, QgsProcessingParameterDefinition,
                       QgsProject, QgsRasterLayer, QgsRasterShader, QgsSingleBandPseudoColorRenderer,
                       QgsStyle)
from qgis.PyQt.QtGui import QIcon

from ..resources import icon_path

#: QGIS holds layer post-processors by raw pointer; Python must keep them alive.
KEEP_ALIVE: list = []

#: Explicit band numbers, in the recipe's source-band order (B2, B3, B4, B8, B11, B12).
BAND_PARAMS = [("BAND_BLUE", "B2 blue"), ("BAND_GREEN", "B3 green"), ("BAND_RED", "B4 red"),
               ("BAND_NIR", "B8 NIR"), ("BAND_SWIR1", "B11 SWIR-1"), ("BAND_SWIR2", "B12 SWIR-2")]
DN_OFFSET = "DN_OFFSET"

MISSING_TORCH = ("ME-Net needs PyTorch and torchvision in QGIS's Python ({error}). Install them with "
                 "'python3 -m pip install --user torch torchvision' for the Python QGIS runs, then restart QGIS.")


class MENetAlgorithm(QgsProcessingAlgorithm):
    """What every ME-Net algorithm shares: the icon and fresh instances for Processing."""

    def icon(self):
        return QIcon(str(icon_path()))

    def createInstance(self):  # noqa: N802
        return type(self)()


def load_core():
    """Import the core lazily so the provider loads (and explains) without torch."""
    try:
        from ..core import checkpoint, engine, raster_io  # noqa: F401
    except ImportError as exc:
        raise QgsProcessingException(MISSING_TORCH.format(error=exc)) from None
    return checkpoint, engine, raster_io


@contextlib.contextmanager
def processing_errors() -> Iterator[None]:
    """Turn the core's errors into one-line QgsProcessingExceptions."""
    try:
        yield
    except QgsProcessingException:
        raise
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise QgsProcessingException(str(exc)) from None


def make_reporter(feedback):
    """A core Reporter that forwards to QgsProcessingFeedback."""
    from ..core.engine import Reporter

    class FeedbackReporter(Reporter):
        def info(self, message):
            feedback.pushInfo(message)

        def warn(self, message):
            feedback.reportError(message, fatalError=False)

        def progress(self, percent):
            feedback.setProgress(percent)

        def cancelled(self):
            return feedback.isCanceled()

    return FeedbackReporter()


class ProbabilityStyler(QgsProcessingLayerPostProcessorInterface):
    """Styles the probability layer with a 0-1 colour ramp once QGIS loads it."""

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802
        if not isinstance(layer, QgsRasterLayer):
            return
        ramp = QgsStyle.defaultStyle().colorRamp("Greens") or QgsStyle.defaultStyle().colorRamp("Viridis")
        shader_fn = QgsColorRampShader(0.0, 1.0, ramp)
        shader_fn.setColorRampType(QgsColorRampShader.Type.Interpolated)
        shader_fn.classifyColorRamp(5, -1)
        shader = QgsRasterShader()
        shader.setRasterShaderFunction(shader_fn)
        renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader)
        renderer.setClassificationMin(0.0)
        renderer.setClassificationMax(1.0)
        layer.setRenderer(renderer)
        layer.triggerRepaint()


class GroupInserter(QgsProcessingLayerPostProcessorInterface):
    """Moves a loaded layer into a named layer group (QGIS 3.22 has no groupName on LayerDetails)."""

    def __init__(self, group_name: str):
        super().__init__()
        self.group_name = group_name

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802
        project: Optional[QgsProject] = context.project()
        if project is None:
            return
        root = project.layerTreeRoot()
        group = root.findGroup(self.group_name) or root.insertGroup(0, self.group_name)
        node = root.findLayer(layer.id())
        if node is not None and node.parent() is not group:
            group.addChildNode(node.clone())
            node.parent().removeChildNode(node)


def polygons_as_geojson(source, target_crs, context) -> list:
    """Features of a QGIS feature source as GeoJSON-like dicts in ``target_crs``."""
    import json

    from qgis.core import QgsCoordinateTransform, QgsFeatureRequest
    transform = QgsCoordinateTransform(source.sourceCrs(), target_crs, context.transformContext())
    shapes = []
    for feature in source.getFeatures(QgsFeatureRequest()):
        geom = feature.geometry()
        if geom.isNull() or geom.isEmpty():
            continue
        geom.transform(transform)
        shapes.append(json.loads(geom.asJson()))
    return shapes


def advanced(params: list) -> list:
    """Flag parameters as advanced (folded away in the dialog) and return them."""
    for param in params:
        param.setFlags(param.flags() | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
    return params


def band_parameters(parent: str) -> list:
    """The six optional band-number parameters and DN_OFFSET, flagged advanced."""
    from qgis.core import QgsProcessingParameterBand, QgsProcessingParameterNumber
    params = [QgsProcessingParameterBand(key, f"Band {label} (empty = from band names)",
                                         parentLayerParameterName=parent, optional=True)
              for key, label in BAND_PARAMS]
    params.append(QgsProcessingParameterNumber(
        DN_OFFSET, "DN offset for integer input when metadata has none (-1000 for processing baseline 04.00+)",
        QgsProcessingParameterNumber.Type.Double, optional=True))
    return advanced(params)


def check_band_parameters(alg, parameters, context) -> Optional[str]:
    """An error message when only some of the six band numbers are set."""
    given = [b for b in (alg.parameterAsInt(parameters, key, context) for key, _ in BAND_PARAMS) if b > 0]
    if given and len(given) != len(BAND_PARAMS):
        return "Set all six band parameters (B2, B3, B4, B8, B11, B12) or none"
    return None


def band_choice(alg, parameters, context):
    """(band numbers or None, DN offset or None) from the band parameters."""
    bands = [alg.parameterAsInt(parameters, key, context) for key, _ in BAND_PARAMS]
    offset = (alg.parameterAsDouble(parameters, DN_OFFSET, context)
              if parameters.get(DN_OFFSET) not in (None, "") else None)
    return (bands if any(bands) else None), offset


def gdal_raster_path(alg, parameters, name: str, context) -> str:
    """File path of a raster layer parameter; refuses layers GDAL cannot read from a file."""
    layer = alg.parameterAsRasterLayer(parameters, name, context)
    if layer is None or not layer.isValid():
        raise QgsProcessingException(f"{name} is not a valid raster layer")
    if layer.providerType() != "gdal":
        raise QgsProcessingException(f"{name} must be a file-based (GDAL) raster, not a {layer.providerType()} layer")
    return layer.source().split("|")[0]
