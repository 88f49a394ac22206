"""From product-like folders (.SAFE tree, flat band files) to the 6-band stack and the channel export."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from osgeo import gdal, ogr
from rasterio.transform import from_origin
from rasterio.warp import transform_geom

from helpers import UTM17S, read
from menet_qgis.core import reporting
from menet_qgis.core.io import sentinel2_product, stack
from menet_qgis.core.compat import apply
from menet_qgis.core.model.channels import CHANNEL_NAMES, DEFAULT_RECIPE, RECIPE_V1, SOURCE_BANDS, compute_channels
from menet_qgis.core.io.raster_io import RasterInput

ORIGIN = (600000.0, 9700000.0)        # upper-left corner of the (small) tile
SIZE = 40                             # 10 m pixels; the 20 m bands have SIZE // 2
SAFE_NAME = "S2A_MSIL2A_20230105T153621_N0509_R068_T17MPN_20230105T212411.SAFE"
PREFIX = "T17MPN_20230105T153621"
CODES = {"B2": "B02", "B3": "B03", "B4": "B04", "B8": "B08", "B11": "B11", "B12": "B12"}
RESOLUTION = {"B2": 10, "B3": 10, "B4": 10, "B8": 10, "B11": 20, "B12": 20}
EXT = ".jp2" if gdal.GetDriverByName("JP2OpenJPEG") is not None else ".tif"


def band_data(band: str) -> np.ndarray:
    """DN per band: B11 constant (to see resampling keep it), the others random."""
    n = SIZE * 10 // RESOLUTION[band]
    if band == "B11":
        return np.full((n, n), 2500, np.uint16)
    return np.random.default_rng(SOURCE_BANDS.index(band)).integers(1000, 6000, (n, n)).astype(np.uint16)


BANDS = {b: band_data(b) for b in SOURCE_BANDS}


def write_band(path, data: np.ndarray, resolution: int, crs=UTM17S):
    """One band file; .jp2 names are real (lossless) JPEG 2000 like the products'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    jp2 = path.suffix == ".jp2"
    options = dict(driver="JP2OpenJPEG", REVERSIBLE="YES", QUALITY="100") if jp2 else dict(driver="GTiff")
    with rasterio.open(path, "w", width=data.shape[1], height=data.shape[0], count=1, dtype=data.dtype.name,
                       crs=crs, transform=from_origin(*ORIGIN, resolution, resolution), **options) as ds:
        ds.write(data[None])
    return path


def metadata_xml(level: str = "2A", offset: int = -1000, baseline: str = "05.09") -> str:
    key = "BOA_ADD_OFFSET" if level == "2A" else "RADIO_ADD_OFFSET"
    offsets = "".join(f'<{key} band_id="{i}">{offset}</{key}>' for i in range(13))
    return (f'<?xml version="1.0" encoding="UTF-8"?>'
            f'<n1:Level-{level}_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-{level}.xsd">'
            f"<n1:General_Info><Product_Info><PRODUCT_URI>{SAFE_NAME}</PRODUCT_URI>"
            f"<PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE></Product_Info>"
            f"<Product_Image_Characteristics><{key}_VALUES_LIST>{offsets}</{key}_VALUES_LIST>"
            f"</Product_Image_Characteristics></n1:General_Info></n1:Level-{level}_User_Product>")


def make_safe(base):
    """An L2A .SAFE tree with the six bands, coarser copies, masks and the product metadata."""
    root = base / SAFE_NAME
    img = root / "GRANULE" / "L2A_T17MPN_A039333_20230105T153616" / "IMG_DATA"
    for band, data in BANDS.items():
        res = RESOLUTION[band]
        write_band(img / f"R{res}m" / f"{PREFIX}_{CODES[band]}_{res}m{EXT}", data, res)
    write_band(img / "R20m" / f"{PREFIX}_B02_20m{EXT}", np.full((20, 20), 7, np.uint16), 20)   # coarser copy
    write_band(img / "R20m" / f"{PREFIX}_SCL_20m{EXT}", np.full((20, 20), 4, np.uint8), 20)
    write_band(img / "R10m" / f"{PREFIX}_TCI_10m{EXT}", np.full((40, 40), 9, np.uint8), 10)
    write_band(root / "GRANULE" / "L2A_T17MPN_A039333_20230105T153616" / "QI_DATA" / "MSK_QUALIT_B02.jp2",
               np.zeros((40, 40), np.uint8), 10)
    (root / "GRANULE" / "L2A_T17MPN_A039333_20230105T153616" / "MTD_TL.xml").write_text("<Tile/>")
    (root / "MTD_MSIL2A.xml").write_text(metadata_xml())
    return root


