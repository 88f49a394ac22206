"""Windowed inference on real GeoTIFFs: georeferencing, nodata, edges, errors, cancel."""
import math

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from helpers import S2_NAMES, predict_reference, raster_profile, read, s2_reflectance, write_raster, write_s2
from menet_qgis.core import files
from menet_qgis.core import reporting
from menet_qgis.core.inference import engine, runtimes
from menet_qgis.core.io import raster_io
from menet_qgis.core.compat import compose
from menet_qgis.core.io.bands import BandError
from menet_qgis.core.model.channels import RECIPE_V1

SMALL = engine.EngineOptions(window=64, overlap=32)


def test_probability_on_exactly_the_input_grid(bundle, tmp_path):
    src = write_s2(tmp_path / "in.tif", 150, 210)
    result = engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "out" / "p.tif",
                            engine.EngineOptions(window=64, overlap=32, stages=["stage0", "stage3", "stage5"]))
    p_in, p_out = raster_profile(src), raster_profile(result.probability)
    for key in ("crs", "transform", "width", "height"):
        assert p_out[key] == p_in[key]
    assert p_out["dtype"] == "float32" and p_out["count"] == 1 and math.isnan(p_out["nodata"])
    prob = read(result.probability)[0]
    assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1
    for stage, stride in (("stage0", 2), ("stage3", 8), ("stage5", 32)):
        prof = raster_profile(result.stages[stage])
        assert prof["crs"] == p_in["crs"]
        assert prof["transform"] == compose(p_in["transform"], Affine.scale(stride))
        assert (prof["width"], prof["height"]) == (math.ceil(210 / stride), math.ceil(150 / stride))
        assert prof["count"] == 3


def test_nodata_stays_nodata_and_never_spreads(bundle, tmp_path):
    data = s2_reflectance(160, 160)
    data[:, 40:80, 50:90] = np.nan          # a NaN hole
    data[2, 100, 20] = np.nan               # one band missing at one pixel
    src = write_s2(tmp_path / "in.tif", 160, 160)
    with rasterio.open(src, "r+") as ds:
        ds.write(data)
    result = engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "p.tif", SMALL)
    prob = read(result.probability)[0]
    expected_nodata = ~np.isfinite(data).all(axis=0)
    assert np.array_equal(np.isnan(prob), expected_nodata)


def test_declared_nodata_value_is_honoured(bundle, tmp_path):
    data = (s2_reflectance(96, 96) * 10000).astype("uint16")
    data[:, :10, :] = 0
    data[:, 50, 50] = 65535
    src = write_raster(tmp_path / "dn.tif", data, S2_NAMES, nodata=65535)
    result = engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "p.tif", SMALL)
    prob = read(result.probability)[0]
    assert np.isnan(prob[:10]).all() and np.isnan(prob[50, 50])
    assert np.isfinite(prob[10:50]).all()


def test_raster_smaller_than_a_window_is_padded_and_cropped(bundle, tmp_path):
    src = write_s2(tmp_path / "tiny.tif", 37, 51)
    result = engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "p.tif", engine.EngineOptions())
    prob = read(result.probability)[0]
    assert prob.shape == (37, 51) and np.isfinite(prob).all()
    assert result.windows == 1


def test_engine_matches_the_simple_reference_path(bundle, tmp_path):
    data = s2_reflectance(150, 200, seed=3)
    data[:, :30, :40] = np.nan
    src = write_raster(tmp_path / "in.tif", data, S2_NAMES)
    result = engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "p.tif",
                            engine.EngineOptions(window=64, overlap=32, batch_size=3, readers=2))
    fast = read(result.probability)[0]
    ref = predict_reference(bundle, raster_io.RasterInput(src), window=64, overlap=32)
    assert np.array_equal(np.isnan(fast), np.isnan(ref))
    assert np.nanmax(np.abs(fast - ref)) < 1e-4


