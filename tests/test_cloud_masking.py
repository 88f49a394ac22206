"""No silent guesses under clouds (issue 27, item 2): pixels without ground evidence become no-data in the
probability, a quality layer says why, and the masked share is reported."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from helpers import ORIGIN, ROOT, qgis_process, read, write_raster
from menet_qgis.core.io import clouds


# --- the quality codes ----------------------------------------------------------------------------
def test_scl_classes_map_to_quality_codes():
    scl = np.arange(12, dtype=np.uint8).reshape(3, 4)
    expected = np.array([[clouds.NO_DATA, clouds.DEFECTIVE, clouds.CLEAR, clouds.SHADOW],
                         [clouds.CLEAR] * 4,
                         [clouds.CLOUD, clouds.CLOUD, clouds.CIRRUS, clouds.CLEAR]], dtype=np.uint8)
    quality = clouds.scl_quality(scl)
    assert quality.dtype == np.uint8
    np.testing.assert_array_equal(quality, expected)
    # out-of-range classes (a corrupt or foreign band) are not invented into clouds
    np.testing.assert_array_equal(clouds.scl_quality(np.array([-1, 300, 255])), [0, 0, 0])


def test_codes_have_names_and_combine_by_precedence():
    assert set(clouds.QUALITY_NAMES) == set(range(7))
    scl = clouds.scl_quality(np.array([[4, 3, 8]]))
    user = clouds.user_mask_quality(np.array([[0.0, np.nan, 2.0]]))
    np.testing.assert_array_equal(user, [[0, 0, clouds.USER_MASK]])
    np.testing.assert_array_equal(clouds.combine(scl, None, user), [[0, clouds.SHADOW, clouds.USER_MASK]])
    with pytest.raises(ValueError):
        clouds.combine(scl, np.zeros((2, 2), np.uint8))


def test_masked_share_and_summary_line():
    quality = np.zeros((10, 10), np.uint8)
    quality[:2] = clouds.CLOUD
    quality[2, :3] = clouds.SHADOW
    assert clouds.masked_share(quality) == pytest.approx(0.23)
    assert clouds.masked_summary(quality).startswith("23 % cloud or shadow: left as no-data")
    assert clouds.masked_summary(np.zeros((4, 4), np.uint8)) == "no cloud, shadow or defective pixels found"
    total = clouds.add_counts(clouds.code_counts(quality), clouds.code_counts(np.zeros((10, 10), np.uint8)))
    assert clouds.masked_share(total) == pytest.approx(0.115)
    probability = np.full((10, 10), 0.5, np.float32)
    clouds.apply_mask(probability, quality)
    assert np.isnan(probability).sum() == 23 and np.all(probability[3:] == 0.5)
    quality[9] = clouds.NO_DATA
    assert clouds.masked_summary(quality) == ("23 % cloud or shadow: left as no-data (cloud shadow 3 %, cloud 20 %); "
                                              "10 % no data")


# --- the engine: real cloudy pixels, a scene classification marking their clouds -----------------------
TILES = ROOT.parent / "shared" / "data" / "magset2" / "tiles"
LABELS = ROOT / "tests" / "data" / "clouds"  # clouds labelled by hand per tile: 1 cloud, 0 clear, 255 not labelled
MODEL = ROOT / "resources" / "models" / "menet_coasts_v2.pt"


def cloudy_tile(tmp_path, name="tile_1_41"):
    """A real cloudy MagSet-2 tile (B2, B3, B4, B8, B8A, B11; no B12) on a nominal 10 m UTM grid, and its
    hand-labelled cloud mask."""
    if not (TILES / f"{name}.tif").is_file():
        pytest.skip(f"MagSet-2 tiles not available at {TILES}")
    with rasterio.open(TILES / f"{name}.tif") as ds:
        data, descriptions, tags = ds.read(), ds.descriptions, ds.tags()
    with rasterio.open(LABELS / f"{name}_cloud.tif") as ds:
        label = ds.read(1)
    return write_raster(tmp_path / f"{name}.tif", data, descriptions, tags=tags), label


def write_scl(tmp_path, label) -> tuple:
    """A 20 m scene classification as an L2A product has it: 9 (cloud, high probability) on the labelled
    cloud, 4 (vegetation) elsewhere; and its classes on the 10 m grid (each 20 m pixel covers 2 x 2)."""
    scl20 = np.where(label[::2, ::2] == 1, 9, 4).astype(np.uint8)
    path = write_raster(tmp_path / "SCL_20m.tif", scl20[None], transform=from_origin(*ORIGIN, 20, 20))
    return path, np.kron(scl20, np.ones((2, 2), np.uint8))


def reported(line: str, reason: str) -> float:
    """The share (0-1) a summary line reports, checking its wording: "<percent> % <reason>: left as no-data"."""
    match = re.fullmatch(r"([\d.]+) % " + re.escape(reason) + ": left as no-data", line)
    assert match, line
    return float(match.group(1)) / 100


def extract(tmp_path, source, name, **options):
    from menet_qgis import jobs
    from menet_qgis.core.reporting import Reporter
    if not MODEL.is_file():
        pytest.skip("the default model is not in resources/models")
    out = tmp_path / f"{name}.tif"
    result = jobs.extract({"input": str(source), "output": str(out), "model": str(MODEL), "options": options},
                          Reporter())
    return result, out


def test_a_cloudy_tile_maps_its_clouds_as_no_data_from_the_scene_classification(tmp_path):
    tile, label = cloudy_tile(tmp_path)
    scl_path, scl = write_scl(tmp_path, label)
    plain, plain_out = extract(tmp_path, tile, "off", cloud_mask="off")
    result, out = extract(tmp_path, tile, "masked", scl=str(scl_path))
    before, after = read(plain_out)[0], read(out)[0]
    cloud = label == 1
    # without masking the model paints mangrove on the clouds: the guess this issue is about
    assert plain["quality"] is None and not clouds.quality_path(plain_out).exists()
    assert np.isfinite(before).all() and np.mean(before[cloud]) > 0.5
    # with it, the SCL's clouds are no-data and the quality layer says why, on the probability's grid
    quality_path = clouds.quality_path(out)
    assert result["quality"] == str(quality_path)
    with rasterio.open(quality_path) as q, rasterio.open(out) as p:
        assert (q.crs, q.transform, q.shape, q.dtypes[0]) == (p.crs, p.transform, p.shape, "uint8")
        quality = q.read(1)
        assert q.colormap(1)[clouds.CLOUD] == clouds.QUALITY_COLOURS[clouds.CLOUD]
        tags = p.tags()
    np.testing.assert_array_equal(quality, clouds.scl_quality(scl))
    assert np.array_equal(np.isnan(after), quality != clouds.CLEAR)
    assert np.isnan(after[cloud]).mean() >= 0.8
    # the probability of every other pixel is what it was without masking
    assert before[quality == clouds.CLEAR].tobytes() == after[quality == clouds.CLEAR].tobytes()
    assert reported(result["masked"], "cloud") == pytest.approx((quality != clouds.CLEAR).mean(), abs=0.001)
    assert tags["MENET_MASKED"] == result["masked"]


@pytest.mark.parametrize("zipped", [False, True])
def test_an_l2a_product_as_delivered_masks_the_clouds_its_scene_classification_marks(tmp_path, zipped):
    """Cloud mask auto on a product (.SAFE folder or its zip) uses the product's own SCL, read in place."""
    from helpers import write_l2a_product
    tile, label = cloudy_tile(tmp_path)
    tile_data = read(tile).astype(np.float32) / 10000
    # B2, B3, B4, B8, B11 of the real tile; it has no B12, which the default model (recipe v2) does not read:
    # B11 stands in so the product has its six bands
    reflectance = tile_data[[0, 1, 2, 3, 5, 5]]
    scl20 = np.where(label[::2, ::2] == 1, 9, 4).astype(np.uint8)
    scl20[:4, :8] = 3  # and a patch of cloud shadow
    product = write_l2a_product(tmp_path / "product", reflectance, scl20, zip=zipped)
    result, out = extract(tmp_path, product, "product")
    quality = read(result["quality"])[0]
    np.testing.assert_array_equal(quality, clouds.scl_quality(np.kron(scl20, np.ones((2, 2), np.uint8))))
    assert np.array_equal(np.isnan(read(out)[0]), quality != clouds.CLEAR)
    assert result["masked"].startswith(f"{clouds._percent((quality != 0).mean())} % cloud or shadow: left as no-data")


