"""Cloud-free composites from several dates (issue 27, item 3)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

from helpers import PRODUCT_BANDS, SCENE, crop_scene, write_raster
from menet_qgis.core.io.composite import DateInput, clear_composite, write_composite

CLEAR, CLOUD, SHADOW = 0, 4, 3   # clouds.py's agreed quality codes
BANDS = ("B2", "B3", "B4", "B8", "B11", "B12")


def _dates(n=4, h=6, w=5, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.01, 0.5, (6, h, w)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("method", ["median", "medoid", "ndvi_max"])
def test_only_clear_observations_count_and_enter(method):
    dates = _dates()
    quality = [np.full((6, 5), CLEAR, np.uint8) for _ in dates]
    # pixel (0, 0): only date 2 clear; (1, 1): no date clear; (2, 2): date 0 NaN in one band, the rest cloud/shadow
    for i, q in enumerate(quality):
        q[0, 0] = CLEAR if i == 2 else CLOUD
        q[1, 1] = SHADOW
        q[2, 2] = CLEAR if i == 0 else CLOUD
    dates[0][4, 2, 2] = np.nan
    composite, count = clear_composite(list(zip(dates, quality)), method=method, bands=BANDS)
    assert composite.dtype == np.float32 and count.dtype == np.uint8
    assert count[0, 0] == 1 and count[1, 1] == 0 and count[2, 2] == 0 and count[3, 3] == 4
    np.testing.assert_array_equal(composite[:, 0, 0], dates[2][:, 0, 0])
    assert np.isnan(composite[:, 1, 1]).all() and np.isnan(composite[:, 2, 2]).all()
    assert np.isfinite(composite[:, count > 0]).all()


def test_median_of_clear_values_only():
    dates = [np.full((6, 2, 2), v, np.float32) for v in (0.1, 0.2, 0.9, 0.3)]
    quality = [np.full((2, 2), q, np.uint8) for q in (CLEAR, CLEAR, CLOUD, CLEAR)]
    composite, count = clear_composite(list(zip(dates, quality)), method="median")
    np.testing.assert_allclose(composite, 0.2)   # the cloud's 0.9 never enters
    assert (count == 3).all()


def test_medoid_of_two_takes_the_darker_blue():
    hazy = np.full((6, 2, 2), 0.3, np.float32)
    clear = np.full((6, 2, 2), 0.05, np.float32)
    for order in ([hazy, clear], [clear, hazy]):
        composite, count = clear_composite([(d, np.zeros((2, 2), np.uint8)) for d in order], bands=BANDS)
        np.testing.assert_array_equal(composite, clear)
        assert (count == 2).all()


def test_options_offer_the_composite_rules_of_the_core():
    from menet_qgis import options
    from menet_qgis.core.io.composite import METHODS
    option = options.by_name(options.PREPARE, "composite")
    assert option.choices == METHODS and option.default == METHODS[0]


def test_medoid_keeps_one_dates_spectrum():
    dates = _dates(n=5, seed=1)
    quality = [np.zeros((6, 5), np.uint8) for _ in dates]
    composite, _ = clear_composite(list(zip(dates, quality)), method="medoid")
    stack = np.stack(dates)
    same = (stack == composite[None]).all(axis=1)   # (n, h, w): whole spectrum from that date
    assert same.any(axis=0).all()


def test_bad_observations_refused_in_one_line():
    with pytest.raises(ValueError, match="at least one"):
        clear_composite([])
    a = np.zeros((6, 4, 4), np.float32)
    with pytest.raises(ValueError, match="one grid"):
        clear_composite([(a, np.zeros((4, 4), np.uint8)), (np.zeros((6, 4, 5), np.float32), np.zeros((4, 5), np.uint8))])
    with pytest.raises(ValueError, match="unknown composite method"):
        clear_composite([(a, np.zeros((4, 4), np.uint8))], method="mean")
    with pytest.raises(ValueError, match="B4 and B8"):
        clear_composite([(a, np.zeros((4, 4), np.uint8))], method="ndvi_max")


# --- the must-show: real pixels, real clouds, several dates ---------------------------------------------
TILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "magset2" / "tiles"
LABELS = Path(__file__).resolve().parent / "data" / "clouds"
CROP = (1280, 384, 384, 384)          # row, col, height, width in scene_2020.tif: fully valid, coast with mangrove
#: (tile, row, col, quarter turns) pasted per date: real cloud pixels at different places, overlapping so some
#: pixels are clear on 0, 1, 2, 3 or 4 dates
PASTES = [[("tile_1_41", 0, 0, 0), ("tile_1_41", 128, 128, 1), ("tile_1_48", 256, 0, 0), ("tile_1_41", 0, 256, 2),
           ("tile_1_48", 256, 256, 3)],
          [("tile_1_41", 64, 64, 3), ("tile_1_41", 200, 200, 0), ("tile_1_48", 0, 128, 1), ("tile_2_01", 256, 128, 0),
           ("tile_1_41", 128, 0, 2)],
          [("tile_1_48", 0, 0, 2), ("tile_1_41", 128, 256, 0), ("tile_1_41", 256, 64, 1), ("tile_2_01", 64, 192, 0),
           ("tile_1_48", 160, 96, 0)],
          [("tile_1_41", 32, 32, 1), ("tile_1_41", 224, 224, 3), ("tile_1_48", 96, 160, 2), ("tile_2_01", 0, 256, 0),
           ("tile_1_41", 250, 0, 0)]]


def cloud_tile(name):
    """(6, 128, 128) reflectance of a cloudy MagSet-2 tile as B2, B3, B4, B8, B11, B12 (no B12 there: B11 stands
    in) and its cloud footprint: bright in blue and red (B2 >= 0.15 and B4 >= 0.12) or labelled cloud by hand
    (tests/data/clouds, where present)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)   # MagSet-2 tiles carry no georeferencing
        with rasterio.open(TILES / f"{name}.tif") as ds:
            dn = ds.read().astype(np.float32) / 10000.0      # B2, B3, B4, B8, B8A, B11, offset 0
    pixels = dn[[0, 1, 2, 3, 5, 5]]
    footprint = (dn[0] >= 0.15) & (dn[2] >= 0.12)
    label = LABELS / f"{name}_cloud.tif"
    if label.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(label) as ds:
                footprint |= ds.read(1) == 1
    return pixels, footprint