def test_all_nodata_window_rows_are_skipped_not_run(bundle, tmp_path):
    data = s2_reflectance(192, 64)
    data[:, 64:, :] = np.nan
    src = write_raster(tmp_path / "in.tif", data, S2_NAMES)
    result = engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "p.tif",
                            engine.EngineOptions(window=64, overlap=0))
    assert (result.windows, result.windows_run) == (3, 1)
    assert np.isnan(read(result.probability)[0][64:]).all()


def test_cancel_leaves_no_output_behind(bundle, tmp_path):
    src = write_s2(tmp_path / "in.tif", 200, 200)

    class CancelAfterFirst(reporting.Reporter):
        def __init__(self):
            self.calls = 0

        def progress(self, percent):
            self.calls += 1

        def cancelled(self):
            return self.calls >= 1

    out = tmp_path / "out"
    with pytest.raises(reporting.Cancelled):
        engine.extract(bundle, raster_io.RasterInput(src), out / "p.tif",
                       engine.EngineOptions(window=64, overlap=32, batch_size=1, stages=["stage2"]),
                       CancelAfterFirst())
    assert list(out.iterdir()) == []


def test_existing_output_survives_a_failed_run(bundle, tmp_path):
    src = write_s2(tmp_path / "in.tif", 64, 64)
    out = tmp_path / "p.tif"
    out.write_bytes(b"previous result")

    class Boom(reporting.Reporter):
        def cancelled(self):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        engine.extract(bundle, raster_io.RasterInput(src), out, SMALL, Boom())
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


@pytest.mark.unit
def test_wrong_band_count_lists_found_and_needed(tmp_path):
    src = write_raster(tmp_path / "rgb.tif", np.ones((3, 20, 20), "float32"), ["Red", "Green", "Blue"])
    with pytest.raises(BandError) as err:
        raster_io.RasterInput(src)
    text = str(err.value)
    assert "B8, B11 in" in text and "1:Red=B4" in text and "3-band" in text
    with pytest.raises(BandError, match="B8, B11, B12 in .*channel recipe menet-s2 v1"):
        raster_io.RasterInput(src, recipe=RECIPE_V1)


@pytest.mark.unit
def test_not_a_raster(tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not a raster")
    with pytest.raises(files.InputError, match="not a raster GDAL can read"):
        raster_io.RasterInput(bad)
    with pytest.raises(files.InputError, match="not found"):
        raster_io.RasterInput(tmp_path / "missing.tif")


@pytest.mark.unit
def test_raster_without_crs(tmp_path):
    src = write_raster(tmp_path / "nocrs.tif", s2_reflectance(20, 20), S2_NAMES, crs=None)
    with pytest.raises(files.InputError, match="no coordinate reference system"):
        raster_io.RasterInput(src)


@pytest.mark.unit
def test_extent_outside_the_raster_is_refused(tmp_path):
    src = write_s2(tmp_path / "in.tif", 50, 50)
    with pytest.raises(files.InputError, match="does not overlap"):
        raster_io.RasterInput(src, bounds=(0, 0, 10, 10))


def test_extent_crops_to_the_input_grid(bundle, tmp_path):
    src = write_s2(tmp_path / "in.tif", 100, 100)
    t = raster_profile(src)["transform"]
    bounds = (t.c + 205, t.f - 505, t.c + 612, t.f - 96)     # snapped outward to whole pixels
    result = engine.extract(bundle, raster_io.RasterInput(src, bounds=bounds), tmp_path / "p.tif", SMALL)
    prof = raster_profile(result.probability)
    assert prof["transform"] == compose(t, Affine.translation(20, 9))
    assert (prof["width"], prof["height"]) == (42, 42)


@pytest.mark.unit
def test_unwritable_output_refused_before_any_work(bundle, tmp_path):
    src = write_s2(tmp_path / "in.tif", 64, 64)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(files.InputError, match="cannot write output"):
        engine.extract(bundle, raster_io.RasterInput(src), blocker / "p.tif", SMALL)
    with pytest.raises(files.InputError, match="must be a GeoTIFF"):
        engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "p.png", SMALL)


