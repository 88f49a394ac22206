"""Fault cases, round two (issue 26): side outputs over other files (item 2) and inputs assess must not trust
(item 12).

A report, table or training history replaces only a previous output of its own kind: a mistyped path that
names a raster or a checkpoint is refused before any work, naming what is there.  Assess refuses a prediction
that is not one band of 0-1, a reference not coded 1/0, a threshold outside 0-1, and reads areas in the CRS's
own linear unit.  Every case checks the one error line, the exit status, the user's files byte-identical and
no partial file left behind.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from helpers import S2_NAMES, s2_reflectance, write_raster, write_s2
from menet_qgis.core import files
from menet_qgis.core.evaluation import assessment
from menet_qgis.core.evaluation.metrics import Confusion
from menet_qgis.core.training import train as training

US_FEET = "EPSG:2227"          # NAD83 / California zone 3 (ftUS)
FOOT = 1200 / 3937             # one US survey foot in metres


def error_line(proc) -> str:
    """The one error line; fails when the CLI printed a traceback or GDAL noise instead."""
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith("menet_qgis: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ERROR 1" not in proc.stderr
    return errors[0]


def partials(folder) -> list:
    return sorted(p.name for p in Path(folder).glob(".*.partial*"))


def half_mask(size=64, dtype=np.float32, mangrove=1, other=0):
    mask = np.full((size, size), other, dtype)
    mask[:, : size // 2] = mangrove
    return mask


def probability(size=64) -> np.ndarray:
    """A plausible probability map: high on the left half (the reference's mangrove), low on the right."""
    noise = np.random.default_rng(0).normal(0, 0.05, (size, size))
    return np.clip(half_mask(size) * 0.8 + 0.1 + noise, 0, 1).astype(np.float32)


@pytest.fixture
def pair(tmp_path):
    """A probability map and its 0/1 reference on the same 10 m UTM grid."""
    return (write_raster(tmp_path / "pred.tif", probability()[None]),
            write_raster(tmp_path / "ref.tif", half_mask()[None]))


def small_checkpoint(path) -> Path:
    """A real (small) PyTorch checkpoint file: a zip archive, as every .pt is."""
    torch.save({"weight": torch.zeros(4)}, path)
    return Path(path)


# --- item 2: side outputs over other files ------------------------------------------------------------------
@pytest.mark.parametrize("option, name, kind", [("--table", "scene.tif", "CSV table"),
                                                ("--report", "scene.tif", "HTML report")])
def test_assess_side_output_over_a_raster_is_refused_by_its_name(cli, pair, tmp_path, option, name, kind):
    scene = write_s2(tmp_path / name, 64, 64)
    before = scene.read_bytes()
    proc = cli("assess", pair[0], "--reference", pair[1], option, scene)
    assert proc.returncode == 2
    ending = ".csv" if kind == "CSV table" else ".html or .htm"
    assert error_line(proc) == (f"menet_qgis: error: the {kind} must go to a file ending in {ending}, not {scene} "
                                "(nothing was written)")
    assert scene.read_bytes() == before and partials(tmp_path) == []


def test_assess_report_over_a_checkpoint_is_refused(cli, pair, tmp_path):
    model = small_checkpoint(tmp_path / "model.pt")
    disguised = small_checkpoint(tmp_path / "model.html")
    before = model.read_bytes()
    proc = cli("assess", pair[0], "--reference", pair[1], "--report", model)
    assert proc.returncode == 2 and "must go to a file ending in .html or .htm" in error_line(proc)
    proc = cli("assess", pair[0], "--reference", pair[1], "--report", disguised, "--table", tmp_path / "t.csv")
    assert proc.returncode == 2
    assert error_line(proc) == (f"menet_qgis: error: {disguised} exists and holds a zip archive (a PyTorch checkpoint "
                                "is one), not a previous HTML report: writing would destroy it; choose another path "
                                "(or move that file away)")
    assert model.read_bytes() == before and disguised.read_bytes() == before
    assert not (tmp_path / "t.csv").exists() and partials(tmp_path) == []


@pytest.mark.parametrize("content, said", [
    (None, "a TIFF raster"),                                    # a GeoTIFF renamed .csv
    (b"id,species\n1,Rhizophora\n", "text that this program did not write"),
    (bytes(range(256)), "binary data"),
])
def test_assess_table_over_a_foreign_csv_is_refused_naming_what_is_there(cli, pair, tmp_path, content, said):
    table = tmp_path / "results.csv"
    if content is None:
        write_s2(table, 16, 16)
    else:
        table.write_bytes(content)
    before = table.read_bytes()
    proc = cli("assess", pair[0], "--reference", pair[1], "--table", table)
    assert proc.returncode == 2
    assert error_line(proc) == (f"menet_qgis: error: {table} exists and holds {said}, not a previous CSV table: "
                                "writing would destroy it; choose another path (or move that file away)")
    assert table.read_bytes() == before and partials(tmp_path) == []


def test_a_folder_at_the_report_path_is_refused(cli, pair, tmp_path):
    (tmp_path / "r.html").mkdir()
    proc = cli("assess", pair[0], "--reference", pair[1], "--report", tmp_path / "r.html")
    assert proc.returncode == 2
    assert error_line(proc) == (f"menet_qgis: error: {tmp_path / 'r.html'} exists and is not a file: choose another "
                                "path for the HTML report")


def test_a_rerun_replaces_its_own_report_and_table(cli, pair, tmp_path):
    """A previous output of the same kind, or an empty file, is replaced as before (upper-case endings too)."""
    report, table = tmp_path / "r.HTML", tmp_path / "r.csv"
    table.touch()
    assert cli("assess", pair[0], "--reference", pair[1], "--report", report, "--table", table).returncode == 0
    first = report.read_bytes(), table.read_bytes()
    assert first[0].startswith(b"<!DOCTYPE html>") and first[1].startswith(b"name,threshold,")
    other = write_raster(tmp_path / "pred2.tif", (1 - probability())[None])
    proc = cli("assess", other, "--reference", pair[1], "--report", report, "--table", table)
    assert proc.returncode == 0, proc.stderr
    assert report.read_bytes() != first[0] and table.read_bytes() != first[1] and partials(tmp_path) == []


def test_train_history_over_a_raster_is_refused_before_training(cli, tmp_path):
    scene = write_s2(tmp_path / "scene.tif", 64, 64)
    disguised = tmp_path / "scene.json"
    disguised.write_bytes(scene.read_bytes())
    tiles = tmp_path / "tiles"
    for i in range(4):
        t = from_origin(600000 + 4000 * i, 9700000, 10, 10)
        write_raster(tiles / f"tile_{i}.tif", s2_reflectance(32, 32, seed=i), S2_NAMES, transform=t)
        write_raster(tiles / f"mask_{i}.tif", half_mask(32)[None], transform=t)
    before = scene.read_bytes()
    for history, expected in ((scene, f"the training history must go to a file ending in .json, not {scene} "
                                      "(nothing was written)"),
                              (disguised, f"{disguised} exists and holds a TIFF raster, not a previous training "
                                          "history: writing would destroy it; choose another path (or move that "
                                          "file away)")):
        proc = cli("train", "--tiles", tiles, "--out", tmp_path / "m.pt", "--epochs", 1, "--batch-size", 2,
                   "--device", "cpu", "--history", history)
        assert proc.returncode == 2
        assert error_line(proc) == f"menet_qgis: error: {expected}"
        assert "epoch" not in proc.stderr                      # refused before training, not after it
    assert scene.read_bytes() == before and disguised.read_bytes() == before
    assert not (tmp_path / "m.pt").exists() and partials(tmp_path) == []


def test_history_is_strict_json_and_replaces_only_an_earlier_history(tmp_path):
    path = tmp_path / "h.json"
    training.write_history([{"epoch": 1, "loss": math.nan, "val_f1": 0.5}], path)
    text = path.read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) == \
        [{"epoch": 1, "loss": None, "val_f1": 0.5}]
    training.write_history([{"epoch": 1, "loss": 0.3}, {"epoch": 2, "loss": 0.2}], path)   # a rerun
    assert [row["epoch"] for row in json.loads(path.read_text())] == [1, 2]
    other = tmp_path / "config.json"
    other.write_text('{"epochs": 30}')
    with pytest.raises(files.InputError, match=r"holds text that this program did not write, not a previous training"):
        training.write_history([], other)
    assert other.read_text() == '{"epochs": 30}' and partials(tmp_path) == []