@pytest.mark.parametrize("name", ["tile_1_41", "tile_1_48", "tile_2_01", "tile_0_45", "tile_0_23"])
def test_predict_with_its_defaults_masks_real_clouds_and_leaves_bright_sand_and_salt(tmp_path, name):
    """No scene classification: the defaults use the detector.  Clouds labelled by hand: at least 80 % are
    no-data; bright cloud-free ground (sand, salt ponds: 0_45, 0_23): at most 5 % of its bright pixels."""
    tile, label = cloudy_tile(tmp_path, name)
    result, out = extract(tmp_path, tile, "defaults")
    masked = np.isnan(read(out)[0])
    assert np.array_equal(masked, read(result["quality"])[0] != clouds.CLEAR)
    if (label == 1).any():
        assert masked[label == 1].mean() >= 0.8, result["masked"]
    else:
        reflectance = read(tile)[:3].astype(np.float32) / 10000
        bright = reflectance.mean(axis=0) >= 0.12
        assert bright.sum() > 100 and masked[bright].mean() <= 0.05, result["masked"]


def test_the_detector_gives_a_pixel_the_same_code_in_any_block(tmp_path):
    """Windows (to skip all-cloud ones) and strips of rows (to mask) are different blocks: each pixel's code
    must not depend on the block, though the detector looks at a pixel's neighbours."""
    from menet_qgis.core.io.raster_io import MaskSource, RasterInput
    tile, _ = cloudy_tile(tmp_path)
    mask = MaskSource(RasterInput(tile), detector=True)
    whole, blocks = mask.quality(0, 0, 128, 128), np.zeros((128, 128), np.uint8)
    for row in range(0, 128, 20):
        for col in range(0, 128, 33):
            h, w = min(20, 128 - row), min(33, 128 - col)
            blocks[row:row + h, col:col + w] = mask.quality(row, col, h, w)
    mask.close()
    assert (whole == clouds.CLOUD).sum() > 1000
    np.testing.assert_array_equal(blocks, whole)


