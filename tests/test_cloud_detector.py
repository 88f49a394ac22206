"""The cloud detector for inputs without a scene classification (issue 27, item 2), graded against cloud
labels drawn by eye (tests/data/clouds, see its README), arid coasts' bright sand and salt ponds, and the
real cloud-free Jambelí scene."""
from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from helpers import ROOT, SCENE
from menet_qgis.core.io import cloud_detector
from menet_qgis.core.io.cloud_detector import detect
from menet_qgis.core.io.clouds import CLEAR, CLOUD

LABELS = ROOT / "tests" / "data" / "clouds"
TILES = ROOT.parent / "shared" / "data" / "magset2" / "tiles"
MAGSET2_BANDS = ("B2", "B3", "B4", "B8", "B8A", "B11")
SCENE_BANDS = ("B2", "B3", "B4", "B8", "B11", "B12")
CLOUDY = ("tile_1_41", "tile_1_48", "tile_2_01", "tile_1_45", "tile_2_39", "tile_2_47")
BRIGHT_GROUND = ("tile_0_45", "tile_0_23")
#: Bright pixels: mean of B2, B3, B4 above this reflectance (95 % of labelled opaque cloud is brighter than 0.16).
BRIGHT = 0.15
#: Median spectra (B2, B3, B4, B8, B11, B12) of real pixels: labelled opaque cloud on tile_1_48 (no B12
#: there: B11 repeated) and clear mangrove forest on the same tile.
CLOUD_SPECTRUM = (0.353, 0.341, 0.330, 0.400, 0.216, 0.216)
FOREST_SPECTRUM = (0.025, 0.045, 0.025, 0.300, 0.130, 0.060)

needs_tiles = pytest.mark.skipif(not TILES.is_dir(), reason=f"MagSet-2 tiles not available under {TILES}")
needs_scene = pytest.mark.skipif(not SCENE.exists(), reason=f"Jambelí scene not available at {SCENE}")


