"""Writes resources/models/mangrove_mask.model3: a graphical model that chains
"Extract mangroves (ME-Net)" into QGIS's core "Reclassify by table" to turn the
probability into a 0/1 mangrove mask (probability >= threshold).

Run inside the project's environment:  .venv/bin/python scripts/make_example_model.py
Open the result in QGIS's graphical modeler to see or extend the chain.
"""
import sys
from pathlib import Path

from qgis.core import (QgsApplication, QgsProcessingModelAlgorithm, QgsProcessingModelChildAlgorithm,
                       QgsProcessingModelChildParameterSource, QgsProcessingModelOutput,
                       QgsProcessingModelParameter, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterLayer, QgsProcessingParameterFile)
from qgis.PyQt.QtCore import QPointF

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "resources" / "models" / "mangrove_mask.model3"


def build() -> QgsProcessingModelAlgorithm:
    model = QgsProcessingModelAlgorithm("Mangrove mask (ME-Net)", "ME-Net")
    model.setHelpContent({"ALG_DESC": "ME-Net mangrove probability, thresholded into a 0/1 mask by Reclassify by table."})
    for param, pos in ((QgsProcessingParameterRasterLayer("scene", "Sentinel-2 raster"), 80),
                       (QgsProcessingParameterFile("model", "Model checkpoint (empty = default model)",
                                                   extension="pt", optional=True), 140),
                       (QgsProcessingParameterNumber("threshold", "Mangrove threshold",
                                                     QgsProcessingParameterNumber.Type.Double, 0.5, False, 0.0, 1.0), 200)):
        component = QgsProcessingModelParameter(param.name())
        component.setPosition(QPointF(120, pos))
        model.addModelParameter(param, component)

    extract = QgsProcessingModelChildAlgorithm("menet:extractmangroves")
    extract.setChildId("extract")
    extract.setDescription("Extract mangroves (ME-Net)")
    extract.setPosition(QPointF(380, 120))
    extract.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("scene")])
    extract.addParameterSources("MODEL", [QgsProcessingModelChildParameterSource.fromModelParameter("model")])
    model.addChildAlgorithm(extract)

    reclass = QgsProcessingModelChildAlgorithm("native:reclassifybytable")
    reclass.setChildId("mask")
    reclass.setDescription("Threshold probability")
    reclass.setPosition(QPointF(640, 120))
    reclass.addParameterSources("INPUT_RASTER", [QgsProcessingModelChildParameterSource.fromChildOutput("extract", "OUTPUT")])
    reclass.addParameterSources("RASTER_BAND", [QgsProcessingModelChildParameterSource.fromStaticValue(1)])
    reclass.addParameterSources("TABLE", [QgsProcessingModelChildParameterSource.fromExpression(
        "array(0, @threshold, 0, @threshold, 1, 1)")])
    reclass.addParameterSources("RANGE_BOUNDARIES", [QgsProcessingModelChildParameterSource.fromStaticValue(1)])
    reclass.addParameterSources("NO_DATA", [QgsProcessingModelChildParameterSource.fromStaticValue(255)])
    reclass.addParameterSources("DATA_TYPE", [QgsProcessingModelChildParameterSource.fromStaticValue(0)])
    output = QgsProcessingModelOutput("mangrove_mask", "Mangrove mask")
    output.setChildOutputName("OUTPUT")
    output.setChildId("mask")
    reclass.setModelOutputs({"mangrove_mask": output})
    model.addChildAlgorithm(reclass)
    return model


if __name__ == "__main__":
    app = QgsApplication([], False)
    app.initQgis()
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    ok = build().toFile(str(TARGET))
    print(("wrote " if ok else "FAILED to write ") + str(TARGET))
    sys.exit(0 if ok else 1)