def test_a_mask_layer_of_the_user_raster_or_polygons_applies_even_with_cloud_masking_off(tmp_path):
    tile, _ = cloudy_tile(tmp_path)
    plain, plain_out = extract(tmp_path, tile, "off", cloud_mask="off")
    mask = np.zeros((1, 128, 128), np.uint8)
    mask[0, 10:40, 20:70] = 3
    raster = write_raster(tmp_path / "mask.tif", mask)
    x0, y0 = ORIGIN
    polygon = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32717"}},
               "features": [{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [[
                   [x0 + 200, y0 - 100], [x0 + 700, y0 - 100], [x0 + 700, y0 - 400], [x0 + 200, y0 - 400],
                   [x0 + 200, y0 - 100]]]}}]}
    vector = tmp_path / "mask.geojson"
    vector.write_text(json.dumps(polygon))
    expected = np.zeros((128, 128), bool)
    expected[10:40, 20:70] = True
    for layer in (raster, vector):
        result, out = extract(tmp_path, tile, f"user_{layer.suffix[1:]}", cloud_mask="off", mask_layer=str(layer))
        quality = read(result["quality"])[0]
        np.testing.assert_array_equal(quality, np.where(expected, clouds.USER_MASK, clouds.CLEAR))
        probability = read(out)[0]
        assert np.array_equal(np.isnan(probability), expected)
        assert read(plain_out)[0][~expected].tobytes() == probability[~expected].tobytes()
        assert reported(result["masked"], "user mask") == pytest.approx(expected.mean(), abs=0.001)


def test_an_extent_gets_the_codes_of_its_own_pixels(tmp_path):
    """Processing only an extent: the quality layer and the no-data are those of the extent's pixels."""
    from menet_qgis import jobs
    from menet_qgis.core.reporting import Reporter
    tile, label = cloudy_tile(tmp_path)
    mask = write_raster(tmp_path / "clouds.tif", (label == 1).astype(np.uint8)[None])
    x0, y0 = ORIGIN
    rows, cols = slice(30, 100), slice(20, 90)  # the extent, in pixels
    bounds = [x0 + 10 * cols.start, y0 - 10 * rows.stop, x0 + 10 * cols.stop, y0 - 10 * rows.start]
    out = tmp_path / "extent.tif"
    result = jobs.extract({"input": str(tile), "output": str(out), "model": str(MODEL), "bounds": bounds,
                           "options": {"cloud_mask": "off", "mask_layer": str(mask)}}, Reporter())
    expected = label[rows, cols] == 1
    np.testing.assert_array_equal(read(result["quality"])[0], np.where(expected, clouds.USER_MASK, clouds.CLEAR))
    assert np.array_equal(np.isnan(read(out)[0]), expected)


