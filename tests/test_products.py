"""Sentinel-2 products as users have them (issue 27, item 1): the .SAFE folder, its .zip read in place, its
MTD_MSIL*.xml, and GDAL's SENTINEL2 subdatasets (the 10 m one QGIS opens lacks B11) map like the 6-band stack
Prepare writes, with the product's DN offset and SCL found by the engine.  Products are written in ESA's layout
from real pixels of the Jambelí 2020 scene (``helpers.write_l2a_product``)."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from helpers import ROOT, SCENE, cli_process, read, run_in_fresh_qgis, write_l1c_product, write_l2a_product

pytestmark = [pytest.mark.skipif(not SCENE.is_file(), reason=f"the real Jambelí scene is not at {SCENE}"),
              # the product's MTD_MSIL2A.xml itself is a dataset without a grid: only its subdatasets have one
              pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")]

MODEL = ROOT / "resources" / "models" / "menet_coasts_v2.pt"
#: A 256 x 256 crop of the scene: mangrove, channels and ponds, no no-data.
ROW, COL, SIZE = 1536, 1920, 256


@pytest.fixture(scope="module")
def pixels():
    """(6, 256, 256) reflectance B2, B3, B4, B8, B11, B12 of the real crop, its transform and CRS."""
    with rasterio.open(SCENE) as src:
        win = Window(COL, ROW, SIZE, SIZE)
        data = src.read(window=win)
        assert np.isfinite(data).all()
        return data, src.window_transform(win), src.crs


@pytest.fixture(scope="module")
def products(tmp_path_factory, pixels):
    """One product per form a user has, each under its own name (date), from the same pixels."""
    data, transform, crs = pixels
    folder = tmp_path_factory.mktemp("products")
    made = {}
    for form, day in (("safe", "01"), ("zip", "02"), ("xml", "03"), ("subdataset", "04"), ("zip_subdataset", "05")):
        made[form] = write_l2a_product(folder / form, data, transform=transform, crs=crs,
                                       date=f"2020-06-{day}T15:36:21", zip=form.startswith("zip"))
    made["xml"] = made["xml"] / "MTD_MSIL2A.xml"
    with rasterio.open(made["subdataset"] / "MTD_MSIL2A.xml") as ds:
        made["subdataset"] = next(s for s in ds.subdatasets if ":10m:" in s)
    with rasterio.open(made["zip_subdataset"]) as ds:  # GDAL's SENTINEL2 driver opens the zip itself
        made["zip_subdataset"] = next(s for s in ds.subdatasets if ":20m:" in s)
    return made


def test_gdal_lists_the_written_product(products):
    """The helper writes what GDAL's SENTINEL2 driver reads: four subdatasets, the 10 m one B2-B8 (GDAL >= 3.7
    lists AOT and WVP there too, which the helper does not write: 6 bands, two it skips with a warning)."""
    with rasterio.open(products["subdataset"]) as ten:
        assert ten.count in (4, 6) and ten.res == (10.0, 10.0)
    assert products["subdataset"].startswith("SENTINEL2_L2A:") and products["subdataset"].endswith(":10m:EPSG_32717")
    assert "/vsizip/" in products["zip_subdataset"]


def test_every_form_opens_as_the_same_product(products, pixels):
    from menet_qgis.core.io.sentinel2_product import ProductReader, open_product
    data, transform, _ = pixels
    expected_dn = np.round(data[:4] * 10000) + 1000
    for form, name in products.items():
        product = open_product(name)
        assert product.level == "L2A" and product.offset == -1000 and product.offset_key == "BOA_ADD_OFFSET", form
        assert product.scl and product.scl.endswith("_SCL_20m.jp2"), form
        assert product.date.startswith("2020-06-"), form
        with ProductReader(product) as reader:
            assert reader.transform == transform and (reader.width, reader.height) == (SIZE, SIZE)
            bands = reader.read()
            np.testing.assert_array_equal(bands[:4], expected_dn, err_msg=form)
            assert bands[4:].min() > 0, form  # B11/B12 found at 20 m, resampled onto the 10 m grid
            assert set(np.unique(reader.read_scl())) == {4}
    assert str(open_product(products["zip"]).band_files["B11"]).startswith("/vsizip/")  # read in place


def test_prepare_takes_the_same_inputs(products, tmp_path):
    """build_stack (Prepare) writes the same stack from the folder, the zip, the xml and a subdataset."""
    from menet_qgis.core.io.stack import build_stack
    stacks = {form: read(build_stack(name, tmp_path / f"{form}.tif").path) for form, name in products.items()}
    for form, stack in stacks.items():
        np.testing.assert_array_equal(stack, stacks["safe"], err_msg=form)
    with rasterio.open(tmp_path / "zip.tif") as ds:
        assert ds.tags()["BOA_ADD_OFFSET"] == "-1000" and ds.descriptions == ("B2", "B3", "B4", "B8", "B11", "B12")


@pytest.fixture(scope="module")
def maps(products, tmp_path_factory):
    """CLI predict with the default model over the Prepare stack and every form of the product, in one run."""
    from menet_qgis.core.io.stack import build_stack
    work = tmp_path_factory.mktemp("maps")
    stack = build_stack(products["safe"], work / "stack.tif").path
    out = work / "maps"
    proc = cli_process("predict", "--model", MODEL, "--out-dir", out, "--cloud-mask", "off", "--quiet", stack,
                       *products.values(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_predict_maps_products_as_the_stack(products, maps):
    """Each form of the product gives exactly the probability of its Prepare stack."""
    reference = read(maps / "stack_probability.tif")[0]
    assert np.isfinite(reference).all() and 0.05 < (reference > 0.5).mean() < 0.95
    found = sorted(maps.glob("S2B_MSIL2A_*_probability.tif"))
    assert len(found) == len(products)
    for path in found:  # named after the product, whichever form was given
        np.testing.assert_array_equal(read(path)[0], reference, err_msg=path.name)


def test_qgis_extract_on_the_10m_subdataset(qgis_env, products, maps, tmp_path):
    """In QGIS, Extract on the 10 m subdataset layer (what QGIS opens for the product: B2, B3, B4, B8, no
    B11) maps the product: the map is the stack's."""
    out = tmp_path / "prob.tif"
    report = run_in_fresh_qgis(tmp_path / "extract_subdataset.py", f"""\
        from qgis.core import QgsRasterLayer
        layer = QgsRasterLayer({products["subdataset"]!r}, "10m", "gdal")
        assert layer.isValid() and layer.bandCount() in (4, 6)  # GDAL >= 3.7 adds AOT and WVP
        result = processing.run("menet:extractmangroves", {{"INPUT": layer, "MODEL": {str(MODEL)!r},
                                "OUTPUT": {str(out)!r}}})
        print(json.dumps({{"output": result["OUTPUT"]}}))
        """, qgis_env)
    assert report["output"] == str(out)
    np.testing.assert_array_equal(read(out)[0], read(maps / "stack_probability.tif")[0])


