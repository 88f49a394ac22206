"""Fault cases of the input raster (issue 26, items 8-10): DN offsets, undeclared fill values, thin rasters,
coarse pixels and small extents.

Each refusal is checked as a user sees it: the one error line and exit status 2 of ``python -m menet_qgis
predict``, a previous output at the target byte-identical afterwards, and no partial file left.  The
extent cases check the property a user expects: an extent maps exactly as the same pixels in a run over
the whole raster.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from helpers import S2_NAMES, cli_process, read, s2_reflectance, write_raster
from menet_qgis import jobs, options
from menet_qgis.core import files
from menet_qgis.core.inference import engine
from menet_qgis.core.io import raster_io
from menet_qgis.core.io.sentinel2_product import read_metadata

WINDOW = ("--window", 64, "--overlap", 32)


def error_line(proc) -> str:
    """The one error line; fails when the CLI printed a traceback instead."""
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith("menet_qgis: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


def refused(cli, src: Path, model: Path, tmp_path: Path, *extra) -> str:
    """Run predict on ``src`` over a previous output; assert the refusal left it alone; the error line."""
    out = tmp_path / "out"
    target = out / f"{src.stem}_probability.tif"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"previous output, must survive\n")
    before = src.read_bytes()
    proc = cli("predict", src, "--model", model, "--out-dir", out, *WINDOW, *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert target.read_bytes() == b"previous output, must survive\n"
    assert src.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [target.name]  # no partial file
    return error_line(proc)[len("menet_qgis: error: "):]


def dn_raster(path, height=64, width=64, tags=None, nodata=None, fill=None, fill_rows=0) -> Path:
    dn = (s2_reflectance(height, width) * 10000).astype(np.uint16)
    if fill is not None:
        dn[:, :fill_rows] = fill
    return write_raster(path, dn, S2_NAMES, tags=tags, nodata=nodata)


# --- 8. DN offsets: finite and plausible, from the option or the metadata ---------------------------------
@pytest.mark.parametrize("value, expected", [
    ("nan", "the DN offset 'nan' from the metadata of dn.tif (BOA_ADD_OFFSET) is not a number; Sentinel-2 "
            "products use -1000 (processing baseline 04.00 and later) or 0 (before): correct the tag, e.g. "
            "gdal_edit.py -mo BOA_ADD_OFFSET=-1000 dn.tif"),
    ("abc", "the DN offset 'abc' from the metadata of dn.tif (BOA_ADD_OFFSET) is not a number;"),
    ("inf", "the DN offset 'inf' from the metadata of dn.tif (BOA_ADD_OFFSET) is not a number;"),
    ("-1e9", "the DN offset -1e+09 from the metadata of dn.tif (BOA_ADD_OFFSET) is not a Sentinel-2 offset "
             "(accepted: -2000 to 2000; products use -1000 from processing baseline 04.00, 0 before): correct "
             "the tag, e.g. gdal_edit.py -mo BOA_ADD_OFFSET=-1000 dn.tif"),
])
def test_a_bad_offset_in_the_metadata_is_refused_naming_its_source(cli, untrained_path, tmp_path, value, expected):
    src = dn_raster(tmp_path / "dn.tif", tags={"BOA_ADD_OFFSET": value})
    assert refused(cli, src, untrained_path, tmp_path).startswith(expected)


@pytest.mark.parametrize("value, expected", [
    ("nan", "argument --dn-offset: must be a finite number, got 'nan'"),
    ("inf", "argument --dn-offset: must be a finite number, got 'inf'"),
    ("-1e9", "argument --dn-offset: must be from -2000 to 2000, got -1e9"),
])
def test_a_bad_dn_offset_option_is_refused_by_the_command_line(untrained_path, tmp_path, value, expected):
    src = dn_raster(tmp_path / "dn.tif")
    proc = cli_process("predict", src, "--model", untrained_path, "--out-dir", tmp_path / "out",
                       f"--dn-offset={value}")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].endswith(expected), proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
@pytest.mark.parametrize("value, expected", [
    (float("nan"), "dn_offset must be a finite number, got nan"),
    (float("-inf"), "dn_offset must be a finite number, got -inf"),
    ("inf", "dn_offset must be a finite number, got 'inf'"),
    (-1e9, "dn_offset must be from -2000 to 2000, got -1e+09"),
])
def test_a_bad_dn_offset_in_a_job_is_refused(tmp_path, value, expected):
    """The engine process, batch and the Processing algorithms send jobs as dicts through jobs.from_dict."""
    with pytest.raises(ValueError) as err:
        jobs.ExtractJob.from_dict({"input": "in.tif", "output": "out.tif", "dn_offset": value})
    assert str(err.value) == expected


@pytest.mark.unit
def test_a_bad_offset_option_reaching_the_core_is_refused(tmp_path):
    """Callers of the core that bypass the options (batch CSV rows, scripts) meet the same check."""
    src = dn_raster(tmp_path / "dn.tif")
    with pytest.raises(ValueError, match=r"^the DN offset 'nan' from the DN offset option is not a number;"):
        raster_io.RasterInput(src, dn_offset=float("nan"))
    assert raster_io.RasterInput(src, dn_offset=-1000).plan.offset == -1000


@pytest.mark.unit
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_no_float_option_accepts_a_non_finite_value(text):
    """Every declared float option, on every front end: argparse's type and the jobs' check."""
    floats = [o for group in options.GROUPS.values() for o in group if o.kind in ("float", "float_list")]
    assert floats
    for option in floats:
        flags, kwargs = options.argument(option)
        with pytest.raises(argparse.ArgumentTypeError, match="finite number"):
            kwargs["type"](text if option.kind == "float" else f"1,{text}")
        with pytest.raises(ValueError, match="must be a (list of )?finite number"):
            option.check(float(text) if option.kind == "float" else [1.0, float(text)])


@pytest.mark.unit
@pytest.mark.parametrize("text, expected", [
    ("abc", "MTD_MSIL2A.xml (BOA_ADD_OFFSET of B2) is not a number; "),
    ("nan", "MTD_MSIL2A.xml (BOA_ADD_OFFSET of B2) is not a number; "),
    ("-100000", "the DN offset -100000 from MTD_MSIL2A.xml (BOA_ADD_OFFSET of B2) is not a Sentinel-2 offset"),
])
def test_a_bad_offset_in_the_product_metadata_is_refused(tmp_path, text, expected):
    offsets = "".join(f'<BOA_ADD_OFFSET band_id="{i}">{text}</BOA_ADD_OFFSET>' for i in range(13))
    xml = tmp_path / "MTD_MSIL2A.xml"
    xml.write_text(f"<root><PROCESSING_BASELINE>05.09</PROCESSING_BASELINE>{offsets}</root>")
    with pytest.raises(ValueError) as err:
        read_metadata(xml)
    assert expected in str(err.value) and "download the product again" in str(err.value)


# --- 9. undeclared fill values --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, fill", [("float32", -9999.0), ("uint16", 65535), ("int16", -32768)])
def test_an_undeclared_fill_value_is_refused_saying_how_to_declare_it(cli, untrained_path, tmp_path, dtype, fill):
    data = s2_reflectance(64, 64) * (1 if dtype == "float32" else 10000)
    data = data.astype(dtype)
    data[:, :25] = fill  # 39 % of the rows
    src = write_raster(tmp_path / "filled.tif", data, S2_NAMES, tags={"BOA_ADD_OFFSET": "0"})
    message = refused(cli, src, untrained_path, tmp_path, "--quiet")
    assert message == (f"filled.tif holds {fill:g} in every band of 39.1% of the sampled pixels (4096 valid pixels in "
                       f"1 window sampled across it): a no-data value the raster does not declare, read as data it "
                       f"changes the map of the pixels around it. Declare it, e.g. gdal_translate -of VRT -a_nodata "
                       f"{fill:g} filled.tif filled_nodata.vrt (or gdal_edit.py -a_nodata {fill:g} filled.tif), and "
                       f"map that")


def test_a_declared_fill_value_maps_like_nan_no_data(bundle, tmp_path):
    """Declared, the fill is no data: the valid pixels get exactly the probabilities they get when the same
    pixels are NaN no-data."""
    data = s2_reflectance(96, 96)
    data[:, :37] = -9999.0
    declared = write_raster(tmp_path / "declared.tif", data, S2_NAMES, nodata=-9999.0)
    data[:, :37] = np.nan
    as_nan = write_raster(tmp_path / "nan.tif", data, S2_NAMES, nodata=float("nan"))
    opts = engine.EngineOptions(window=64, overlap=32, batch_size=1)
    a = read(engine.extract(bundle, raster_io.RasterInput(declared), tmp_path / "a.tif", opts).probability)
    b = read(engine.extract(bundle, raster_io.RasterInput(as_nan), tmp_path / "b.tif", opts).probability)
    assert np.isnan(a[:, :37]).all() and np.isfinite(a[:, 37:]).all()
    np.testing.assert_array_equal(a, b)


# --- 10. thin rasters, coarse pixels, small extents -----------------------------------------------------
@pytest.mark.parametrize("height, width", [(1, 64), (64, 15)])
def test_a_raster_too_thin_to_map_is_refused(cli, untrained_path, tmp_path, height, width):
    src = write_raster(tmp_path / "thin.tif", s2_reflectance(height, width), S2_NAMES)
    assert refused(cli, src, untrained_path, tmp_path) == (
        f"thin.tif is {width} x {height} px, too thin to map: the model needs at least 16 px each way for the "
        "context around each pixel; map the raster it was cut from (in QGIS with this area as the processing "
        "extent) and clip the map")


@pytest.mark.parametrize("crs, pixel, expected", [
    ("EPSG:32717", 30.0, "coarse.tif has pixels of 30 x 30 m, coarser than the 20 m the model can map (it learned "
                         "Sentinel-2's 10 m pixels): resample it to 10 m first, e.g. gdalwarp -tr 10 10 -r bilinear "
                         "coarse.tif coarse_10m.tif"),
    ("EPSG:4326", 0.0009, "coarse.tif has pixels of 99.9 x 100 m (0.0009° x 0.0009° at its latitude), coarser "
                          "than the 20 m the model can map (it learned Sentinel-2's 10 m pixels): resample it to "
                          "10 m first, e.g. gdalwarp -t_srs EPSG:32717 -tr 10 10 -r bilinear coarse.tif "
                          "coarse_10m.tif"),
    ("EPSG:2227", 100.0, "coarse.tif has pixels of 30.5 x 30.5 m, coarser than the 20 m the model can map (it "
                         "learned Sentinel-2's 10 m pixels): resample it to 10 m first, e.g. gdalwarp -tr 32.8083 "
                         "32.8083 -r bilinear coarse.tif coarse_10m.tif"),   # US survey feet
])
def test_pixels_coarser_than_20_m_are_refused(cli, untrained_path, tmp_path, crs, pixel, expected):
    origin = (-79.9, -3.2) if crs == "EPSG:4326" else (600000.0, 9700000.0)
    src = write_raster(tmp_path / "coarse.tif", s2_reflectance(32, 32), S2_NAMES, crs=crs,
                       transform=from_origin(*origin, pixel, pixel))
    assert refused(cli, src, untrained_path, tmp_path) == expected


def test_pixels_of_20_m_are_mapped_with_a_warning(cli, untrained_path, tmp_path):
    src = write_raster(tmp_path / "r20m.tif", s2_reflectance(32, 32), S2_NAMES,
                       transform=from_origin(600000.0, 9700000.0, 20, 20))
    proc = cli("predict", src, "--model", untrained_path, "--out-dir", tmp_path / "out", *WINDOW, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert ("warning: r20m.tif has pixels of 20 x 20 m; the model learned Sentinel-2's 10 m pixels and maps coarser "
            "ones less reliably: for the best map resample it to 10 m, e.g. gdalwarp -tr 10 10 -r bilinear r20m.tif "
            "r20m_10m.tif") in proc.stderr.splitlines()


@pytest.mark.parametrize("rows, cols", [((70, 72), (0, 160)), ((0, 5), (150, 160)), ((90, 130), (33, 97)),
                                        ((0, 130), (0, 160))])
def test_an_extent_maps_as_the_same_pixels_of_the_whole_raster(bundle, tmp_path, rows, cols):
    """A 2-row extent, a corner, an extent inside, the whole raster: the probability (and the stage layer,
    on the whole raster's stage grid) equals the whole-raster run's on those pixels."""
    src = write_raster(tmp_path / "in.tif", s2_reflectance(130, 160, seed=3), S2_NAMES)
    opts = engine.EngineOptions(window=64, overlap=32, batch_size=1, stages=["stage3"])
    whole = engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "whole.tif", opts)
    with rasterio.open(src) as ds:
        t = ds.transform
    bounds = (t.c + 10 * cols[0], t.f - 10 * rows[1], t.c + 10 * cols[1], t.f - 10 * rows[0])
    part = engine.extract(bundle, raster_io.RasterInput(src, bounds=bounds), tmp_path / "part.tif", opts)
    np.testing.assert_array_equal(read(part.probability), read(whole.probability)[:, rows[0]:rows[1], cols[0]:cols[1]])
    with rasterio.open(part.probability) as ds:
        assert (ds.transform.c, ds.transform.f) == (t.c + 10 * cols[0], t.f - 10 * rows[0])
    with rasterio.open(part.stages["stage3"]) as ds, rasterio.open(whole.stages["stage3"]) as ws:
        row, col = ws.index(ds.transform.c + 1, ds.transform.f - 1)   # the whole raster's stage pixel there
        assert (ds.transform.a, ws.xy(row, col, offset="ul")) == (80.0, (ds.transform.c, ds.transform.f))
        np.testing.assert_array_equal(ds.read(), ws.read()[:, row:row + ds.height, col:col + ds.width])
        assert ds.height * 8 >= rows[1] - rows[0] and ds.width * 8 >= cols[1] - cols[0]


@pytest.mark.unit
def test_an_extent_of_non_finite_numbers_is_refused(tmp_path):
    src = write_raster(tmp_path / "in.tif", s2_reflectance(32, 32), S2_NAMES)
    with pytest.raises(files.InputError) as err:
        raster_io.RasterInput(src, bounds=(600000.0, float("nan"), 600100.0, 9700000.0))
    assert str(err.value) == "the processing extent (600000.0, nan, 600100.0, 9700000.0) is not four finite numbers " \
                             "(xmin, ymin, xmax, ymax)"