def test_all_channels_stage_layer_has_every_channel(bundle, tmp_path):
    src = write_s2(tmp_path / "in.tif", 64, 64)
    result = engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "p.tif",
                            engine.EngineOptions(window=64, overlap=0, stages=["stage4"], stage_mode="all"))
    with rasterio.open(result.stages["stage4"]) as ds:
        assert (ds.count, ds.width, ds.height) == (1024, 4, 4)
        assert ds.descriptions[7] == "stage4 channel 7"


def test_out_of_memory_retries_smaller_batches_with_same_result(bundle, tmp_path, monkeypatch):
    """The CUDA fall-back path, exercised on the CPU: a forward of more than 2 windows 'runs out of memory'."""
    src = write_s2(tmp_path / "in.tif", 128, 192)
    opts = engine.EngineOptions(window=64, overlap=0, batch_size=6, runtime="torch")
    expected = read(engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "a.tif", opts).probability)
    real_forward = runtimes._forward

    def small_gpu(model, bundle_, plan, batch, *args):
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(model, bundle_, plan, batch, *args)

    monkeypatch.setattr(runtimes, "_forward", small_gpu)
    messages = []

    class Log(reporting.Reporter):
        def info(self, message):
            messages.append(message)

    result = engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "b.tif", opts, Log())
    assert np.allclose(read(result.probability), expected, atol=1e-4)   # batch size changes float summation order
    assert result.batch_size <= 2
    assert any("out of GPU memory at batch size 6; retrying with 3" in m for m in messages)


@pytest.mark.unit
def test_prepare_batch_runs_channels_on_the_tensor_device_and_zeroes_nodata(bundle):
    plan = raster_io.plan_input(S2_NAMES, [{}] * 6, {}, "float32", recipe=bundle.recipe)
    raw = torch.from_numpy(s2_reflectance(8, 8)[None, :5])   # B2..B11: recipe v2's bands
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    valid[0, 0, 0] = False
    x = runtimes.prepare_batch(raw, valid, bundle, plan)
    assert x.shape == (1, 11, 8, 8) and torch.isfinite(x).all()
    assert torch.count_nonzero(x[0, :, 0, 0]) == 0


def test_gpu_precision_path_on_cpu_matches_fp32(bundle, tmp_path):
    """bf16 autocast + channels_last (what CUDA runs) exercised on the CPU."""
    src = write_s2(tmp_path / "in.tif", 96, 96)
    fp32 = read(engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "a.tif",
                               engine.EngineOptions(window=64, overlap=32, precision="fp32",
                                                    runtime="torch")).probability)
    messages = []

    class Log(reporting.Reporter):
        def info(self, message):
            messages.append(message)

    bf16 = read(engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "b.tif",
                               engine.EngineOptions(window=64, overlap=32, precision="bf16", stages=["stage2"],
                                                    runtime="torch"),
                               Log()).probability)
    assert any("bf16 autocast, channels_last" in m for m in messages)
    # bf16 keeps ~3 significant digits; through 101 random-weight layers that is a few percent
    assert np.abs(bf16 - fp32).mean() < 0.02 and np.abs(bf16 - fp32).max() < 0.25


@pytest.mark.unit
@pytest.mark.parametrize("rows, expected", [
    ((0, 130), (0, 130)),        # the whole raster: its own context, the grid as before
    ((70, 72), (32, 128)),       # the windows at 32 and 64 (64 px, overlap 32) touch rows 70-71
    ((0, 5), (0, 64)),           # only the first window
    ((125, 130), (64, 130)),     # the last window runs past the edge, as in a whole-raster run
])
def test_an_extent_reads_the_whole_rasters_windows_that_touch_it(tmp_path, rows, expected):
    src = write_s2(tmp_path / "in.tif", 130, 40)
    t = raster_profile(src)["transform"]
    source = raster_io.RasterInput(src, bounds=(t.c, t.f - 10 * rows[1], t.c + 400, t.f - 10 * rows[0]))
    context = source.context_area(64, 32)
    assert (context.row_off, context.row_off + context.height) == expected
    assert (context.col_off, context.width) == (0, 40)
