"""Processing algorithm "Assess accuracy", id ``menet:assessaccuracy``."""
from __future__ import annotations

from pathlib import Path

from qgis.core import (QgsFeature, QgsFeatureSink, QgsField, QgsFields, QgsProcessing,
                       QgsProcessingException, QgsProcessingOutputNumber, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterFile,
                       QgsProcessingParameterFileDestination, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterLayer, QgsWkbTypes)
from ..qgis_compat import field_type

from .common import MENetAlgorithm, gdal_raster_path, load_core, polygons_as_geojson, processing_errors

SCORE_FIELDS = ["overall_accuracy", "precision", "recall", "f1", "iou", "kappa",
                "predicted_mangrove_ha", "reference_mangrove_ha"]
COUNT_FIELDS = ["tp", "fp", "fn", "tn", "pixels"]


class AssessAccuracyAlgorithm(MENetAlgorithm):
    PREDICTION, REFERENCE_RASTER, REFERENCE_POLYGONS = "PREDICTION", "REFERENCE_RASTER", "REFERENCE_POLYGONS"
    AREA, THRESHOLD, IMAGE, TILE_FOLDER = "AREA", "THRESHOLD", "IMAGE", "TILE_FOLDER"
    OUTPUT_TABLE, OUTPUT_HTML = "OUTPUT_TABLE", "OUTPUT_HTML"

    def name(self):
        return "assessaccuracy"

    def displayName(self):  # noqa: N802
        return "Assess accuracy"

    def shortHelpString(self):  # noqa: N802
        return ("<p>Scores a mangrove probability or mask raster against a reference (mask raster with mangrove = "
                "value ≥ 0.5, or mangrove polygons), optionally only inside an area: overall accuracy, precision, "
                "recall, F1, IoU, Cohen's kappa, the confusion matrix and mangrove area (ha) in prediction and "
                "reference, as a table layer and an HTML report.</p>"
                "<p>Give the <b>Sentinel-2 raster</b> the map was made from to score the MVI index "
                "(Baloloy et al. 2020, mangrove if 4.5 ≤ MVI ≤ 16.5) on the same pixels; add a <b>tile folder</b> to "
                "also train and score a per-pixel random forest (100 trees; 6 bands, NDVI, MNDWI, MVI).</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.PREDICTION, "Mangrove probability or mask"))
        self.addParameter(QgsProcessingParameterRasterLayer(self.REFERENCE_RASTER, "Reference mask raster",
                                                            optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(self.REFERENCE_POLYGONS, "Or: reference mangrove polygons",
                                                              [QgsProcessing.SourceType.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(self.AREA, "Assess only inside (polygons)",
                                                              [QgsProcessing.SourceType.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.THRESHOLD, "Mangrove threshold",
                                                       QgsProcessingParameterNumber.Type.Double, 0.5, minValue=0.0,
                                                       maxValue=1.0))
        self.addParameter(QgsProcessingParameterRasterLayer(self.IMAGE, "Sentinel-2 raster for the MVI baseline",
                                                            optional=True))
        self.addParameter(QgsProcessingParameterFile(self.TILE_FOLDER, "Tile folder for the random-forest baseline",
                                                     behavior=QgsProcessingParameterFile.Behavior.Folder, optional=True))
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT_TABLE, "Accuracy table",
                                                            QgsProcessing.SourceType.TypeVector))
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT_HTML, "Accuracy report",
                                                                "HTML files (*.html)", optional=True))
        for key in ("F1", "IOU", "KAPPA", "OVERALL_ACCURACY"):
            self.addOutput(QgsProcessingOutputNumber(key, key.replace("_", " ").title()))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        load_core()
        from ..core import assessment
        pred = self.parameterAsRasterLayer(parameters, self.PREDICTION, context)
        pred_path = gdal_raster_path(self, parameters, self.PREDICTION, context)
        has = lambda key: parameters.get(key) not in (None, "")  # noqa: E731
        ref_path = gdal_raster_path(self, parameters, self.REFERENCE_RASTER, context) if has(self.REFERENCE_RASTER) else None
        image_path = gdal_raster_path(self, parameters, self.IMAGE, context) if has(self.IMAGE) else None
        ref_polygons = self.parameterAsSource(parameters, self.REFERENCE_POLYGONS, context)
        area = self.parameterAsSource(parameters, self.AREA, context)
        folder = self.parameterAsFile(parameters, self.TILE_FOLDER, context)
        if (ref_path is None) == (ref_polygons is None):
            raise QgsProcessingException("give exactly one reference: a mask raster or polygons")
        if folder and image_path is None:
            raise QgsProcessingException("the random-forest baseline needs the Sentinel-2 raster (IMAGE) too")
        crs = pred.crs()
        with processing_errors():
            forest = None
            if folder:
                feedback.pushInfo("training the random-forest baseline on the tile folder")
                forest = assessment.forest_from_tiles(folder)
            results = assessment.assess_rasters(
                pred_path, reference=ref_path,
                reference_polygons=polygons_as_geojson(ref_polygons, crs, context) if ref_polygons else None,
                area_polygons=polygons_as_geojson(area, crs, context) if area else None,
                threshold=self.parameterAsDouble(parameters, self.THRESHOLD, context), name=pred.name(),
                image=image_path, forest=forest)
        fields = QgsFields()
        fields.append(QgsField("method", field_type("String")))
        for name in SCORE_FIELDS:
            fields.append(QgsField(name, field_type("Double")))
        for name in COUNT_FIELDS:
            fields.append(QgsField(name, field_type("LongLong")))
        sink, table_id = self.parameterAsSink(parameters, self.OUTPUT_TABLE, context, fields, QgsWkbTypes.Type.NoGeometry)
        for result in results:
            row = result.to_dict()
            feature = QgsFeature(fields)
            feature.setAttributes([row["name"]] + [row[k] for k in SCORE_FIELDS] + [row[k] for k in COUNT_FIELDS])
            sink.addFeature(feature, QgsFeatureSink.Flag.FastInsert)
            feedback.pushInfo(f"{row['name']}: F1 {row['f1']:.4f}, IoU {row['iou']:.4f}, kappa {row['kappa']:.4f}, "
                              f"OA {row['overall_accuracy']:.4f}")
        outputs = {self.OUTPUT_TABLE: table_id}
        report = self.parameterAsFileOutput(parameters, self.OUTPUT_HTML, context)
        if report:
            Path(report).write_text(assessment.html_report(results), encoding="utf-8")
            outputs[self.OUTPUT_HTML] = report
        main = results[0].scores
        outputs.update(F1=main["f1"], IOU=main["iou"], KAPPA=main["kappa"], OVERALL_ACCURACY=main["overall_accuracy"])
        return outputs