def make_flat(folder, names: str = "l2a"):
    """Per-band GeoTIFFs in one folder: L2A-style ``_B11_20m.tif`` or L1C-style ``_B11.tif`` names."""
    for band, data in BANDS.items():
        res = RESOLUTION[band]
        suffix = f"_{res}m" if names == "l2a" else ""
        write_band(folder / f"{PREFIX}_{CODES[band]}{suffix}.tif", data, res)
    return folder


@pytest.fixture(scope="module")
def safe(tmp_path_factory):
    return make_safe(tmp_path_factory.mktemp("products"))


@pytest.fixture(scope="module")
def stacks(safe, tmp_path_factory):
    out = tmp_path_factory.mktemp("stacks")
    return {r: stack.build_stack(safe, out / f"{r}.tif", resampling=r).path for r in ("bilinear", "nearest")}


def upsample_matrix(n: int) -> np.ndarray:
    """(2n, n) bilinear weights from 20 m pixel centres to 10 m pixel centres, clamped at the edges."""
    m = np.zeros((2 * n, n))
    for r in range(2 * n):
        y = min(max(r / 2 - 0.25, 0), n - 1)
        k = int(y)
        m[r, k] += 1 - (y - k)
        if y > k:
            m[r, k + 1] += y - k
    return m


# --- finding the product -------------------------------------------------------------
def test_safe_bands_and_metadata_found(safe):
    product = sentinel2_product.find_product(safe)
    assert {b: p.name for b, p in product.band_files.items()} == {
        b: f"{PREFIX}_{CODES[b]}_{RESOLUTION[b]}m{EXT}" for b in SOURCE_BANDS}
    assert (product.offset, product.offset_key, product.baseline) == (-1000.0, "BOA_ADD_OFFSET", "05.09")
    assert product.name == SAFE_NAME and product.metadata == safe / "MTD_MSIL2A.xml"
    granule_bands = product.band_files["B2"].parent.parent
    assert sentinel2_product.find_product(granule_bands).offset == -1000.0   # metadata found in the .SAFE root


def test_l1c_names_and_radiometric_offset(tmp_path):
    folder = make_flat(tmp_path / "l1c", names="l1c")
    (folder / "MTD_MSIL1C.xml").write_text(metadata_xml("1C", baseline="04.00"))
    product = sentinel2_product.find_product(folder)
    assert product.band_files["B11"].name == f"{PREFIX}_B11.tif"
    assert (product.offset, product.offset_key, product.baseline) == (-1000.0, "RADIO_ADD_OFFSET", "04.00")


def test_metadata_before_baseline_04_means_offset_zero(tmp_path):
    folder = make_flat(tmp_path / "old")
    (folder / "MTD_MSIL2A.xml").write_text(metadata_xml(baseline="02.14").replace("BOA_ADD_OFFSET", "OTHER"))
    result = stack.build_stack(folder, tmp_path / "stack.tif", resampling="nearest")
    assert (result.product.offset, result.product.baseline) == (0.0, "02.14")
    plan = RasterInput(result.path).plan
    assert plan.offset == 0.0 and "offset from product metadata" in plan.describe()
    (folder / "MTD_MSIL2A.xml").write_text(metadata_xml(baseline="").replace("BOA_ADD_OFFSET", "OTHER"))
    assert sentinel2_product.find_product(folder).offset is None      # no baseline, no offset: unknown


def test_missing_band_lists_found_and_needed(tmp_path):
    folder = make_flat(tmp_path / "flat")
    (folder / f"{PREFIX}_B12_20m.tif").unlink()
    with pytest.raises(ValueError) as err:
        stack.build_stack(folder, tmp_path / "out.tif")
    text = str(err.value)
    assert text.startswith(f"no B12 band file in {folder}")
    assert "found B2 (10 m), B3 (10 m), B4 (10 m), B8 (10 m), B11 (20 m)" in text
    assert "needs B2, B3, B4, B8, B11, B12" in text
    assert not (tmp_path / "out.tif").exists()


