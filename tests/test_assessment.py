"""Accuracy figures, the MVI and random-forest baselines, and the Assess accuracy algorithm."""
import numpy as np
import pytest
from osgeo import ogr, osr

from helpers import S2_NAMES, s2_reflectance, write_raster
from menet_qgis.core.evaluation import assessment
from menet_qgis.core.io import polygons
from menet_qgis.core.compat import osgeo_exceptions
from menet_qgis.core.evaluation.metrics import Confusion


def test_scores_match_hand_computed_values():
    c = Confusion(tp=40, fp=10, fn=20, tn=130)
    s = c.scores()
    assert s["overall_accuracy"] == pytest.approx(170 / 200)
    assert s["precision"] == pytest.approx(0.8) and s["recall"] == pytest.approx(40 / 60)
    assert s["f1"] == pytest.approx(80 / 110) and s["iou"] == pytest.approx(40 / 70)
    pe = (50 * 60 + 150 * 140) / 200 ** 2
    assert s["kappa"] == pytest.approx((0.85 - pe) / (1 - pe))


def test_pooled_counts_score_like_one_map_of_all_pixels():
    from menet_qgis.core.evaluation.metrics import ProbabilityCounts
    rng = np.random.default_rng(1)
    prob, truth = rng.random(5000).astype(np.float32), rng.random(5000) < 0.3
    halves = [(prob[:2000], truth[:2000]), (prob[2000:], truth[2000:])]
    whole = Confusion().add(prob >= 0.4, truth)
    assert sum((Confusion().add(p >= 0.4, t) for p, t in halves), Confusion()) == whole
    counts = []
    for p, t in halves:
        counts.append(ProbabilityCounts())
        counts[-1].add(p, t)
    assert sum(counts, ProbabilityCounts()).confusion(0.4) == whole


def test_mvi_published_thresholds():
    green = np.array([0.05, 0.05, 0.05, 0.05])
    nir = np.array([0.05 + 0.4, 0.05 + 0.1, 0.05 + 1.8, 0.3])
    swir = np.array([0.05 + 0.04, 0.05 + 0.04, 0.05 + 0.1, 0.05])   # last: zero denominator
    assert assessment.mvi(green, nir, swir) == pytest.approx([10.0, 2.5, 18.0, 0.0])
    assert list(assessment.mvi_mangrove(green, nir, swir)) == [True, False, False, False]


def polygon_file(path, wkt_polygons, epsg=32717):
    with osgeo_exceptions():
        drv = ogr.GetDriverByName("GPKG")
        ds = drv.CreateDataSource(str(path))
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(epsg)
        layer = ds.CreateLayer("labels", srs, ogr.wkbPolygon)
        for wkt in wkt_polygons:
            f = ogr.Feature(layer.GetLayerDefn())
            f.SetGeometry(ogr.CreateGeometryFromWkt(wkt))
            layer.CreateFeature(f)
        ds = None
    return path


def test_assess_raster_reference_polygons_and_area(tmp_path):
    prob = np.zeros((1, 20, 20), np.float32)
    prob[0, :, :10] = 0.9          # predicted mangrove: left half
    prob[0, 0, 0] = np.nan         # no-data pixel not counted
    pred = write_raster(tmp_path / "p.tif", prob)
    ref = np.zeros((1, 20, 20), np.float32)
    ref[0, :, :8] = 0.76           # soft label >= 0.5 counts as mangrove
    ref_path = write_raster(tmp_path / "ref.tif", ref)
    [a] = assessment.assess_rasters(pred, reference=str(ref_path))
    assert a.confusion.to_dict() == {"tp": 159, "fp": 40, "fn": 0, "tn": 200}
    assert a.area_ha()["reference_mangrove_ha"] == pytest.approx(159 * 0.01)
    # the same reference as polygons, assessed only inside the top half
    x0, y0 = 611840.0, 9623040.0
    gpkg = polygon_file(tmp_path / "ref.gpkg", [f"POLYGON(({x0} {y0},{x0+80} {y0},{x0+80} {y0-200},{x0} {y0-200},{x0} {y0}))"])
    area = polygon_file(tmp_path / "area.gpkg", [f"POLYGON(({x0} {y0},{x0+200} {y0},{x0+200} {y0-100},{x0} {y0-100},{x0} {y0}))"])
    crs = "EPSG:32717"
    [b] = assessment.assess_rasters(pred, reference_polygons=polygons.read_polygons(gpkg, crs),
                                    area_polygons=polygons.read_polygons(area, crs))
    assert b.confusion.to_dict() == {"tp": 79, "fp": 20, "fn": 0, "tn": 100}