# --- item 12: assess trusts its inputs ----------------------------------------------------------------------
def test_areas_follow_the_crs_linear_unit(cli, tmp_path):
    """The same 64 x 64 px map on a 10 m grid in metres and in US survey feet: the same hectares."""
    ft = from_origin(6000000, 2000000, 10 / FOOT, 10 / FOOT)
    pred = write_raster(tmp_path / "pred_ft.tif", probability()[None], crs=US_FEET, transform=ft)
    ref = write_raster(tmp_path / "ref_ft.tif", half_mask()[None], crs=US_FEET, transform=ft)
    proc = cli("assess", pred, "--reference", ref)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)[0]
    assert row["reference_mangrove_ha"] == pytest.approx(2048 * 100 / 10000, rel=1e-6)   # 20.48 ha, not 220
    result = assessment.assess_rasters(pred, reference=ref)[0]
    assert "pred_ft.tif's CRS is in US survey foot (0.304801 m): areas converted to hectares" in result.notes[0]


def test_a_crs_without_linear_unit_is_refused(tmp_path):
    pred = write_raster(tmp_path / "p.tif", probability()[None], crs="EPSG:4326",
                        transform=from_origin(-80, -3, 0.0001, 0.0001))
    ref = write_raster(tmp_path / "r.tif", half_mask()[None], crs="EPSG:4326",
                       transform=from_origin(-80, -3, 0.0001, 0.0001))
    with pytest.raises(ValueError, match=r"^p.tif is in geographic coordinates \(EPSG:4326\); areas need metres"):
        assessment.assess_rasters(pred, reference=ref)