def test_two_files_for_one_band_refused(tmp_path):
    folder = make_flat(tmp_path / "flat")
    write_band(folder / "T17MPN_20230110T153621_B04_10m.tif", BANDS["B4"], 10)
    with pytest.raises(ValueError, match="several B4 files at 10 m"):
        sentinel2_product.find_band_files(folder)


def test_bands_from_another_tile_refused_and_nothing_written(tmp_path):
    folder = make_flat(tmp_path / "flat")
    write_band(folder / f"{PREFIX}_B11_20m.tif", BANDS["B11"], 20, crs="EPSG:32718")
    with pytest.raises(ValueError, match="not from one tile"):
        stack.build_stack(folder, tmp_path / "out" / "stack.tif")
    assert list((tmp_path / "out").iterdir()) == []


# --- the stack -------------------------------------------------------------------------
def test_stack_keeps_10m_bands_grid_and_metadata(stacks, safe):
    with rasterio.open(stacks["bilinear"]) as ds:
        assert (ds.count, ds.dtypes[0], ds.nodata, ds.width, ds.height) == (6, "uint16", 0, SIZE, SIZE)
        assert ds.crs == rasterio.crs.CRS.from_string(UTM17S)
        assert ds.transform == from_origin(*ORIGIN, 10, 10)
        assert ds.descriptions == tuple(SOURCE_BANDS)
        assert ds.profile["compress"] == "deflate" and ds.profile["tiled"]
        tags = ds.tags()
        data = ds.read()
    assert tags["BOA_ADD_OFFSET"] == "-1000" and tags["PROCESSING_BASELINE"] == "05.09"
    assert tags["SOURCE_PRODUCT"] == SAFE_NAME
    for i, band in enumerate(SOURCE_BANDS[:4]):
        np.testing.assert_array_equal(data[i], BANDS[band])


def test_constant_20m_band_stays_constant(stacks):
    for path in stacks.values():
        assert (read(path)[4] == 2500).all()


def test_nearest_puts_each_20m_value_on_its_four_10m_pixels(stacks):
    np.testing.assert_array_equal(read(stacks["nearest"])[5], np.kron(BANDS["B12"], np.ones((2, 2), np.uint16)))


