"""Pieces every ME-Net algorithm shares: feedback bridge, error translation, layer styling."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from qgis.core import (QgsColorRampShader, QgsProcessingException, QgsProcessingLayerPostProcessorInterface,
                       QgsProject, QgsRasterLayer, QgsRasterShader, QgsSingleBandPseudoColorRenderer,
                       QgsStyle)
from qgis.PyQt.QtGui import QColor

#: QGIS holds layer post-processors by raw pointer; Python must keep them alive.
KEEP_ALIVE: list = []

MISSING_TORCH = ("ME-Net needs PyTorch and torchvision in QGIS's Python ({error}). Install them with "
                 "'python3 -m pip install --user torch torchvision' for the Python QGIS runs, then restart QGIS.")


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
        shader_fn.setColorRampType(QgsColorRampShader.Interpolated)
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