def read_tile(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MagSet-2 tiles are not georeferenced
        with rasterio.open(TILES / f"{name}.tif") as src:
            return src.read().astype(np.float32) / 10000.0  # uint16 DN, offset 0 (README)


def read_label(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(LABELS / f"{name}_cloud.tif") as src:
            return src.read(1)


def scene_of(spectrum, h=32, w=32):
    return np.broadcast_to(np.asarray(spectrum, np.float32)[:, None, None], (len(spectrum), h, w)).copy()


# --- graded on real pixels against labels drawn by eye -------------------------------------------------
@pytest.mark.data
@needs_tiles
@pytest.mark.parametrize("tile", CLOUDY)
def test_at_least_80_percent_of_hand_labelled_opaque_cloud_is_flagged(tile):
    label = read_label(tile)
    quality = detect(read_tile(tile), MAGSET2_BANDS)
    assert quality.dtype == np.uint8 and quality.shape == label.shape
    hits = float((quality[label == 1] == CLOUD).mean())
    assert hits >= 0.80, f"{tile}: {hits:.1%} of {int((label == 1).sum())} labelled opaque-cloud pixels flagged"


@pytest.mark.data
@needs_tiles
def test_clear_ground_labelled_beside_clouds_is_mostly_left_alone():
    """Labelled clear pixels on the cloudy tiles (forest, fields, rivers next to the clouds): few flagged,
    the 2 px buffer around clouds included."""
    flagged = total = 0
    for tile in CLOUDY:
        label = read_label(tile)
        flagged += int((detect(read_tile(tile), MAGSET2_BANDS)[label == 0] != CLEAR).sum())
        total += int((label == 0).sum())
    assert flagged / total <= 0.05, f"{flagged} of {total} labelled clear pixels flagged"


@pytest.mark.data
@needs_tiles
@pytest.mark.parametrize("tile", BRIGHT_GROUND)
def test_bright_sand_salt_flats_and_ponds_of_arid_coasts_are_not_cloud(tile):
    reflectance = read_tile(tile)
    bright = reflectance[:3].mean(0) > BRIGHT
    assert bright.sum() > 4000  # the tiles are what the test is about: thousands of bright pixels
    assert (read_label(tile) == 0).all()  # cloud free by eye
    masked = float((detect(reflectance, MAGSET2_BANDS)[bright] != CLEAR).mean())
    assert masked <= 0.05, f"{tile}: {masked:.1%} of {int(bright.sum())} bright ground pixels masked"


@pytest.mark.data
@needs_scene
def test_the_cloud_free_jambeli_scene_is_left_alone_window_by_window():
    """The real Jambelí composite (shrimp-pond dykes, beaches, a town) read in 512 px windows as the engine
    reads it: (next to) nothing is masked, so a raster without clouds maps as it did before."""
    flagged = valid = 0
    with rasterio.open(SCENE) as src:
        for row in range(0, src.height, 512):
            for col in range(0, src.width, 512):
                window = Window(col, row, min(512, src.width - col), min(512, src.height - row))
                reflectance = src.read(window=window).astype(np.float32)
                quality = detect(reflectance, SCENE_BANDS)
                ok = np.isfinite(reflectance).all(0)
                flagged += int((quality[ok] != CLEAR).sum())
                valid += int(ok.sum())
    print(f"\nJambelí scene: {flagged} of {valid} valid pixels flagged ({flagged / valid:.4%})")
    assert valid > 1_000_000
    assert flagged / valid <= 1e-4


@pytest.mark.data
@needs_tiles
def test_time_of_a_1024_by_1024_call_on_real_pixels():
    """Reported, not asserted (the detector runs on every window of a scene)."""
    tiles = [read_tile(t) for t in CLOUDY + BRIGHT_GROUND]
    big = np.concatenate([np.concatenate([tiles[(i + j) % len(tiles)] for j in range(8)], 2) for i in range(8)], 1)
    assert big.shape == (6, 1024, 1024)
    detect(big, MAGSET2_BANDS)
    start = time.perf_counter()
    quality = detect(big, MAGSET2_BANDS)
    print(f"\ndetect on 6 x 1024 x 1024 float32: {1000 * (time.perf_counter() - start):.0f} ms, "
          f"{(quality == CLOUD).mean():.1%} cloud")


# --- behaviour without the shared data -------------------------------------------------------------------
def test_a_cloud_patch_is_flagged_with_a_two_pixel_rim_and_forest_is_not():
    reflectance = scene_of(FOREST_SPECTRUM)
    reflectance[:, 10:20, 10:20] = np.asarray(CLOUD_SPECTRUM, np.float32)[:, None, None]
    quality = detect(reflectance, SCENE_BANDS)
    expected = np.zeros((32, 32), bool)
    expected[10 - cloud_detector.BUFFER:20 + cloud_detector.BUFFER, 10 - cloud_detector.BUFFER:20 + cloud_detector.BUFFER] = True
    assert set(np.unique(quality)) == {CLEAR, CLOUD}
    np.testing.assert_array_equal(quality == CLOUD, expected)
    assert (detect(reflectance, SCENE_BANDS, buffer=0) == CLOUD).sum() == 100


def test_bright_lines_one_or_two_pixels_wide_are_not_cloud():
    """Pond dykes and beach lines: mixed pixels that pass the spectral tests but are not 3 px across."""
    reflectance = scene_of(FOREST_SPECTRUM)
    reflectance[:, 5, :] = np.asarray(CLOUD_SPECTRUM, np.float32)[:, None]
    reflectance[:, 20:22, 3:30] = np.asarray(CLOUD_SPECTRUM, np.float32)[:, None, None]
    assert (detect(reflectance, SCENE_BANDS) == CLEAR).all()


def test_cloud_at_the_edge_of_a_window_is_kept():
    reflectance = scene_of(FOREST_SPECTRUM)
    reflectance[:, :4, :4] = np.asarray(CLOUD_SPECTRUM, np.float32)[:, None, None]
    assert (detect(reflectance, SCENE_BANDS, buffer=0)[:4, :4] == CLOUD).all()


def test_band_names_aliases_b8a_for_b8_and_no_b12():
    reflectance = scene_of(FOREST_SPECTRUM)
    reflectance[:, 8:16, 8:16] = np.asarray(CLOUD_SPECTRUM, np.float32)[:, None, None]
    reference = detect(reflectance, SCENE_BANDS)
    assert (reference == CLOUD).any()
    np.testing.assert_array_equal(detect(reflectance, ("Blue", "Green", "Red", "NIR", "SWIR1", "SWIR2")), reference)
    np.testing.assert_array_equal(detect(reflectance[:5], ("B2", "B3", "B4", "B8A", "B11")), reference)
    np.testing.assert_array_equal(detect(reflectance[[2, 0, 1, 4, 3]], ("B4", "B2", "B3", "B11", "B8")), reference)


def test_no_data_is_never_cloud_and_a_missing_band_is_named():
    reflectance = scene_of(CLOUD_SPECTRUM)
    reflectance[:, :, 16:] = np.nan
    quality = detect(reflectance, SCENE_BANDS, buffer=0)
    assert (quality[:, 16:] == CLEAR).all() and (quality[:, :15] == CLOUD).all()
    with pytest.raises(ValueError, match="needs band B11"):
        detect(reflectance[:4], ("B2", "B3", "B4", "B8"))
    with pytest.raises(ValueError, match="one band per name"):
        detect(reflectance, ("B2", "B3", "B4", "B8", "B11"))


@pytest.mark.integration  # a subprocess
def test_the_detector_module_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, menet_qgis.core.io.cloud_detector; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stdout + run.stderr
