"""A Sentinel-2 L2A product as a user downloads it, opened in a real QGIS desktop window (under Xvfb), its
10 m subdataset the active layer, "Extract mangroves" run from its dialog: the map leaves the clouds the
product's scene classification (SCL) marks as no-data, and the layers are in the project (issue 27).

The product (tests/helpers.py ``write_l2a_product``: ESA's SAFE layout, JP2 bands at 10 and 20 m, SCL at
20 m, DN offset of baseline 05.09) holds real pixels: three neighbouring Jambelí training tiles (a 1.28 x
3.84 km strip of mangrove, shrimp ponds and a channel on the real UTM 17S grid) under real cumulus.  Its SCL
is made here the way Sen2Cor makes one, by spectral thresholds (``scene_classification``: high-probability
cloud where the opaque-cloud test holds, medium probability over the bright, white haze around it), and was
checked by eye against the true-colour image.  The driver (tests/gui/drive_product.py) runs inside QGIS;
what any QGIS session needs (Xvfb, the plugin ZIP, a clean profile, no leftover processes) is
tests/test_desktop_gui.py's.  Screenshots go to build/gui-product (``MENET_GUI_PRODUCT_OUT``); the one in
docs/screenshots/product_clouds_map.png is from this test.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from helpers import ROOT, TRAIN, UTM17S, write_l2a_product
from menet_qgis.core.io import clouds
from test_desktop_gui import (EXIT_GRACE, MODEL, PROFILE, QGIS, SESSION_TIMEOUT, XVFB, DISPLAY, build_plugin_zip,
                              descendants, describe, gui_environment, outliving, profile_settings, wait_for_qgis,
                              x_display)

DRIVER = Path(__file__).resolve().parent / "gui" / "drive_product.py"
OUT = Path(os.environ.get("MENET_GUI_PRODUCT_OUT") or ROOT / "build" / "gui-product")
#: Jambelí training tiles of one acquisition, north to south, at x 610560 (UTM 17S): real cumulus over
#: mangrove and shrimp ponds.
STRIP = ("tile_0171.tif", "tile_0304.tif", "tile_0219.tif")
STRIP_ORIGIN = (610560.0, 9635840.0)

pytestmark = [
    pytest.mark.skipif(not QGIS, reason="no `qgis` executable (Debian package qgis) for the desktop GUI test"),
    pytest.mark.skipif(not (DISPLAY or XVFB), reason="no X display: install Debian's `xvfb` or set MENET_GUI_DISPLAY"),
    pytest.mark.skipif(not all((TRAIN / name).is_file() for name in STRIP),
                       reason=f"the Jambelí training tiles are not available at {TRAIN}"),
    pytest.mark.data,
]


def strip_reflectance() -> np.ndarray:
    """(6, 384, 128) reflectance B2, B3, B4, B8, B11, B12 of the three tiles, checked to lie one under the other."""
    parts = []
    for k, name in enumerate(STRIP):
        with rasterio.open(TRAIN / name) as ds:
            assert (ds.bounds.left, ds.bounds.top) == (STRIP_ORIGIN[0], STRIP_ORIGIN[1] - 1280 * k), name
            parts.append(ds.read().astype(np.float32))
    return np.concatenate(parts, axis=1)


def scene_classification(reflectance: np.ndarray) -> np.ndarray:
    """A 20 m SCL for 10 m reflectance as Sen2Cor makes one, by thresholds: 9 (cloud, high probability) where
    the opaque-cloud test holds (bright and white in the visible, not red); 8 (medium probability) over bright,
    whitish haze (visible mean > 0.07, whiteness < 0.45, blue >= 0.85 red, NDVI < 0.6, in patches of 3 px or
    more); elsewhere 4 vegetation (NDVI > 0.4), 6 water (NDWI > 0) or 5 not vegetated.  A 20 m pixel takes the
    cloudiest class of its four 10 m pixels (Sen2Cor dilates its cloud mask as well)."""
    from scipy import ndimage
    b2, b3, b4, b8 = reflectance[:4]
    with np.errstate(invalid="ignore", divide="ignore"):
        visible = (b2 + b3 + b4) / 3
        whiteness = (np.abs(b2 - visible) + np.abs(b3 - visible) + np.abs(b4 - visible)) / visible
        ndvi, ndwi = (b8 - b4) / (b8 + b4), (b3 - b8) / (b3 + b8)
    high = (visible > 0.15) & (whiteness < 0.35) & (b2 >= 0.9 * b4)
    medium = ndimage.binary_opening((visible > 0.07) & (whiteness < 0.45) & (b2 >= 0.85 * b4) & (ndvi < 0.6))
    level = np.where(high, 2, np.where(medium, 1, 0))
    level20 = level.reshape(level.shape[0] // 2, 2, level.shape[1] // 2, 2).max(axis=(1, 3))
    ground = np.where(ndvi > 0.4, 4, np.where(ndwi > 0, 6, 5))[::2, ::2]
    return np.where(level20 == 2, 9, np.where(level20 == 1, 8, ground)).astype(np.uint8)


@pytest.fixture(scope="module")
def product_run():
    """The product written, one QGIS desktop session driven by drive_product.py; what it recorded."""
    work = OUT / "session"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for old in OUT.glob("*.png"):
        old.unlink()
    reflectance = strip_reflectance()
    scl20 = scene_classification(reflectance)
    product = write_l2a_product(work / "product", reflectance, scl20, transform=from_origin(*STRIP_ORIGIN, 10, 10),
                                crs=UTM17S, date="2020-08-21T15:36:21")
    subdataset = f"SENTINEL2_L2A:{product / 'MTD_MSIL2A.xml'}:10m:EPSG_32717"
    plugin_zip = build_plugin_zip()
    profiles = work / "profiles"
    profile_settings(profiles)
    result_path, config = work / "result.json", work / "config.json"
    output = work / "out" / "jambeli_l2a_probability.tif"
    (work / "out").mkdir()
    config.write_text(json.dumps({
        "harness_folder": str(DRIVER.parent), "zip": str(plugin_zip), "subdataset": subdataset,
        "layer_name": "S2B L2A 2020-08-21, 10 m", "output": str(output), "model": str(MODEL),
        "result": str(result_path), "shots": str(OUT), "window": (1100, 900),
        "timeout_s": max(30.0, SESSION_TIMEOUT - 120), "session_s": SESSION_TIMEOUT - 30}))
    command = [QGIS, "--profiles-path", str(profiles), "--profile", PROFILE, "--nologo", "--noversioncheck",
               "--code", str(DRIVER)]
    started = time.monotonic()
    with x_display(work / "xvfb.log") as display, open(work / "qgis.log", "wb") as log:
        qgis = subprocess.Popen(command, env=gui_environment(display, work, config), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        returncode, left_behind = None, {}
        marker = f"MENET_GUI_CONFIG={config}".encode()
        try:
            returncode = wait_for_qgis(qgis, started, result_path)
        finally:
            if returncode is not None:
                left_behind = outliving(qgis.pid, marker, grace_s=EXIT_GRACE)
            try:
                os.killpg(qgis.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            qgis.wait()
            for pid in descendants(qgis.pid, marker):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    fault = work / "faulthandler.txt"
    return {"returncode": returncode, "seconds": time.monotonic() - started,
            "recorded": json.loads(result_path.read_text()) if result_path.is_file() else {},
            "left_behind": left_behind, "work": work, "product": product, "subdataset": subdataset,
            "scl20": scl20, "output": output, "fault": fault.read_text(errors="replace") if fault.is_file() else "",
            "qgis_log": (work / "qgis.log").read_text(errors="replace")}


def test_the_scene_classification_marks_the_real_clouds_and_not_the_ponds():
    """The SCL the product carries: clouds over a fair part of the strip, the dark forest and the ponds'
    water clear (a Sen2Cor-like rule, not the detector the engine falls back on)."""
    reflectance = strip_reflectance()
    scl20 = scene_classification(reflectance)
    cloudy = np.isin(scl20, (8, 9))
    assert 0.1 < cloudy.mean() < 0.6 and (scl20 == 9).mean() > 0.03
    visible = reflectance[:3].mean(axis=0)[::2, ::2]
    assert not cloudy[visible < 0.04].any()          # dark forest and water are never cloud here


def test_extract_on_the_products_10m_subdataset_leaves_its_clouds_as_no_data(product_run):
    recorded = product_run["recorded"]
    assert product_run["returncode"] == 0 and recorded.get("done"), describe(product_run, full=True)
    layer = recorded["product_layer"]
    assert layer["valid"] and layer["bands"] in (4, 6) and layer["source"] == product_run["subdataset"], layer  # GDAL >= 3.7 lists AOT, WVP too
    assert recorded["input_default"] == layer["id"], "Extract's INPUT does not start on the active layer"
    assert recorded.get("successful"), f"{describe(product_run)}\ndialog log:\n{recorded.get('dialog_log')}"
    with rasterio.open(product_run["output"]) as prob:
        values = prob.read(1)
        assert (prob.width, prob.height, prob.crs.to_string()) == (128, 384, UTM17S)
        assert prob.transform == from_origin(*STRIP_ORIGIN, 10, 10)
    scl10 = np.kron(product_run["scl20"], np.ones((2, 2), np.uint8))
    masked = clouds.scl_quality(scl10) != clouds.CLEAR
    assert masked.mean() > 0.1
    np.testing.assert_array_equal(np.isnan(values), masked)       # NaN exactly where the SCL says cloud
    assert 0.0 <= values[~masked].min() and values[~masked].max() <= 1.0
    assert values[~masked].std() > 0.05                           # mangrove and ponds: a varied map
    quality_path = Path(recorded["results"]["QUALITY"])
    with rasterio.open(quality_path) as ds:
        np.testing.assert_array_equal(ds.read(1), clouds.scl_quality(scl10))
    assert "cloud" in recorded["results"]["MASKED"] and "no-data" in recorded["results"]["MASKED"]


def test_the_map_and_its_quality_layer_are_in_the_project(product_run):
    recorded = product_run["recorded"]
    tree = recorded.get("layer_tree")
    assert tree, describe(product_run)
    sources = [Path(row["source"]).name if row["source"] and "SENTINEL2" not in row["source"] else row["source"]
               for row in tree if row["kind"] == "layer"]
    assert sources[0] == "jambeli_l2a_probability.tif" and tree[0]["visible"], sources  # the map on top
    assert "jambeli_l2a_probability_quality.tif" in sources, sources
    assert product_run["subdataset"] in sources, sources
    assert recorded.get("heavy_modules") == [], recorded.get("heavy_modules")
    assert not recorded.get("exceptions"), "\n".join(e["text"] for e in recorded["exceptions"])
    assert not recorded.get("exit_questions"), recorded.get("exit_questions")
    assert product_run["left_behind"] == {}, product_run["left_behind"]


def test_screenshots_of_the_map_written(product_run):
    shots = product_run["recorded"].get("screenshots", {})
    for name in ("product_dialog_parameters.png", "product_dialog_log.png", "product_map.png",
                 "product_map_clouds_through.png"):
        assert shots.get(name) and Path(shots[name]).stat().st_size > 10_000, (name, describe(product_run))
