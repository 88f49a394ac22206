"""Result layers in the project: styling, and where one run's layers go in the layer tree.

QGIS loads a run's result layers after the algorithm has finished and calls a post-processor per
layer; ``load_results`` asks for the loading and ``ResultLayout`` puts the layers in place.
"""
from __future__ import annotations

import os
import uuid
from typing import Dict, List, Optional

import qgis.utils
from qgis.core import (QgsColorRampShader, QgsLayerTree, QgsLayerTreeGroup, QgsLayerTreeRegistryBridge,
                       QgsMapLayer, QgsPalettedRasterRenderer, QgsProcessingContext,
                       QgsProcessingLayerPostProcessorInterface, QgsProcessingUtils, QgsProject, QgsRasterLayer,
                       QgsRasterShader, QgsSingleBandPseudoColorRenderer, QgsStyle)
from qgis.PyQt.QtGui import QColor

from ..core.io.clouds import QUALITY_COLOURS, QUALITY_NAMES  # numpy only

#: QGIS holds layer post-processors by raw pointer; Python must keep them alive.
KEEP_ALIVE: list = []
#: Probability ramp: viridis starts at dark purple, so 0 stands out from no-data and the white canvas.
PROBABILITY_RAMP = "Viridis"
STAGE_RAMP = "Magma"


def _ramp_shader(minimum: float, maximum: float, ramp_name: str, classes: int = 5) -> QgsRasterShader:
    ramp = QgsStyle.defaultStyle().colorRamp(ramp_name)
    shader_fn = QgsColorRampShader(minimum, maximum, ramp)
    shader_fn.setColorRampType(QgsColorRampShader.Type.Interpolated)
    shader_fn.classifyColorRamp(classes, -1)
    shader = QgsRasterShader()
    shader.setRasterShaderFunction(shader_fn)
    return shader


def style_probability(layer: QgsRasterLayer) -> None:
    """0-1 viridis ramp on band 1 (no-data stays transparent)."""
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, _ramp_shader(0.0, 1.0, PROBABILITY_RAMP))
    renderer.setClassificationMin(0.0)
    renderer.setClassificationMax(1.0)
    layer.setRenderer(renderer)
    layer.triggerRepaint()


def style_quality(layer: QgsRasterLayer) -> None:
    """The quality layer's codes as named classes (clear transparent): why a pixel has no probability."""
    classes = [QgsPalettedRasterRenderer.Class(code, QColor(*QUALITY_COLOURS[code]), QUALITY_NAMES[code])
               for code in sorted(QUALITY_NAMES)]
    layer.setRenderer(QgsPalettedRasterRenderer(layer.dataProvider(), 1, classes))
    layer.triggerRepaint()


def style_stage(layer: QgsRasterLayer) -> None:
    """Band 1 (the mean activation in compact mode) on a ramp stretched over its 2-98 % range,
    instead of QGIS's default RGB of mean/max/std (noise for stage3, black for stage5)."""
    provider = layer.dataProvider()
    low, high = provider.cumulativeCut(1, 0.02, 0.98, layer.extent(), 250000)
    if not (high > low):
        high = low + 1.0
    renderer = QgsSingleBandPseudoColorRenderer(provider, 1, _ramp_shader(low, high, STAGE_RAMP))
    renderer.setClassificationMin(low)
    renderer.setClassificationMax(high)
    layer.setRenderer(renderer)
    layer.triggerRepaint()