def test_windows_whose_every_pixel_is_masked_are_not_run(tmp_path):
    tile, _ = cloudy_tile(tmp_path)
    everything = write_raster(tmp_path / "all.tif", np.ones((1, 128, 128), np.uint8))
    result, out = extract(tmp_path, tile, "all", cloud_mask="off", mask_layer=str(everything))
    assert result["windows_run"] == 0 and np.isnan(read(out)).all()
    assert (read(result["quality"]) == clouds.USER_MASK).all()
    assert result["masked"] == "100 % user mask: left as no-data"


def test_scene_classification_asked_for_where_there_is_none_is_refused_in_one_line(tmp_path):
    from menet_qgis.core.files import InputError
    tile, _ = cloudy_tile(tmp_path)
    with pytest.raises(InputError, match="has no scene classification") as info:
        extract(tmp_path, tile, "scl", cloud_mask="scl")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "scl.tif").exists() and not (tmp_path / "scl_quality.tif").exists()


def test_extract_in_qgis_leaves_masked_pixels_as_no_data_and_returns_the_quality_layer(qgis_env, tmp_path):
    """The Processing algorithm (its engine in its own process): an SCL-derived cloud mask given as the mask
    layer -> the same no-data, the quality layer and the masked share among the outputs."""
    tile, label = cloudy_tile(tmp_path)
    mask = write_raster(tmp_path / "clouds.tif", (label == 1).astype(np.uint8)[None])
    out = tmp_path / "prob.tif"
    proc = qgis_process(["--json", "run", "menet:extractmangroves", "--", f"INPUT={tile}", f"MODEL={MODEL}",
                         f"MASK_LAYER={mask}", "CLOUD_MASK=3", f"OUTPUT={out}"], qgis_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout[proc.stdout.index("{"):])["results"]
    assert results["QUALITY"] == str(clouds.quality_path(out))
    quality = read(results["QUALITY"])[0]
    np.testing.assert_array_equal(quality, np.where(label == 1, clouds.USER_MASK, clouds.CLEAR))
    assert np.array_equal(np.isnan(read(out)[0]), label == 1)
    assert reported(results["MASKED"], "user mask") == pytest.approx((label == 1).mean(), abs=0.001)


def test_extract_loads_the_quality_layer_below_the_probability_with_named_classes(menet_provider, untrained_path,
                                                                                  tmp_path):
    """Open output after running: where pixels were masked, the quality layer comes in right below the
    probability (it shows through the probability's no-data), its codes as named, coloured classes."""
    from qgis.core import QgsProcessingOutputLayerDefinition, QgsProject, QgsRasterLayer
    from test_processing import run_and_load
    tile, label = cloudy_tile(tmp_path)
    mask = write_raster(tmp_path / "clouds.tif", (label == 1).astype(np.uint8)[None])
    project = QgsProject.instance()
    project.clear()
    layer = QgsRasterLayer(str(tile), "tile")
    project.addMapLayer(layer)
    out = str(tmp_path / "p.tif")
    run_and_load("menet:extractmangroves", {"INPUT": layer.id(), "MODEL": str(untrained_path), "MASK_LAYER": str(mask),
                                            "CLOUD_MASK": 3, "WINDOW_SIZE": 64, "OVERLAP": 32,
                                            "OUTPUT": QgsProcessingOutputLayerDefinition(out, project)})
    names = [node.name() for node in project.layerTreeRoot().children()]
    assert names[:2] == ["tile mangrove probability", "tile quality (why no probability)"], names
    quality = project.layerTreeRoot().children()[1].layer()
    assert quality.source() == str(clouds.quality_path(out))
    classes = {c.value: c.label for c in quality.renderer().classes()}
    assert classes == clouds.QUALITY_NAMES
    project.clear()