@pytest.mark.parametrize("coding, expected", [
    ((2, 1), "reference ref.tif holds values 1, 2; masks must be 1 = mangrove, 0 = other (soft values 0-1 allowed, "
             "mangrove >= 0.5), no-data as NaN or the declared no-data value: no 0 in it: which of 1 and 2 is "
             "mangrove?"),
    ((255, 0), "reference ref.tif holds values 0, 255; masks must be 1 = mangrove, 0 = other (soft values 0-1 "
               "allowed, mangrove >= 0.5), no-data as NaN or the declared no-data value: if 255 is mangrove recode "
               "it to 1; if 255 is no data, set it as the mask's no-data value"),
])
def test_reference_not_coded_one_zero_is_refused(cli, tmp_path, coding, expected):
    pred = write_raster(tmp_path / "pred.tif", probability()[None])
    ref = write_raster(tmp_path / "ref.tif", half_mask(dtype=np.uint8, mangrove=coding[0], other=coding[1])[None])
    report = tmp_path / "r.html"
    proc = cli("assess", pred, "--reference", ref, "--report", report)
    assert proc.returncode == 2
    assert error_line(proc) == f"menet_qgis: error: {expected}"
    assert not report.exists() and partials(tmp_path) == []


def test_declared_reference_nodata_is_not_a_coding_error(tmp_path):
    ref = half_mask(dtype=np.uint8)
    ref[:8] = 255
    pred = write_raster(tmp_path / "pred.tif", probability()[None])
    ref_path = write_raster(tmp_path / "ref.tif", ref[None], nodata=255)
    result = assessment.assess_rasters(pred, reference=ref_path)[0]
    assert result.confusion.total == 56 * 64


def test_the_sentinel2_image_as_prediction_is_refused(cli, pair, tmp_path):
    scene = write_s2(tmp_path / "scene.tif", 64, 64)
    before = scene.read_bytes()
    proc = cli("assess", scene, "--reference", pair[1], "--table", tmp_path / "t.csv")
    assert proc.returncode == 2
    assert error_line(proc) == ("menet_qgis: error: scene.tif has 6 bands (Blue, Green, Red, NIR, SWIR1, SWIR2): the "
                                "prediction must be one band, a mangrove probability 0-1 or a 0/1 mask such as predict "
                                "writes; the Sentinel-2 image goes in as the image (for the MVI baseline), not as the "
                                "prediction")
    assert scene.read_bytes() == before and not (tmp_path / "t.csv").exists() and partials(tmp_path) == []


def test_a_single_band_prediction_outside_zero_one_is_refused(cli, pair, tmp_path):
    pred = write_raster(tmp_path / "mask255.tif", half_mask(dtype=np.uint8, mangrove=255)[None])
    proc = cli("assess", pred, "--reference", pair[1])
    assert proc.returncode == 2
    assert error_line(proc) == ("menet_qgis: error: mask255.tif holds values from 0 to 255: the prediction must be a "
                                "mangrove probability 0-1 or a 0/1 mask; recode a mask to 1 = mangrove, 0 = other and "
                                "declare its no-data value if it has one")


def test_a_nan_threshold_stored_in_the_prediction_is_refused(cli, pair, tmp_path):
    with rasterio.open(pair[0], "r+") as ds:
        ds.update_tags(MENET_THRESHOLD="nan")
    proc = cli("assess", pair[0], "--reference", pair[1], "--report", tmp_path / "r.html")
    assert proc.returncode == 2
    assert error_line(proc) == ("menet_qgis: error: pred.tif carries the model threshold nan (MENET_THRESHOLD), not a "
                                "number from 0 to 1: give the mangrove threshold explicitly")
    assert not (tmp_path / "r.html").exists() and partials(tmp_path) == []
    proc = cli("assess", pair[0], "--reference", pair[1], "--threshold", 0.5)      # the way out it names
    assert proc.returncode == 0 and json.loads(proc.stdout)[0]["f1"] > 0.9


@pytest.mark.parametrize("threshold", [math.nan, math.inf, -0.1, 1.5, "half"])
def test_assessment_refuses_a_threshold_outside_zero_one_in_its_own_api(pair, threshold):
    with pytest.raises(ValueError, match=r"^the mangrove threshold must be a number from 0 to 1, got "):
        assessment.assess_rasters(pair[0], reference=pair[1], threshold=threshold)


def test_reports_hold_strict_json(pair, tmp_path):
    """The report's embedded results parse as standard JSON; a NaN reaching it is an error, not 'NaN'."""
    results = assessment.assess_rasters(pair[0], reference=pair[1])
    assessment.write_html(results, tmp_path / "r.html")
    embedded = (tmp_path / "r.html").read_text().split("<pre>")[1].split("</pre>")[0]
    json.loads(html.unescape(embedded), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    broken = assessment.Assessment("broken", Confusion(1, 0, 0, 1), math.nan)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        assessment.html_report([broken])