class ResultLayout:
    """Where one run's layers go in the layer tree, and what the desktop is left on afterwards.

    The probability goes on top of its branch with the run's stage group right below it — collapsed
    and unchecked, so it never covers the result — holding this run's stages in stage order.  The
    group is this run's by a custom property (two batch rows may share an input name); results never
    stay inside any stage group, even when QGIS inserted them there.  Post-processors run per layer in
    an order QGIS chooses; each calls ``arrange``, which puts whatever has been loaded so far in place,
    then ``settle``.
    """

    def __init__(self, group_name: str, stage_names: List[str], input_id: str = "", input_source: str = ""):
        self.group_name, self.stage_names = group_name, list(stage_names)
        self.run_id = uuid.uuid4().hex
        self.input_id, self.input_source = input_id, input_source
        self.probability_id: Optional[str] = None
        self.quality_id: Optional[str] = None  # the quality layer: below the probability and its stages
        self.stage_ids: Dict[str, str] = {}

    def branch(self, project: QgsProject) -> QgsLayerTreeGroup:
        """The group the results belong in: where QGIS put the probability (else a stage), outside
        every stage group."""
        root = project.layerTreeRoot()
        anchors = [self.probability_id] + [self.stage_ids[n] for n in self.stage_names if n in self.stage_ids]
        node = next((root.findLayer(i) for i in anchors if i and root.findLayer(i) is not None), None)
        parent = node.parent() if node is not None else root
        while parent is not root and is_stage_group(parent):
            parent = parent.parent()
        return parent

    def arrange(self, project: QgsProject) -> None:
        root = project.layerTreeRoot()
        parent = self.branch(project)
        prob = root.findLayer(self.probability_id) if self.probability_id else None
        if prob is not None:
            prob = _move(prob, parent, 0)
        quality = root.findLayer(self.quality_id) if self.quality_id else None
        position = 1 if prob is not None else 0
        if self.stage_ids:
            self._arrange_stages(root, parent, position)
            position += 1
        if quality is not None:  # below the probability: it shows through where the probability is no-data
            _move(quality, parent, position)

    def _arrange_stages(self, root, parent, position: int) -> None:
        group = find_stage_group(root, self.run_id)
        if group is None:
            group = parent.insertGroup(position, self.group_name)
            group.setCustomProperty(STAGE_GROUP_PROPERTY, self.run_id)
        else:
            group = _move(group, parent, position)
        for index, name in enumerate(n for n in self.stage_names if n in self.stage_ids):
            node = root.findLayer(self.stage_ids[name])
            if node is not None:
                _move(node, group, index)
        group.setExpanded(False)
        group.setItemVisibilityChecked(False)

    def settle(self, project: QgsProject) -> None:
        """Leave the desktop ready for the next step: the input stays the active layer (so the next
        Extract defaults to the scene again, not to a one-band result it cannot map) and new layers go
        on top of the results' branch — never into the hidden stage group that QGIS's "above the
        current layer" rule would otherwise pick once a stage was the last layer loaded.  Without a
        desktop (qgis_process, scripts) only the insertion point is set."""
        iface = getattr(qgis.utils, "iface", None)
        active = self.input_layer(project) or project.mapLayer(self.probability_id or "")
        if iface is not None and active is not None and QgsProject.instance().mapLayer(active.id()) is not None:
            iface.setActiveLayer(active)  # QGIS then puts the insertion point above it: ours comes after
        project.layerTreeRegistryBridge().setLayerInsertionPoint(
            QgsLayerTreeRegistryBridge.InsertionPoint(self.branch(project), 0))

    def input_layer(self, project: QgsProject) -> Optional[QgsMapLayer]:
        """The run's input in the project: the layer itself, or (a batch row given a file) a layer of
        that file outside every stage group."""
        if self.input_id and project.mapLayer(self.input_id) is not None:
            return project.mapLayer(self.input_id)
        root = project.layerTreeRoot()
        for layer in project.mapLayers().values():
            node = root.findLayer(layer.id())
            if (node is not None and not _inside_stage_group(node) and self.input_source
                    and same_file(layer.source().split("|")[0], self.input_source)):
                return layer
        return None


#: Custom property of a stage group: the id of the run whose stages it holds.
STAGE_GROUP_PROPERTY = "menet_qgis/stage_group_of_run"


def is_stage_group(node) -> bool:
    return QgsLayerTree.isGroup(node) and bool(node.customProperty(STAGE_GROUP_PROPERTY))


def _inside_stage_group(node) -> bool:
    parent = node.parent()
    while parent is not None:
        if is_stage_group(parent):
            return True
        parent = parent.parent()
    return False


