"""Writes resources/models/mangrove_mask.model3: a graphical model that chains
"Extract mangroves (ME-Net)" into QGIS's core "Reclassify by table" to turn the
probability into a 0/1 mangrove mask (probability >= threshold; empty threshold = the
model's own, chosen on its validation data, which Extract returns as its THRESHOLD output).

Run inside the project's environment:  .venv/bin/python scripts/make_example_model.py
(re-run it whenever an algorithm gains a parameter: every non-optional child
parameter gets its default as a static value, so the model opens valid in the
modeler).  QGIS 3.22 lists a model's inputs by name, so they are named to sort
raster first: input, model, threshold.
"""
import sys
from pathlib import Path

from qgis.core import (QgsApplication, QgsProcessingContext, QgsProcessingModelAlgorithm, QgsProcessingModelChildAlgorithm,
                       QgsProcessingModelChildParameterSource, QgsProcessingModelOutput,
                       QgsProcessingModelParameter, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterLayer, QgsProcessingParameterFile)
from qgis.PyQt.QtCore import QPointF

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "resources" / "models" / "mangrove_mask.model3"


def build() -> QgsProcessingModelAlgorithm:
    model = QgsProcessingModelAlgorithm("Mangrove mask (ME-Net)", "ME-Net")
    model.setHelpContent({"ALG_DESC": "ME-Net mangrove probability, thresholded into a 0/1 mask by Reclassify by table."})
    for param, pos in ((QgsProcessingParameterRasterLayer("input", "Sentinel-2 raster"), 80),
                       (QgsProcessingParameterFile("model", "Model checkpoint (empty = default model)",
                                                   extension="pt", optional=True), 140),
                       (QgsProcessingParameterNumber("threshold", "Mangrove threshold (empty = the model's own)",
                                                     QgsProcessingParameterNumber.Type.Double, None, True, 0.0, 1.0), 200)):
        component = QgsProcessingModelParameter(param.name())
        component.setPosition(QPointF(120, pos))
        model.addModelParameter(param, component)

    extract = QgsProcessingModelChildAlgorithm("menet:extractmangroves")
    extract.setChildId("extract")
    extract.setDescription("Extract mangroves (ME-Net)")
    extract.setPosition(QPointF(380, 120))
    extract.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("input")])
    extract.addParameterSources("MODEL", [QgsProcessingModelChildParameterSource.fromModelParameter("model")])
    model.addChildAlgorithm(extract)

    reclass = QgsProcessingModelChildAlgorithm("native:reclassifybytable")
    reclass.setChildId("mask")
    reclass.setDescription("Threshold probability")
    reclass.setPosition(QPointF(640, 120))
    reclass.addParameterSources("INPUT_RASTER", [QgsProcessingModelChildParameterSource.fromChildOutput("extract", "OUTPUT")])
    reclass.addParameterSources("RASTER_BAND", [QgsProcessingModelChildParameterSource.fromStaticValue(1)])
    # Child outputs are expression variables named <child description>_<output>, made safe.
    # var(): the name holds '-', which @name would parse as a minus.
    chosen = "coalesce(@threshold, var('Extract_mangroves__ME-Net__THRESHOLD'))"
    reclass.addParameterSources("TABLE", [QgsProcessingModelChildParameterSource.fromExpression(
        f"array(0, {chosen}, 0, {chosen}, 1, 1)")])
    reclass.addParameterSources("RANGE_BOUNDARIES", [QgsProcessingModelChildParameterSource.fromStaticValue(1)])
    reclass.addParameterSources("NO_DATA", [QgsProcessingModelChildParameterSource.fromStaticValue(255)])
    reclass.addParameterSources("DATA_TYPE", [QgsProcessingModelChildParameterSource.fromStaticValue(0)])
    reclass.addParameterSources("NODATA_FOR_MISSING", [QgsProcessingModelChildParameterSource.fromStaticValue(False)])
    output = QgsProcessingModelOutput("mangrove_mask", "Mangrove mask")
    output.setChildOutputName("OUTPUT")
    output.setChildId("mask")
    reclass.setModelOutputs({"mangrove_mask": output})
    model.addChildAlgorithm(reclass)
    for child in (extract, reclass):
        fill_mandatory_defaults(model, child.childId())
    return model


def fill_mandatory_defaults(model: QgsProcessingModelAlgorithm, child_id: str) -> None:
    """Every non-optional input of a child that has no source gets its default as a static value:
    the modeler flags a mandatory parameter without a source as an error, even when it has a default."""
    child = model.childAlgorithm(child_id)
    alg = QgsApplication.processingRegistry().algorithmById(child.algorithmId())
    if alg is None:
        raise SystemExit(f"{child.algorithmId()} is not registered: run with the ME-Net provider loaded")
    for param in alg.parameterDefinitions():
        optional = param.flags() & param.FlagOptional
        if optional or param.isDestination() or param.name() in child.parameterSources():
            continue
        child.addParameterSources(param.name(),
                                  [QgsProcessingModelChildParameterSource.fromStaticValue(param.defaultValue())])


if __name__ == "__main__":
    app = QgsApplication([], False)
    app.initQgis()
    sys.path.append("/usr/share/qgis/python/plugins")
    from processing.core.Processing import Processing
    Processing.initialize()
    sys.path.insert(0, str(ROOT))
    from menet_qgis.plugin import MENetPlugin
    plugin = MENetPlugin(None)
    plugin.initProcessing()
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    built = build()
    names = sorted(built.variablesForChildAlgorithm("mask", QgsProcessingContext()))
    if "Extract_mangroves__ME-Net__THRESHOLD" not in names:
        raise SystemExit(f"the threshold variable is not offered to the mask step: {names}")
    ok = built.toFile(str(TARGET))
    print(("wrote " if ok else "FAILED to write ") + str(TARGET))
    sys.exit(0 if ok else 1)