def cloudy_dates(truth):
    """The truth with each date's clouds pasted in, the per-date cloud footprints (10 m) and SCL (20 m: a
    20 m pixel is cloud (9) where any of its four 10 m pixels is, vegetation (4) elsewhere, as L2A's)."""
    dates, footprints = [], []
    for pastes in PASTES:
        date, cloud = truth.copy(), np.zeros(truth.shape[1:], bool)
        for name, row, col, turns in pastes:
            pixels, footprint = cloud_tile(name)
            pixels, footprint = np.rot90(pixels, turns, axes=(1, 2)), np.rot90(footprint, turns)
            h, w = min(128, truth.shape[1] - row), min(128, truth.shape[2] - col)
            part = footprint[:h, :w]
            date[:, row:row + h, col:col + w][:, part] = pixels[:, :h, :w][:, part]
            cloud[row:row + h, col:col + w] |= part
        dates.append(date)
        footprints.append(cloud)
    return dates, footprints


def scl_20m(cloud):
    blocks = cloud.reshape(cloud.shape[0] // 2, 2, cloud.shape[1] // 2, 2).any(axis=(1, 3))
    return np.where(blocks, 9, 4).astype(np.uint8)


@pytest.fixture(scope="module")
def cloudy_area(tmp_path_factory):
    if not (SCENE.is_file() and TILES.is_dir()):
        pytest.skip("real data (../shared/data: jambeli scene, magset2 tiles) not available")
    folder = tmp_path_factory.mktemp("composite")
    row, col, h, w = CROP
    truth_path = crop_scene(folder / "truth.tif", row, col, h, w)
    with rasterio.open(truth_path) as ds:
        truth, profile = ds.read(), ds.profile
    dates, footprints = cloudy_dates(truth)
    rasters, scls, masks = [], [], []
    for i, (date, cloud) in enumerate(zip(dates, footprints), 1):
        transform = profile["transform"]
        if i == 3:   # one date on a larger grid (64 px more each side): read through the warper
            pad = 64
            date = np.pad(date, ((0, 0), (pad, pad), (pad, pad)), constant_values=np.nan)
            cloud = np.pad(cloud, pad)
            transform = transform * Affine.translation(-pad, -pad)
        rasters.append(write_raster(folder / f"date{i}.tif", date, PRODUCT_BANDS, crs=profile["crs"],
                                    transform=transform, nodata=float("nan")))
        scls.append(write_raster(folder / f"date{i}_SCL_20m.tif", scl_20m(cloud)[None],
                                 crs=profile["crs"], transform=transform * Affine.scale(2), nodata=0))
        masks.append(write_raster(folder / f"date{i}_cloud.tif", cloud.astype(np.uint8)[None], crs=profile["crs"],
                                  transform=transform))
    return dict(folder=folder, truth=truth, truth_path=truth_path, footprints=footprints, rasters=rasters,
                scls=scls, masks=masks)


def expected_count(footprints, scl_grid=True):
    """Clear dates per 10 m pixel when each date's clouds are known from its 20 m SCL (scl_grid) or at 10 m."""
    if scl_grid:
        footprints = [np.kron(scl_20m(f) == 9, np.ones((2, 2), bool)) for f in footprints]
    return sum((~f).astype(np.uint8) for f in footprints)


def test_composite_of_four_cloudy_dates_is_the_cloud_free_truth(cloudy_area, tmp_path):
    """Four dates of one real area, each with real clouds of MagSet-2 tiles pasted in at other places and an
    L2A-style SCL marking them: the composite is the cloud-free crop wherever a date is clear, no data where
    none is, and the count band counts the clear dates."""
    area = cloudy_area
    dates = [DateInput(r, scl=s) for r, s in zip(area["rasters"], area["scls"])]
    result = write_composite(dates, tmp_path / "composite.tif")
    with rasterio.open(result.path) as ds:
        composite, count = ds.read(list(range(1, 7))), ds.read(7)
        assert ds.descriptions == tuple(PRODUCT_BANDS) + ("CLEAR_COUNT",)
        with rasterio.open(area["truth_path"]) as truth_ds:
            assert (ds.crs, ds.transform, ds.shape) == (truth_ds.crs, truth_ds.transform, truth_ds.shape)
    expected = expected_count(area["footprints"])
    np.testing.assert_array_equal(count, expected)
    assert set(np.unique(expected)) == {0, 1, 2, 3, 4}          # every case occurs
    seen = count > 0
    np.testing.assert_allclose(composite[:, seen], area["truth"][:, seen], rtol=0, atol=1e-6)
    assert np.isnan(composite[:, ~seen]).all()
    assert result.count_histogram == np.bincount(expected.ravel(), minlength=5).tolist()
    # without the clouds masked, a median lets them through: the check can fail
    naive = np.median(np.stack(cloudy_dates(area["truth"])[0]), axis=0)
    assert np.abs(naive - area["truth"]).max() > 0.05


@pytest.mark.integration
def test_cli_composite_maps_like_the_cloud_free_crop(cloudy_area, cli, tmp_path):
    """`prepare` with four dates and their cloud masks writes the composite; `predict` with its defaults maps
    it as it maps the cloud-free crop, no data only where no date is clear."""
    area = cloudy_area
    out = tmp_path / "composite.tif"
    run = cli("prepare", *area["rasters"], out, "--masks", ",".join(str(m) for m in area["masks"]))
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["dates"] == 4 and result["composite"] == "medoid"
    with rasterio.open(out) as ds:
        composite, count = ds.read(list(range(1, 7))), ds.read(7)
    expected = expected_count(area["footprints"], scl_grid=False)
    np.testing.assert_array_equal(count, expected)
    seen = count > 0
    np.testing.assert_allclose(composite[:, seen], area["truth"][:, seen], rtol=0, atol=1e-6)
    assert 0.15 < np.mean([1 - (~f).mean() for f in area["footprints"]])   # a fifth of each date is cloud
    run = cli("predict", area["truth_path"], out, "--out-dir", tmp_path / "maps", "--quiet")
    assert run.returncode == 0, run.stderr
    with rasterio.open(tmp_path / "maps" / "truth_probability.tif") as ds:
        truth_map, threshold = ds.read(1), float(ds.tags()["MENET_THRESHOLD"])
    with rasterio.open(tmp_path / "maps" / "composite_probability.tif") as ds:
        composite_map = ds.read(1)
    assert np.isnan(composite_map[~seen]).all()
    both = np.isfinite(truth_map) & np.isfinite(composite_map)
    changed = ((truth_map >= threshold) != (composite_map >= threshold))[both].mean()
    assert changed < 0.002, f"{changed:.2%} of the map changed"
    lost = (np.isnan(composite_map) & np.isfinite(truth_map) & seen).mean()
    assert lost < 0.01, f"{lost:.2%} of the clear composite left unmapped"
    print(f"composite map vs cloud-free map: {changed:.3%} changed, {(~seen).mean():.2%} clear on no date")


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_l2a_products_composite_by_their_scl(cloudy_area, cli, tmp_path):
    """The four cloudy dates as L2A products, as users have them (a .SAFE folder, its zip, its MTD_MSIL2A.xml,
    the 10 m subdataset QGIS opens), each with an SCL marking its real clouds; one from before processing
    baseline 04.00 (DN offset 0), the others after (-1000).  The composite takes each date's clear pixels from
    its SCL and its DN offset from its metadata: the 10 m bands are the cloud-free crop's wherever a date is
    clear, and its map is the map of the cloud-free product."""
    from helpers import write_l2a_product
    area = cloudy_area
    with rasterio.open(area["truth_path"]) as ds:
        transform, crs = ds.transform, ds.crs
    dates, footprints = cloudy_dates(area["truth"])
    inputs = []
    for i, (date, cloud, form) in enumerate(zip(dates, footprints, ("safe", "zip", "xml", "subdataset")), 1):
        product = write_l2a_product(tmp_path / form, date, scl=scl_20m(cloud), transform=transform, crs=crs,
                                    date=f"202{0 if i == 1 else 2}-0{i}-15T15:36:21", zip=form == "zip",
                                    baseline="02.14" if i == 1 else "05.09")
        if form == "xml":
            product = product / "MTD_MSIL2A.xml"
        elif form == "subdataset":
            with rasterio.open(product / "MTD_MSIL2A.xml") as ds:
                product = next(s for s in ds.subdatasets if ":10m:" in s)
        inputs.append(product)
    clear = write_l2a_product(tmp_path / "clear", area["truth"], transform=transform, crs=crs)
    out = tmp_path / "composite.tif"
    run = cli("prepare", *inputs, out)
    assert run.returncode == 0, run.stderr
    assert "scene classification" in run.stderr
    with rasterio.open(out) as ds:
        assert ds.dtypes[0] == "uint16" and ds.tags()["BOA_ADD_OFFSET"] == "-1000"
        composite = (ds.read(list(range(1, 7))).astype(np.float32) - 1000) / 10000
        count = ds.read(7)
    expected = expected_count(footprints)
    np.testing.assert_array_equal(count, expected)
    seen = count > 0
    np.testing.assert_allclose(composite[:4, seen], area["truth"][:4, seen], rtol=0, atol=0.6e-4)
    # B11 and B12 come from 20 m: pixels away from every date's clouds hold the cloud-free product's values
    run = cli("prepare", clear, tmp_path / "clear_stack.tif")
    assert run.returncode == 0, run.stderr
    with rasterio.open(tmp_path / "clear_stack.tif") as ds:
        reference = (ds.read([5, 6]).astype(np.float32) - 1000) / 10000
    from scipy.ndimage import binary_dilation
    far = ~binary_dilation(np.logical_or.reduce(footprints), iterations=4)
    assert far.mean() > 0.05
    np.testing.assert_allclose(composite[4:, far], reference[:, far], rtol=0, atol=1.5e-4)
    run = cli("predict", tmp_path / "clear_stack.tif", out, "--out-dir", tmp_path / "maps", "--quiet")
    assert run.returncode == 0, run.stderr
    with rasterio.open(tmp_path / "maps" / "clear_stack_probability.tif") as ds:
        clear_map, threshold = ds.read(1), float(ds.tags()["MENET_THRESHOLD"])
    with rasterio.open(tmp_path / "maps" / "composite_probability.tif") as ds:
        composite_map = ds.read(1)
    both = np.isfinite(clear_map) & np.isfinite(composite_map)
    changed = ((clear_map >= threshold) != (composite_map >= threshold))[both].mean()
    print(f"L2A products: composite map vs cloud-free product's map: {changed:.3%} changed, "
          f"{np.isnan(composite_map).mean():.2%} no data")
    assert changed < 0.01


@pytest.mark.integration
def test_processing_composites_raster_layers_with_the_detector(cloudy_area, menet_provider, tmp_path):
    """'Prepare Sentinel-2 stack' with no product folder and the four dates as raster layers (no SCL, no
    mask: the cloud detector decides) writes the composite; pixels clear on every date are the crop's."""
    import processing
    from qgis.core import QgsRasterLayer
    area = cloudy_area
    layers = [QgsRasterLayer(str(r), f"date{i}") for i, r in enumerate(area["rasters"], 1)]
    assert all(layer.isValid() for layer in layers)
    result = processing.run("menet:preparesentinel2", {"MORE_DATES": layers, "OUTPUT": str(tmp_path / "c.tif")})
    with rasterio.open(result["OUTPUT"]) as ds:
        composite, count, tags = ds.read(list(range(1, 7))), ds.read(7).astype(np.int64), ds.tags()
    assert tags["MENET_COMPOSITE_CLEAR_FROM"] == ";".join(["cloud detector"] * 4)
    clear_everywhere = ~np.logical_or.reduce(area["footprints"]) & (count > 0)
    np.testing.assert_allclose(composite[:, clear_everywhere], area["truth"][:, clear_everywhere], atol=1e-6)
    print(f"detector composite: {(count == 0).mean():.2%} clear on no date; pixels per count "
          f"{np.bincount(count.ravel(), minlength=5).tolist()} (SCL: "
          f"{np.bincount(expected_count(area['footprints']).ravel(), minlength=5).tolist()})")
    assert (count > 0).mean() > 0.9


def test_bad_composites_are_refused_in_one_line_and_leave_nothing(tmp_path):
    from menet_qgis import jobs
    from menet_qgis.core.reporting import Cancelled, Reporter
    data = np.random.default_rng(0).uniform(0.01, 0.3, (6, 32, 32)).astype(np.float32)
    a = write_raster(tmp_path / "a.tif", data, PRODUCT_BANDS, nodata=float("nan"))
    b = write_raster(tmp_path / "b.tif", data, PRODUCT_BANDS, nodata=float("nan"))
    far = write_raster(tmp_path / "far.tif", data, PRODUCT_BANDS, nodata=float("nan"),
                       transform=rasterio.transform.from_origin(700000, 9500000, 10, 10))
    out = tmp_path / "c.tif"
    cases = [({"dates": [a, b], "masks": [a]}, "1 mask"),
             ({"dates": [a], "masks": [a]}, "two or more dates"),
             ({}, "two or more dates to composite"),
             ({"dates": [a, b], "composite": "mean"}, "composite must be one of"),
             ({"dates": [a, far]}, "far.tif does not overlap a.tif"),
             ({"dates": [a, tmp_path / "missing.tif"]}, "missing.tif"),
             ({"dates": [a, b], "output": str(b)}, "b.tif")]          # never over an input
    for params, message in cases:
        with pytest.raises((ValueError, OSError), match=message) as raised:
            jobs.prepare({"output": str(out), **params}, Reporter())
        assert "\n" not in str(raised.value)
        assert not list(tmp_path.glob("c.tif*")), params

    class Cancelling(Reporter):
        def cancelled(self):
            return True
    with pytest.raises(Cancelled):
        jobs.prepare({"output": str(out), "dates": [a, b], "masks": ["-", "-"]}, Cancelling())
    assert not list(tmp_path.glob("c*"))


def test_composites_need_no_torch(tmp_path):
    """The light engine environment has no torch: a composite is made without importing it."""
    import subprocess
    import sys
    data = np.random.default_rng(0).uniform(0.01, 0.3, (6, 32, 32)).astype(np.float32)
    a = write_raster(tmp_path / "a.tif", data, PRODUCT_BANDS)
    b = write_raster(tmp_path / "b.tif", data, PRODUCT_BANDS)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from menet_qgis import jobs\nfrom menet_qgis.core.reporting import Reporter\n"
            f"jobs.prepare({{'dates': [{str(a)!r}, {str(b)!r}], 'output': {str(tmp_path / 'c.tif')!r}}}, Reporter())\n"
            "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "c.tif").is_file()