def find_stage_group(group: QgsLayerTreeGroup, run_id: str) -> Optional[QgsLayerTreeGroup]:
    """The stage group of run ``run_id`` anywhere under ``group``."""
    for child in group.children():
        if QgsLayerTree.isGroup(child):
            if child.customProperty(STAGE_GROUP_PROPERTY) == run_id:
                return child
            found = find_stage_group(child, run_id)
            if found is not None:
                return found
    return None


def _move(node, parent, index: int):
    """Put a layer-tree node at ``index`` under ``parent``; returns the node now in the tree.
    The clone goes in before the original leaves, so QGIS never drops the layer."""
    if node.parent() is parent and parent.children().index(node) == index:
        return node
    clone = node.clone()
    old_parent = node.parent()
    if old_parent is parent and parent.children().index(node) < index:
        index += 1
    parent.insertChildNode(index, clone)
    old_parent.removeChildNode(node)
    return clone


class ResultLayerPlacer(QgsProcessingLayerPostProcessorInterface):
    """Styles one loaded result layer (probability or a stage) and places it with ``ResultLayout``."""

    def __init__(self, layout: ResultLayout, role: str):
        super().__init__()
        self.layout, self.role = layout, role

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802
        if not isinstance(layer, QgsRasterLayer):
            return
        if self.role == "probability":
            style_probability(layer)
            self.layout.probability_id = layer.id()
        elif self.role == "quality":
            style_quality(layer)
            self.layout.quality_id = layer.id()
        else:
            style_stage(layer)
            self.layout.stage_ids[self.role] = layer.id()
        project = context.project() or QgsProject.instance()
        self.layout.arrange(project)
        self.layout.settle(project)


def load_results(context: QgsProcessingContext, probability: str, stages: Dict[str, str],
                 input_layer: QgsMapLayer, input_source: str, quality: Optional[str] = None) -> None:
    """Name, style and place the probability layer and load the stage layers with it — explicitly as
    rasters, so QGIS does not try OGR on them first — when the run loads its result (the dialog's
    "Open output file after running", the batch dialog's "Load layers on completion"); without the
    probability the stage layers and the quality layer are not loaded either."""
    if not context.willLoadLayerOnCompletion(probability):
        return
    layout = ResultLayout(f"ME-Net stages — {input_layer.name()}", list(stages), input_layer.id(), input_source)
    details = context.layerToLoadOnCompletionDetails(probability)
    details.name = f"{input_layer.name()} mangrove probability"
    details.forceName = True
    details.layerTypeHint = QgsProcessingUtils.LayerHint.Raster
    placer = ResultLayerPlacer(layout, "probability")
    KEEP_ALIVE.append(placer)
    details.setPostProcessor(placer)
    _sort_key(details, 0)
    project = details.project  # where the user asked the probability to go: the stages go there too
    if quality:
        details = QgsProcessingContext.LayerDetails(f"{input_layer.name()} quality (why no probability)", project,
                                                    "quality")
        details.layerTypeHint = QgsProcessingUtils.LayerHint.Raster
        details.forceName = True
        placer = ResultLayerPlacer(layout, "quality")
        KEEP_ALIVE.append(placer)
        details.setPostProcessor(placer)
        _sort_key(details, 0)
        context.addLayerToLoadOnCompletion(quality, details)
    for order, (name, path) in enumerate(stages.items(), 1):
        details = QgsProcessingContext.LayerDetails(f"{input_layer.name()} {name}", project, name)
        details.layerTypeHint = QgsProcessingUtils.LayerHint.Raster
        details.forceName = True
        placer = ResultLayerPlacer(layout, name)
        KEEP_ALIVE.append(placer)
        details.setPostProcessor(placer)
        _sort_key(details, order)
        context.addLayerToLoadOnCompletion(path, details)


def _sort_key(details, order: int) -> None:
    """QGIS 3.32+ orders result layers itself (layerSortKey); 3.22 relies on ResultLayout."""
    if hasattr(details, "layerSortKey"):
        details.layerSortKey = order


def same_file(a: str, b: str) -> bool:
    return bool(a) and bool(b) and os.path.realpath(a) == os.path.realpath(b)