def test_bilinear_interpolates_between_neighbouring_20m_pixels(stacks):
    out = read(stacks["bilinear"])[5].astype(float)
    b12 = BANDS["B12"].astype(float)
    m = upsample_matrix(SIZE // 2)
    assert np.abs(out - m @ b12 @ m.T).max() <= 0.5          # exact up to rounding to integer DN
    rows = np.clip((np.arange(SIZE)[:, None] - 1) // 2 + np.array([0, 1]), 0, SIZE // 2 - 1)  # 2 neighbours
    for r in range(SIZE):
        for c in range(SIZE):
            block = b12[np.ix_(rows[r], rows[c])]
            assert block.min() - 0.5 <= out[r, c] <= block.max() + 0.5
    assert not np.array_equal(out, read(stacks["nearest"])[5])


def test_stack_reads_as_sentinel2_input_with_the_product_offset(stacks):
    source = RasterInput(stacks["bilinear"], recipe=RECIPE_V1)   # B12 is found too
    assert (source.plan.kind, source.plan.band_indexes) == ("sentinel2", [1, 2, 3, 4, 5, 6])
    assert (source.plan.offset, source.plan.scale, source.plan.zero_is_nodata) == (-1000.0, 1e-4, True)
    assert "offset from product metadata" in source.plan.describe()


def test_flat_folder_without_metadata_stores_no_offset(tmp_path):
    folder = make_flat(tmp_path / "flat")
    result = stack.build_stack(folder, tmp_path / "stack.tif", resampling="nearest")
    with rasterio.open(result.path) as ds:
        assert "BOA_ADD_OFFSET" not in ds.tags() and ds.tags()["SOURCE_PRODUCT"] == "flat"
    np.testing.assert_array_equal(read(result.path)[0], BANDS["B2"])
    assert "no product metadata" in result.product.describe()
    assert "need offset -1000" in RasterInput(result.path).plan.describe()


def test_clip_to_extent_snaps_outwards_to_the_10m_grid(safe, tmp_path):
    x0, y0 = ORIGIN
    bounds = (x0 + 103, y0 - 251, x0 + 251, y0 - 97)        # -> columns 10..25, rows 9..25
    path = stack.build_stack(safe, tmp_path / "clip.tif", bounds=bounds).path
    with rasterio.open(path) as ds:
        assert ds.transform == from_origin(x0 + 100, y0 - 90, 10, 10)
        assert (ds.width, ds.height) == (16, 17)
        data = ds.read()
    np.testing.assert_array_equal(data[2], BANDS["B4"][9:26, 10:26])
    assert (data[4] == 2500).all()
    with pytest.raises(ValueError, match="does not overlap the raster"):
        stack.build_stack(safe, tmp_path / "off.tif", bounds=(0, 0, 10, 10))
    assert not (tmp_path / "off.tif").exists()


def test_clip_to_polygon_sets_outside_pixels_to_nodata(safe, tmp_path):
    x0, y0 = ORIGIN
    triangle = {"type": "Polygon", "coordinates": [[(x0 + 52, y0 - 48), (x0 + 348, y0 - 61),
                                                     (x0 + 123, y0 - 377), (x0 + 52, y0 - 48)]]}
    path = stack.build_stack(safe, tmp_path / "poly.tif", polygon_geojson=triangle).path
    with rasterio.open(path) as ds:
        data, transform = ds.read(), ds.transform
    assert (transform.c, transform.f) == (x0 + 50, y0 - 40)         # bounding pixels of the triangle
    assert data.shape[1:] == (34, 30)
    shape = ogr.CreateGeometryFromJson(json.dumps(triangle))
    inside = np.zeros(data.shape[1:], bool)
    for r in range(data.shape[1]):
        for c in range(data.shape[2]):
            x, y = apply(transform, c + 0.5, r + 0.5)
            inside[r, c] = shape.Contains(ogr.CreateGeometryFromWkt(f"POINT ({x} {y})"))
    assert 100 < inside.sum() < inside.size
    assert (data[:, ~inside] == 0).all()
    np.testing.assert_array_equal(data[0][inside], BANDS["B2"][4:38, 5:35][inside])


def test_cancel_leaves_no_output(safe, tmp_path):
    class Cancel(reporting.Reporter):
        def cancelled(self):
            return True

    with pytest.raises(reporting.Cancelled):
        stack.build_stack(safe, tmp_path / "stack.tif", reporter=Cancel())
    assert list(tmp_path.iterdir()) == []


# --- the channel export ------------------------------------------------------------------
def test_export_channels_matches_the_recipe(safe, tmp_path, monkeypatch):
    x0, y0 = ORIGIN
    square = {"type": "Polygon", "coordinates": [[(x0, y0), (x0 + 300, y0), (x0 + 300, y0 - 400), (x0, y0 - 400),
                                                   (x0, y0)], [(x0 + 100, y0 - 100), (x0 + 200, y0 - 100),
                                                               (x0 + 200, y0 - 200), (x0 + 100, y0 - 200),
                                                               (x0 + 100, y0 - 100)]]}
    stacked = stack.build_stack(safe, tmp_path / "stack.tif", polygon_geojson=square).path
    monkeypatch.setattr(stack, "EXPORT_BLOCK", 16)            # several strips, ragged edges
    pca = RECIPE_V1.default_pca()
    out = stack.export_channels(stacked, tmp_path / "channels.tif", pca)
    with rasterio.open(out) as ds:
        assert (ds.count, ds.dtypes[0], ds.descriptions) == (11, "float32", tuple(CHANNEL_NAMES))
        assert np.isnan(ds.nodata) and ds.transform == from_origin(*ORIGIN, 10, 10)
        got = ds.read()
    dn = read(stacked).astype(np.float32)
    want = compute_channels(torch.from_numpy((dn[None] - 1000) / 10000), pca)[0].numpy()
    hole = (dn == 0).all(axis=0)
    assert hole.sum() == 100 and np.isnan(got[:, hole]).all()
    np.testing.assert_allclose(got[:, ~hole], want[:, ~hole], rtol=1e-6, atol=1e-6)


def test_export_refuses_an_eleven_channel_stack(tmp_path):
    from helpers import write_raster
    src = write_raster(tmp_path / "stack11.tif", np.zeros((11, 4, 4), np.float32), CHANNEL_NAMES)
    with pytest.raises(ValueError, match="already an 11-channel ME-Net stack"):
        stack.export_channels(src, tmp_path / "out.tif", RECIPE_V1.default_pca())


# --- inside QGIS ----------------------------------------------------------------------------
@pytest.fixture
def processing(menet_provider):
    import processing as qgis_processing
    return qgis_processing


def initialised(algorithm_class):
    algorithm = algorithm_class()
    algorithm.initAlgorithm()
    return algorithm


@pytest.mark.integration
def test_prepare_and_export_through_processing(processing, safe, untrained_path, tmp_path):
    from qgis.core import QgsFeature, QgsGeometry, QgsProcessingException, QgsVectorLayer

    from menet_qgis.processing.export_channels import ExportChannelsAlgorithm
    from menet_qgis.processing.prepare_sentinel2 import PrepareSentinel2Algorithm

    assert "-1000" in PrepareSentinel2Algorithm().shortHelpString()
    assert "<b>ndvi</b> = (B8 - B4) / (B8 + B4)" in ExportChannelsAlgorithm().shortHelpString()
    x0, y0 = ORIGIN
    layer = QgsVectorLayer("Polygon?crs=EPSG:4326", "clip", "memory")
    halves = [{"type": "Polygon", "coordinates": [ring]} for ring in (
        [(x0 + 50, y0 - 50), (x0 + 250, y0 - 50), (x0 + 250, y0 - 150), (x0 + 50, y0 - 150), (x0 + 50, y0 - 50)],
        [(x0 + 50, y0 - 150), (x0 + 150, y0 - 150), (x0 + 150, y0 - 350), (x0 + 50, y0 - 350), (x0 + 50, y0 - 150)])]
    features = []
    for half in halves:                                    # the L in two parts, in lon/lat: dissolved and reprojected
        feature = QgsFeature()
        feature.setGeometry(QgsGeometry.fromWkt(ogr.CreateGeometryFromJson(
            json.dumps(transform_geom(UTM17S, "EPSG:4326", half, precision=12))).ExportToWkt()))
        features.append(feature)
    layer.dataProvider().addFeatures(features)
    result = processing.run(initialised(PrepareSentinel2Algorithm), {
        "INPUT_FOLDER": str(safe), "CLIP_LAYER": layer, "RESAMPLING": 1, "OUTPUT": str(tmp_path / "stack.tif")})
    with rasterio.open(result["OUTPUT"]) as ds:
        assert ds.transform == from_origin(x0 + 50, y0 - 50, 10, 10) and (ds.width, ds.height) == (20, 30)
        assert ds.descriptions == tuple(SOURCE_BANDS) and ds.tags()["BOA_ADD_OFFSET"] == "-1000"
        data = ds.read()
    inside = np.zeros((30, 20), bool)
    inside[:10, :] = inside[:, :10] = True
    np.testing.assert_array_equal(data[3][inside], BANDS["B8"][5:35, 5:25][inside])
    assert (data[:, ~inside] == 0).all()

    extent = f"{x0 + 100},{x0 + 200},{y0 - 200},{y0 - 100} [{UTM17S}]"
    clipped = processing.run(initialised(PrepareSentinel2Algorithm), {
        "INPUT_FOLDER": str(safe), "EXTENT": extent, "OUTPUT": str(tmp_path / "extent.tif")})
    np.testing.assert_array_equal(read(clipped["OUTPUT"])[1], BANDS["B3"][10:20, 10:20])

    channels = processing.run(initialised(ExportChannelsAlgorithm), {
        "INPUT": result["OUTPUT"], "MODEL": str(untrained_path), "OUTPUT": str(tmp_path / "channels.tif")})
    with rasterio.open(channels["OUTPUT"]) as ds:
        assert ds.descriptions == tuple(DEFAULT_RECIPE.channel_names) and ds.shape == (30, 20)  # the model's recipe
        assert np.isnan(ds.read(1)[~inside]).all() and np.isfinite(ds.read(1)[inside]).all()

    empty = tmp_path / "empty"
    shutil.copytree(safe, empty / safe.name)
    next((empty / safe.name).rglob(f"*_B08_10m{EXT}")).unlink()
    with pytest.raises(QgsProcessingException, match="no B8 band file"):
        processing.run(initialised(PrepareSentinel2Algorithm), {
            "INPUT_FOLDER": str(empty), "OUTPUT": str(tmp_path / "none.tif")})
    assert not (tmp_path / "none.tif").exists()


@pytest.mark.integration
def test_cli_prepare_then_predict_on_the_stack(safe, untrained_path, tmp_path):
    """Product folder -> stack -> probability, all from the command line."""
    import json
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    run = lambda *a: subprocess.run([sys.executable, "-m", "menet_qgis", *map(str, a)], cwd=root,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    prep = run("prepare", safe, tmp_path / "stack.tif")
    assert prep.returncode == 0, prep.stderr
    assert json.loads(prep.stdout)["stack"] == str(tmp_path / "stack.tif")
    pred = run("predict", tmp_path / "stack.tif", "--model", untrained_path, "--out-dir", tmp_path, "--window", 64, "--overlap", 32,
               "--quiet")
    assert pred.returncode == 0, pred.stderr
    assert (tmp_path / "stack_probability.tif").is_file()


# --- products as delivered (issue 27): open_product, product_vrt, subdataset names ----------------------------
def _product(tmp_path, **kw):
    from helpers import s2_reflectance, write_l2a_product
    return write_l2a_product(tmp_path, s2_reflectance(64, 64, seed=3), **kw)


def test_product_vrt_holds_the_stacks_values_and_offset(tmp_path):
    """product_vrt's B11/B12 (GDAL's VRT bilinear resampling) equal build_stack's (GDAL's warper) DN for DN;
    RasterInput reads its offset from the tags."""
    product = sentinel2_product.open_product(_product(tmp_path, zip=True))
    vrt = sentinel2_product.product_vrt(product, tmp_path / "p.vrt")
    stacked = stack.build_stack(product.source, tmp_path / "s.tif").path
    np.testing.assert_array_equal(read(vrt), read(stacked))
    source = RasterInput(vrt)
    try:
        assert source.plan.offset == -1000 and source.product is None
    finally:
        source.close()


@pytest.mark.parametrize("form", ["plain", "quoted", "no_epsg", "tci"])
def test_subdataset_names_lead_to_the_product(tmp_path, form):
    safe = _product(tmp_path)
    xml = safe / "MTD_MSIL2A.xml"
    name = {"plain": f"SENTINEL2_L2A:{xml}:10m:EPSG_32717", "quoted": f'SENTINEL2_L2A:"{xml}":20m:EPSG_32717',
            "no_epsg": f"SENTINEL2_L2A:{xml}:60m", "tci": f"SENTINEL2_L2A:{xml}:TCI:EPSG_32717"}[form]
    product = sentinel2_product.open_product(name)
    assert Path(product.band_files["B11"]).name.endswith("_B11_20m.jp2") and product.level == "L2A"
    from menet_qgis.core.io.raster_io import input_stem
    assert input_stem(name) == safe.name[:-len(".SAFE")]


def test_what_is_not_one_product_is_refused(tmp_path):
    import zipfile
    first, second = _product(tmp_path / "a", date="2020-01-01T10:00:00"), _product(tmp_path / "b")
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        for safe in (first, second):
            for path in safe.rglob("*"):
                zf.write(path, path.relative_to(safe.parent).as_posix())
    with pytest.raises(ValueError, match="holds several products"):
        sentinel2_product.open_product(two)
    inner = f"/vsizip/{two}/{second.name}/MTD_MSIL2A.xml"  # naming one of them works
    assert sentinel2_product.open_product(inner).date == "2020-06-15"
    with pytest.raises(ValueError, match="Level-1B"):
        sentinel2_product.open_product(f"SENTINEL2_L1B:{first}/MTD_SAFL1B.xml:10m")
    with pytest.raises(ValueError, match="not found"):
        sentinel2_product.open_product(tmp_path / "missing.SAFE.zip")