def test_areas_refused_for_geographic_rasters(tmp_path):
    from rasterio.transform import from_origin
    prob = write_raster(tmp_path / "p.tif", np.ones((1, 5, 5), np.float32), crs="EPSG:4326",
                        transform=from_origin(-80, -3, 0.0001, 0.0001))
    with pytest.raises(ValueError, match="geographic coordinates"):
        assessment.assess_rasters(prob, reference=str(prob))


def test_baselines_scored_on_the_same_pixels(tmp_path):
    bands = s2_reflectance(40, 40)             # vegetated left half, water right half
    image = write_raster(tmp_path / "s2.tif", bands, S2_NAMES)
    ref = np.zeros((1, 40, 40), np.float32)
    ref[0, :, :20] = 1
    ref_path = write_raster(tmp_path / "ref.tif", ref)
    pred = write_raster(tmp_path / "p.tif", ref * 0.8)
    forest = assessment.train_random_forest(bands[:5].reshape(5, -1), ref.reshape(-1), trees=10)  # recipe v2's bands
    results = assessment.assess_rasters(pred, reference=str(ref_path), image=str(image), forest=forest)
    assert [r.name.split()[0] for r in results] == ["prediction", "MVI", "random"]
    assert len({r.confusion.total for r in results}) == 1
    assert results[2].scores["f1"] == pytest.approx(1.0)
    html = assessment.html_report(results)
    assert "kappa" in html and "random forest" in html


def test_assess_algorithm_writes_table_and_report(menet_provider, tmp_path):
    import processing
    prob = np.zeros((1, 20, 20), np.float32)
    prob[0, :, :10] = 0.9
    ref = np.zeros((1, 20, 20), np.float32)
    ref[0, :, :10] = 1
    ref[0, :2, :10] = 0
    result = processing.run("menet:assessaccuracy", {
        "PREDICTION": str(write_raster(tmp_path / "p.tif", prob)),
        "REFERENCE_RASTER": str(write_raster(tmp_path / "r.tif", ref)),
        "OUTPUT_TABLE": str(tmp_path / "scores.csv"), "OUTPUT_HTML": str(tmp_path / "report.html")})
    assert result["IOU"] == pytest.approx(180 / 200)
    assert "confusion" not in (tmp_path / "scores.csv").read_text().splitlines()[0]
    assert "tp" in (tmp_path / "scores.csv").read_text().splitlines()[0]
    report = (tmp_path / "report.html").read_text()
    assert "<td>180</td><td>20</td>" in report and "<td>0</td><td>200</td>" in report   # TP FP / FN TN


def test_assess_reports_the_best_threshold_on_the_users_reference(menet_provider, tmp_path):
    """The best threshold differs from coast to coast: on a reference that is mangrove exactly where
    the probability is >= 0.70, Assess accuracy scores the map at the threshold it is given (0.5) and
    reports 0.70 as the best one here, with F1 1; a 0/1 mask has no threshold to find."""
    import processing
    prob = ((np.arange(400, dtype=np.float32) + 0.5) / 400).reshape(1, 20, 20)
    pred = write_raster(tmp_path / "p.tif", prob)
    ref = write_raster(tmp_path / "r.tif", (prob >= 0.7).astype(np.float32))
    [a] = assessment.assess_rasters(pred, reference=str(ref), threshold=0.5)
    assert a.scores["f1"] < 0.85 and a.best_threshold == (pytest.approx(0.70), pytest.approx(1.0))
    assert a.to_dict()["best_threshold"] == pytest.approx(0.70) and "best threshold is 0.70" in a.notes[-1]
    [m] = assessment.assess_rasters(write_raster(tmp_path / "m.tif", (prob >= 0.6).astype(np.float32)), reference=str(ref))
    assert m.best_threshold is None and "best_threshold" not in m.to_dict()
    result = processing.run("menet:assessaccuracy", {"PREDICTION": str(pred), "REFERENCE_RASTER": str(ref),
                                                     "THRESHOLD": 0.5, "OUTPUT_TABLE": "memory:"})
    assert result["BEST_THRESHOLD"] == pytest.approx(0.70) and result["F1"] == pytest.approx(a.scores["f1"])
