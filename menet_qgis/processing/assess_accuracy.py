"""Processing algorithm "Assess accuracy", id ``menet:assessaccuracy``."""
from __future__ import annotations

from qgis.core import (QgsFeature, QgsFeatureSink, QgsField, QgsFields, QgsProcessing, QgsProcessingException,
                       QgsProcessingOutputNumber, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterFileDestination,
                       QgsProcessingParameterRasterLayer, QgsWkbTypes)

from .. import options
from .base import MENetAlgorithm
from .parameters import gdal_raster_path, optional_raster_path, polygons_as_geojson
from .qgis_compat import field_type

SCORE_FIELDS = ["overall_accuracy", "precision", "recall", "f1", "iou", "kappa",
                "predicted_mangrove_ha", "reference_mangrove_ha"]
COUNT_FIELDS = ["tp", "fp", "fn", "tn", "pixels"]


class AssessAccuracyAlgorithm(MENetAlgorithm):
    PREDICTION, REFERENCE_RASTER, REFERENCE_POLYGONS = "PREDICTION", "REFERENCE_RASTER", "REFERENCE_POLYGONS"
    AREA, IMAGE = "AREA", "IMAGE"
    OUTPUT_TABLE, OUTPUT_HTML, BEST_THRESHOLD = "OUTPUT_TABLE", "OUTPUT_HTML", "BEST_THRESHOLD"
    job, guide = "assess", "assess-accuracy"

    def name(self):
        return "assessaccuracy"

    def displayName(self):  # noqa: N802
        return "Assess accuracy"

    def shortDescription(self):  # noqa: N802
        return "Scores a mangrove map against reference data (F1, IoU, kappa, areas), next to MVI and a random forest"

    def shortHelpString(self):  # noqa: N802
        return ("<p>Scores a mangrove probability or mask raster against a reference (mask raster with mangrove = "
                "value ≥ 0.5, or mangrove polygons), optionally only inside an area: overall accuracy, precision, "
                "recall, F1, IoU, Cohen's kappa, the confusion matrix and mangrove area (ha) in prediction and "
                "reference, as a table layer and an HTML report.</p>"
                "<p>Give the <b>Sentinel-2 raster</b> the map was made from to score the MVI index "
                "(Baloloy et al. 2020, mangrove if 4.5 ≤ MVI ≤ 16.5) on the same pixels; add a <b>tile folder</b> to "
                "also train and score a per-pixel random forest (100 trees; 6 bands, NDVI, MNDWI, MVI).</p>"
                "<p>For a probability map it also reports the <b>best threshold on this reference</b> (the one with "
                "the highest F1, searched over 0.05–0.95): the best threshold differs from coast to coast, so labels of "
                "your own coast are the way to find yours. Chosen on these same pixels, its F1 is optimistic: choose it "
                "on part of your reference and assess the rest with it (<b>Mangrove threshold</b>).</p>"
                "<p>The map must be one band (a probability or a 0/1 mask): a multi-band raster such as the "
                "Sentinel-2 image is refused.</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        prediction = QgsProcessingParameterRasterLayer(self.PREDICTION, "Mangrove map to assess")
        prediction.setHelp("One band: the probability from 'Extract mangroves' or a 0/1 mask")
        self.addParameter(prediction)
        self.addParameter(QgsProcessingParameterRasterLayer(self.REFERENCE_RASTER, "Reference mask raster",
                                                            optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(self.REFERENCE_POLYGONS, "Or: reference mangrove polygons",
                                                              [QgsProcessing.SourceType.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(self.AREA, "Assess only inside (polygons)",
                                                              [QgsProcessing.SourceType.TypeVectorPolygon], optional=True))
        self.add_options([options.by_name(options.ASSESS, "threshold")])
        self.addParameter(QgsProcessingParameterRasterLayer(self.IMAGE, "Sentinel-2 image (MVI baseline)",
                                                            optional=True))
        self.add_options([options.by_name(options.ASSESS, "tiles")])
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT_TABLE, "Accuracy table",
                                                            QgsProcessing.SourceType.TypeVector))
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT_HTML, "Accuracy report",
                                                                "HTML files (*.html)", optional=True))
        for key in ("F1", "IOU", "KAPPA", "OVERALL_ACCURACY"):
            self.addOutput(QgsProcessingOutputNumber(key, key.replace("_", " ").title()))
        self.addOutput(QgsProcessingOutputNumber(self.BEST_THRESHOLD, "Best threshold on this reference"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        # A non-optional layer parameter starts on the active layer, typically the Sentinel-2 image:
        # refuse it here, before anything runs, with a message saying what to pick.
        prediction = self.parameterAsRasterLayer(parameters, self.PREDICTION, context)
        if prediction is not None and prediction.bandCount() != 1:
            return False, (f"'{prediction.name()}' has {prediction.bandCount()} bands: choose the mangrove map to "
                           "assess (the 1-band probability or mask), not the Sentinel-2 image")
        return super().checkParameterValues(parameters, context)

    def job_parameters(self, parameters, context, values):
        pred = self.parameterAsRasterLayer(parameters, self.PREDICTION, context)
        pred_path = gdal_raster_path(self, parameters, self.PREDICTION, context)
        reference = optional_raster_path(self, parameters, self.REFERENCE_RASTER, context)
        image = optional_raster_path(self, parameters, self.IMAGE, context)
        ref_polygons = self.parameterAsSource(parameters, self.REFERENCE_POLYGONS, context)
        area = self.parameterAsSource(parameters, self.AREA, context)
        if (reference is None) == (ref_polygons is None):
            raise QgsProcessingException("give exactly one reference: a mask raster or polygons")
        if values["tiles"] and image is None:
            raise QgsProcessingException("the random-forest baseline needs the Sentinel-2 raster (IMAGE) too")
        return {"prediction": pred_path, "reference": reference, "image": image, "name": pred.name(),
                "reference_polygons": polygons_as_geojson(ref_polygons, pred.crs(), context) if ref_polygons else None,
                "area_polygons": polygons_as_geojson(area, pred.crs(), context) if area else None,
                "report": self.parameterAsFileOutput(parameters, self.OUTPUT_HTML, context) or None, **values}

    def files_written(self, job):
        return [job["report"]] if job["report"] else []

    def load_outputs(self, parameters, context, feedback, job, result):
        rows = result["results"]
        fields = QgsFields()
        fields.append(QgsField("method", field_type("String")))
        for name in SCORE_FIELDS:
            fields.append(QgsField(name, field_type("Double")))
        for name in COUNT_FIELDS:
            fields.append(QgsField(name, field_type("LongLong")))
        sink, table_id = self.parameterAsSink(parameters, self.OUTPUT_TABLE, context, fields, QgsWkbTypes.Type.NoGeometry)
        for row in rows:
            feature = QgsFeature(fields)
            feature.setAttributes([row["name"]] + [row[k] for k in SCORE_FIELDS] + [row[k] for k in COUNT_FIELDS])
            sink.addFeature(feature, QgsFeatureSink.Flag.FastInsert)
        outputs = {self.OUTPUT_TABLE: table_id}
        if job["report"]:
            outputs[self.OUTPUT_HTML] = job["report"]
        main = rows[0]
        outputs.update(F1=main["f1"], IOU=main["iou"], KAPPA=main["kappa"], OVERALL_ACCURACY=main["overall_accuracy"])
        outputs[self.BEST_THRESHOLD] = main.get("best_threshold")  # None for a 0/1 mask
        return outputs