def test_the_10m_subdataset_brings_its_scl(pixels, tmp_path):
    """Extract on the 10 m subdataset (what QGIS shows as the layer) masks what the product's SCL calls
    cloud, though that subdataset holds neither B11 nor the SCL."""
    data, transform, crs = pixels
    scl = np.full((SIZE // 2, SIZE // 2), 4, np.uint8)
    scl[:32, :64] = 9  # high-probability cloud over 64 x 128 px at 10 m
    safe = write_l2a_product(tmp_path, data, scl=scl, transform=transform, crs=crs)
    with rasterio.open(safe / "MTD_MSIL2A.xml") as ds:
        ten = next(s for s in ds.subdatasets if ":10m:" in s)
    proc = cli_process("predict", "--model", MODEL, "--out-dir", tmp_path / "maps", "--quiet", ten, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    prob = read(next((tmp_path / "maps").glob("*_probability.tif")))[0]
    assert np.isnan(prob[:64, :128]).all()
    assert np.isfinite(prob[64:]).all() and np.isfinite(prob[:, 128:]).all()


def test_what_cannot_be_mapped_is_refused_in_one_line(pixels, tmp_path):
    from menet_qgis.core.files import InputError
    from menet_qgis.core.io.raster_io import RasterInput
    data, transform, crs = pixels
    no_swir = write_l2a_product(tmp_path / "noswir", data, transform=transform, crs=crs,
                                bands=("B2", "B3", "B4", "B8"))
    with pytest.raises(InputError, match=r"no B11, B12 band file in .*MTD_MSIL2A|no B11, B12 band file"):
        RasterInput(no_swir / "MTD_MSIL2A.xml")
    empty = tmp_path / "S2B_MSIL2A_20200601T000000_N0509_R068_T17MPN_20200601T000000.SAFE.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "no product here")
    with pytest.raises(InputError, match="holds no Sentinel-2 product"):
        RasterInput(empty)
    (tmp_path / "broken.zip").write_bytes(b"not a zip at all")
    with pytest.raises(InputError, match="not a zip archive"):
        RasterInput(tmp_path / "broken.zip")
    proc = cli_process("predict", "--model", MODEL, "--out-dir", tmp_path / "maps", empty)
    assert proc.returncode != 0 and "holds no Sentinel-2 product" in proc.stderr
    assert len([line for line in proc.stderr.strip().splitlines() if line.strip()]) == 1, proc.stderr
    assert not (tmp_path / "maps").exists() or not any((tmp_path / "maps").iterdir())


def test_l1c_opens_without_scl(pixels, tmp_path):
    from menet_qgis.core.io.raster_io import RasterInput
    data, transform, crs = pixels
    l1c = write_l1c_product(tmp_path, data, transform=transform, crs=crs, zip=True)
    source = RasterInput(l1c)
    try:
        assert source.product.level == "L1C" and source.product.scl is None
        assert source.product.offset_key == "RADIO_ADD_OFFSET" and source.plan.offset == -1000
        assert "top-of-atmosphere" in source.product.describe()
    finally:
        source.close()


def test_products_open_without_torch(products):
    """The light engine (ONNX Runtime / OpenVINO, no torch) opens and reads products."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from menet_qgis.core.io.raster_io import RasterInput\n"
            f"s = RasterInput({str(products['zip_subdataset'])!r})\n"
            "d, v = s.read(0, 0, 64); assert v.all() and s.product.scl; print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_batch_maps_a_product_folder_and_a_zip_subdataset(products, maps, tmp_path):
    """``batch`` takes a .SAFE folder and a subdataset inside a zip: each mapped as its stack, named after the
    product, and skipped when run again (the product's files fingerprinted)."""
    args = ["batch", "--model", MODEL, "--out-dir", tmp_path / "out", "--workers", "1", "--no-progress",
            "--cloud-mask", "off", products["safe"], products["zip_subdataset"]]
    proc = cli_process(*args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = sorted((tmp_path / "out").glob("S2B_MSIL2A_*_probability.tif"))
    assert len(found) == 2
    for path in found:
        np.testing.assert_array_equal(read(path)[0], read(maps / "stack_probability.tif")[0], err_msg=path.name)
    again = cli_process(*args, timeout=900)
    assert again.returncode == 0 and "2 skipped" in again.stdout + again.stderr, again.stdout + again.stderr
