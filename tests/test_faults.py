"""Fault injection: full disks, outputs over inputs, implausible inputs, broken files, killed runs.

Every case checks what a user would see and what is left on disk: the error
text, the exit status, that an output already at the target path is
byte-identical afterwards, and that no partial file remains.  Full disks are
real: a small tmpfs (or a loop-mounted ext2 image) mounted for the test and
unmounted after it; the tests run as root and skip, saying why, only where
nothing can be mounted.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.errors
import rasterio.shutil
import torch
from rasterio.transform import from_origin

from helpers import ROOT, S2_NAMES, cli_process, qgis_process, s2_reflectance, write_raster, write_s2
from menet_qgis.core import files
from menet_qgis.core.model import checkpoint
from menet_qgis.core.io import raster_io
from menet_qgis.core.training import data as training_data
from menet_qgis.core.training import train as training

S2_DN = dict(descriptions=S2_NAMES)


# cli_process (helpers.py) and the in-process ``cli`` fixture (conftest.py) are shared with the
# other fault-test files.


def cli_start(*args):
    return subprocess.Popen([sys.executable, "-m", "menet_qgis", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def error_line(proc) -> str:
    """The one error line; fails when the CLI printed a traceback or GDAL noise instead."""
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith("menet_qgis: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ERROR 1" not in proc.stderr
    return errors[0]


def partials(folder) -> list:
    return sorted(p.name for p in Path(folder).glob(".*.partial*")) + \
        sorted(p.name for p in Path(folder).glob(".*.best-so-far"))


def keep(path, content: bytes = b"previous output, must survive\n") -> bytes:
    """Put a pre-existing 'good' output at ``path``; returns its bytes to compare later."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(content)
    return content


def fill(folder, leave: int = 0) -> None:
    """Use up the free space of ``folder``'s file system (but ``leave`` bytes)."""
    free = shutil.disk_usage(folder).free
    with open(Path(folder) / "filler", "wb") as f:
        if free - leave > 0:
            os.posix_fallocate(f.fileno(), 0, free - leave)
    assert shutil.disk_usage(folder).free <= leave + 8192


@pytest.fixture
def small_fs(tmp_path):
    """Factory for a really small file system (tmpfs, else a loop-mounted ext2 image)."""
    mounts = []

    def make(size_kib: int = 2048) -> Path:
        where = tmp_path / f"smallfs{len(mounts)}"
        where.mkdir()
        tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)],
                               capture_output=True, text=True)
        if tmpfs.returncode != 0:
            image = tmp_path / f"smallfs{len(mounts)}.img"
            with open(image, "wb") as f:
                f.truncate(size_kib * 1024)
            subprocess.run(["mkfs.ext2", "-q", "-F", "-m", "0", str(image)], capture_output=True)
            loop = subprocess.run(["mount", "-o", "loop", str(image), str(where)], capture_output=True, text=True)
            if loop.returncode != 0:
                pytest.skip("cannot mount a small file system here (tmpfs: " + tmpfs.stderr.strip()
                            + "; loop: " + loop.stderr.strip() + "): disk-full cases need root and mount rights")
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def scene_s2(tmp_path) -> Path:
    """A small plausible reflectance raster (4 x 3 windows of 64 px)."""
    return write_s2(tmp_path / "in" / "scene.tif", 192, 256)


def wait_for_partial(proc, folder, timeout=120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if list(Path(folder).glob(".*.partial.tif")):
            return
        if proc.poll() is not None:
            raise AssertionError("the run ended before writing: " + proc.stderr.read()[-2000:])
        time.sleep(0.02)
    raise AssertionError("no partial output appeared")


def make_tiles(folder, masks, size=64) -> Path:
    """Image/mask pairs, one per 4 km column (so the location split has places to choose)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(masks):
        t = from_origin(600000 + 4000 * i, 9700000, 10, 10)
        write_raster(folder / f"tile_{i:04d}.tif", s2_reflectance(size, size, seed=i), S2_NAMES, transform=t)
        write_raster(folder / f"mask_{i:04d}.tif", mask[None], transform=t, nodata=mask_nodata(mask))
    return folder


def mask_nodata(mask):
    return 255 if mask.dtype == np.uint8 else None


def half_mask(size=64, dtype=np.float32, mangrove=1, other=0):
    mask = np.full((size, size), other, dtype)
    mask[:, : size // 2] = mangrove
    return mask


PREDICT = ("--window", 64, "--overlap", 0)


# --- 1. disk full ------------------------------------------------------------------------
def test_disk_full_during_the_run_keeps_the_old_probability_and_stage_layers(untrained_path, scene_s2, small_fs):
    """The disk fills up while the run computes (another process wrote): the old outputs stay."""
    out = small_fs(1024)
    old_prob = keep(out / "scene_probability.tif")
    old_stage = keep(out / "scene_probability_stage3.tif", b"old stage layer\n")
    proc = cli_start("predict", scene_s2, "--model", untrained_path, "--out-dir", out, *PREDICT,
                     "--stages", "stage3", "--quiet")
    wait_for_partial(proc, out)
    fill(out)
    _, stderr = proc.communicate(timeout=300)
    proc.stderr = stderr
    assert proc.returncode == 2
    assert re.fullmatch(f"menet_qgis: error: no space left on device at {out}/scene_probability(_stage3)?.tif "
                        r"\(nothing was replaced\)", error_line(proc))
    assert (out / "scene_probability.tif").read_bytes() == old_prob
    assert (out / "scene_probability_stage3.tif").read_bytes() == old_stage
    assert partials(out) == []


def test_disk_full_refused_before_compute_when_stage_layers_cannot_fit(cli, untrained_path, scene_s2, small_fs):
    out = small_fs(1024)
    old = keep(out / "scene_probability.tif")
    proc = cli("predict", scene_s2, "--model", untrained_path, "--out-dir", out, *PREDICT,
               "--stages", "stage2", "--stage-mode", "all", "--quiet")
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith(f"menet_qgis: error: not enough free space for the probability and stage layers at {out}:")
    assert "MiB uncompressed" in line and "MiB free" in line
    assert (out / "scene_probability.tif").read_bytes() == old and partials(out) == []


def test_disk_full_write_error_is_caught_in_the_core_for_every_front_end(bundle, scene_s2, small_fs, monkeypatch):
    """The core path QGIS, the worker and the CLI share: a write that fails fails the run."""
    from menet_qgis.core.inference import engine
    out = small_fs(1024)
    old = keep(out / "p.tif")
    fill(out, leave=4096)  # one page: the outputs open, their blocks cannot be written
    monkeypatch.setattr(engine, "check_free_space", lambda *a, **k: None)  # as if the disk filled later
    source = raster_io.RasterInput(scene_s2)
    with pytest.raises(files.WriteError, match=r"^no space left on device at .*/p(_stage1|_quality)?\.tif \(nothing was replaced\)$"):
        engine.extract(bundle, source, out / "p.tif", engine.EngineOptions(window=64, overlap=0, stages=["stage1"]))
    assert (out / "p.tif").read_bytes() == old and partials(out) == []
    assert not (out / "p_stage1.tif").exists() and not (out / "p_quality.tif").exists()


def test_disk_full_checkpoint_save_leaves_the_old_model(small_fs):
    out = small_fs(2048)
    old = keep(out / "model.pt")
    with pytest.raises(files.WriteError) as err:
        checkpoint.save(checkpoint.new_bundle(seed=0), out / "model.pt", half=True)
    assert str(err.value) == f"no space left on device at {out / 'model.pt'} (nothing was replaced)"
    assert (out / "model.pt").read_bytes() == old and partials(out) == []


def test_disk_full_refused_before_training_when_the_model_cannot_be_saved(cli, tmp_path, small_fs):
    """Found out before the epochs, not after hours: the checkpoint (~90 MiB) cannot fit in 2 MiB."""
    tiles = make_tiles(tmp_path / "tiles", [half_mask() for _ in range(6)])
    out = small_fs(2048)
    old = keep(out / "model.pt")
    proc = cli("train", "--tiles", tiles, "--out", out / "model.pt", "--epochs", 1, "--batch-size", 2,
               "--device", "cpu")
    assert proc.returncode == 2
    assert re.fullmatch(f"menet_qgis: error: not enough free space for the model \\(best-so-far copy and final "
                        f"file\\) at {out}: needs about 1[78]\\d MiB, [12] MiB free", error_line(proc))
    assert not any(line.startswith("epoch ") for line in proc.stderr.splitlines())
    assert (out / "model.pt").read_bytes() == old and partials(out) == []


def test_disk_full_report_and_table(cli, tmp_path, small_fs):
    pred = write_raster(tmp_path / "pred.tif", half_mask()[None])
    ref = write_raster(tmp_path / "ref.tif", half_mask()[None])
    out = small_fs(512)
    # previous outputs of the same kinds (files.refuse_replacing lets only those be replaced)
    old_html = keep(out / "r.html", b"<!DOCTYPE html><html><head><meta charset='utf-8'><title>old</title></head></html>")
    old_csv = keep(out / "r.csv", b"name,threshold,overall_accuracy,f1\nold,0.5,1,1\n")
    fill(out)
    for option, name, old in (("--report", "r.html", old_html), ("--table", "r.csv", old_csv)):
        proc = cli("assess", pred, "--reference", ref, option, out / name)
        assert proc.returncode == 2
        assert error_line(proc) == f"menet_qgis: error: no space left on device at {out / name} (nothing was replaced)"
        assert (out / name).read_bytes() == old
    assert partials(out) == []


# --- 2. outputs over inputs --------------------------------------------------------------
def test_predict_output_that_is_another_input_is_refused(untrained_path, tmp_path):
    a = write_s2(tmp_path / "a.tif", 64, 64)
    b = write_s2(tmp_path / "a_probability.tif", 64, 64, seed=3)
    before = b.read_bytes()
    proc = cli_process("predict", a, b, "--model", untrained_path, "--out-dir", tmp_path, *PREDICT)
    assert proc.returncode == 2
    assert error_line(proc) == (f"menet_qgis: error: output {tmp_path / 'a_probability.tif'} is the input {b}: "
                                "writing it would destroy the input; choose another output path")
    assert b.read_bytes() == before and partials(tmp_path) == []


def test_predict_output_reaching_the_input_through_a_symlink_is_refused(cli, untrained_path, tmp_path):
    a = write_s2(tmp_path / "data" / "a.tif", 64, 64)
    before = a.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_probability.tif").symlink_to(a)
    proc = cli("predict", a, "--model", untrained_path, "--out-dir", out, *PREDICT, "--stages", "stage5")
    assert proc.returncode == 2
    assert "is the input" in error_line(proc) and str(a) in proc.stderr
    assert a.read_bytes() == before and partials(out) == [] and partials(a.parent) == []


@pytest.mark.unit
def test_assess_report_over_an_input_is_refused(cli, tmp_path):
    pred = write_raster(tmp_path / "pred.tif", half_mask()[None])
    ref = write_raster(tmp_path / "ref.tif", half_mask()[None])
    before = ref.read_bytes()
    proc = cli("assess", pred, "--reference", ref, "--table", ref)
    assert proc.returncode == 2 and "is the input" in error_line(proc)
    assert ref.read_bytes() == before


@pytest.mark.unit
def test_channel_export_and_stack_over_their_inputs_are_refused(tmp_path):
    from menet_qgis.core.model import channels
    from menet_qgis.core.io import stack
    src = write_s2(tmp_path / "a.tif", 32, 32)
    before = src.read_bytes()
    with pytest.raises(files.InputError, match="is the input"):
        stack.export_channels(src, src, channels.RECIPE_V1.default_pca())
    assert src.read_bytes() == before and partials(tmp_path) == []


@pytest.mark.unit
def test_hard_link_to_an_input_is_refused(tmp_path):
    a = write_s2(tmp_path / "a.tif", 16, 16)
    os.link(a, tmp_path / "b.tif")
    with pytest.raises(files.InputError, match="is the input"):
        files.refuse_overwriting_inputs([tmp_path / "b.tif"], [a])
    files.refuse_overwriting_inputs([tmp_path / "c.tif", None], [a, None])  # different files pass


def test_qgis_process_output_equal_to_input_is_refused(qgis_env, untrained_path, tmp_path):
    src = write_s2(tmp_path / "scene.tif", 64, 64)
    before = src.read_bytes()
    proc = qgis_process(["run", "menet:extractmangroves", "--", f"INPUT={src}", f"MODEL={untrained_path}",
                         f"OUTPUT={src}", "WINDOW_SIZE=64", "OVERLAP=0"], qgis_env)
    assert proc.returncode != 0
    # refused at the QGIS edge, in the core's words
    assert f"output {src} is the input {src}: writing it would destroy the input" in proc.stdout + proc.stderr
    assert src.read_bytes() == before and partials(tmp_path) == []


# --- 3. silently wrong inputs ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int8", "uint8", "complex64"])
def test_dtypes_no_sentinel2_product_has_are_refused(cli, untrained_path, tmp_path, dtype):
    data = (s2_reflectance(32, 32) * 100).astype(dtype)
    src = write_raster(tmp_path / "odd.tif", data, S2_NAMES)
    out = tmp_path / "out"
    old = keep(out / "odd_probability.tif")
    proc = cli("predict", src, "--model", untrained_path, "--out-dir", out)
    assert proc.returncode == 2
    assert error_line(proc) == (f"menet_qgis: error: odd.tif holds {dtype} values, which no Sentinel-2 product has; "
                                "accepted: integer DN (uint16, int16, uint32, int32) or reflectance (float32, float64)")
    assert (out / "odd_probability.tif").read_bytes() == old and partials(out) == []


@pytest.mark.parametrize("values, expected", [
    (np.zeros((6, 64, 64), np.float32), "odd.tif holds only zeros (4096 valid pixels in 1 window sampled across it): "
                                        "there is nothing to map. Likely an empty or failed export"),
    (s2_reflectance(64, 64) * 10000, "odd.tif is a float32 raster, read as reflectance (0-1), but its values look "
                                     "scaled: median 538.9, maximum 3175 (4096 valid pixels in 1 window sampled "
                                     "across it). Likely reflectance x 10000 stored as float: divide it by 10000"),
    (np.full((6, 64, 64), -9999, np.int16), "odd.tif has negative DN in 100.0% of the sampled pixels (minimum -9999; "
                                            "4096 valid pixels in 1 window sampled across it); Sentinel-2 DN are "
                                            "never negative: most are -9999, likely an undeclared no-data value"),
])
def test_implausible_values_are_refused_naming_what_was_seen(cli, untrained_path, tmp_path, values, expected):
    src = write_raster(tmp_path / "odd.tif", values.astype(values.dtype), S2_NAMES)
    out = tmp_path / "out"
    old = keep(out / "odd_probability.tif")
    proc = cli("predict", src, "--model", untrained_path, "--out-dir", out)
    assert proc.returncode == 2
    assert error_line(proc).startswith("menet_qgis: error: " + expected)
    assert (out / "odd_probability.tif").read_bytes() == old and partials(out) == []


def test_some_negative_dn_and_a_missing_offset_are_warnings_even_when_quiet(cli, untrained_path, tmp_path):
    dn = (s2_reflectance(64, 64) * 10000).astype(np.int16)
    dn[:, :8, :] = -32768 + 1000 * np.arange(6)[:, None, None]  # wrapped values, 12.5 % of the pixels
    src = write_raster(tmp_path / "dn.tif", dn, S2_NAMES)
    proc = cli("predict", src, "--model", untrained_path, "--out-dir", tmp_path / "out", *PREDICT, "--quiet")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert any("integer DN with no offset in the metadata and no DN offset given" in w and "-1000" in w
               for w in warnings), proc.stderr
    assert any("dn.tif has negative DN in 12.5% of the sampled pixels (minimum -32768" in w for w in warnings)
    with rasterio.open(tmp_path / "out" / "dn_probability.tif") as ds:
        assert ds.tags()["MENET_DN_OFFSET"] == "0 (assumed: no offset in the input's metadata and none given)"
    proc = cli("predict", src, "--model", untrained_path, "--out-dir", tmp_path / "out2", *PREDICT, "--quiet",
               "--dn-offset", "-1000")
    assert not any("no DN offset given" in line for line in proc.stderr.splitlines())
    with rasterio.open(tmp_path / "out2" / "dn_probability.tif") as ds:
        assert ds.tags()["MENET_DN_OFFSET"] == "-1000 (the DN offset parameter)"


@pytest.mark.unit
@pytest.mark.parametrize("mask, expected", [
    (half_mask(mangrove=2, other=1), "holds values 1, 2; masks must be 1 = mangrove, 0 = other (soft values 0-1 "
                                     "allowed, mangrove >= 0.5), no-data as NaN or the declared no-data value: no 0 "
                                     "in it: which of 1 and 2 is mangrove?"),
    (half_mask(mangrove=255), "holds values 0, 255; masks must be 1 = mangrove, 0 = other"),
    (np.tile(np.linspace(0, 100, 64, dtype=np.float32), (64, 1)), "it looks like percent cover: divide by 100"),
    (half_mask(mangrove=0), "hold no mangrove pixels (24576 valid labelled pixels, all other)"),
    (half_mask(other=1), "hold no non-mangrove pixels (24576 valid labelled pixels, all mangrove)"),
])
def test_training_label_coding_is_checked_before_training(cli, tmp_path, mask, expected):
    tiles = make_tiles(tmp_path / "tiles", [mask] * 6)
    old = keep(tmp_path / "model.pt")
    proc = cli("train", "--tiles", tiles, "--out", tmp_path / "model.pt", "--epochs", 1, "--batch-size", 2)
    assert proc.returncode == 2
    assert expected in error_line(proc)
    assert (tmp_path / "model.pt").read_bytes() == old and partials(tmp_path) == []


@pytest.mark.unit
def test_declared_mask_nodata_is_no_data_not_mangrove(tmp_path):
    mask = half_mask(dtype=np.uint8)
    mask[:4] = 255  # declared no-data of the uint8 masks
    tiles = training_data.load_tile_folder(make_tiles(tmp_path / "tiles", [mask] * 3))
    assert not tiles.valid[:, :4].any() and set(np.unique(tiles.labels[tiles.valid])) == {0.0, 1.0}


@pytest.mark.unit
def test_degenerate_validation_refuses_to_train_and_save(tmp_path):
    tiles = training_data.load_tile_folder(make_tiles(tmp_path / "tiles", [half_mask()] * 4))
    no_mangrove = tiles.subset([0])
    no_mangrove.labels[:] = 0
    with pytest.raises(ValueError, match=r"the validation windows hold no mangrove pixels .* no model is saved; "
                                         r"the location split left one class out of validation"):
        training.train(tiles.subset([1, 2, 3]), training.TrainOptions(epochs=1, batch_size=2, device="cpu",
                                                                     save_best_to=str(tmp_path / "best.pt")),
                       val_tiles=no_mangrove)
    assert not (tmp_path / "best.pt").exists() and partials(tmp_path) == []


# --- 4. broken files -------------------------------------------------------------------------
def _truncated_checkpoint(path, untrained_path):
    data = Path(untrained_path).read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _malicious_pickle(path, marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"format": checkpoint.FORMAT, "payload": Evil()}, path)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["empty", "malicious", "truncated"])
def test_broken_checkpoints_get_one_whole_sentence(cli, untrained_path, tmp_path, kind):
    model = tmp_path / "m.pt"
    marker = tmp_path / "pwned"
    if kind == "empty":
        model.write_bytes(b"")
        expected = "m.pt is empty (0 bytes): was it cut short while copying or saving?"
    elif kind == "malicious":
        _malicious_pickle(model, marker)
        expected = ("m.pt: refused: the file contains Python objects that could run code; "
                    "only weights-only checkpoints are loaded")
    else:
        _truncated_checkpoint(model, untrained_path)
        expected = "m.pt is not a readable ME-Net checkpoint (corrupt, truncated or another format: RuntimeError: "
    src = write_s2(tmp_path / "a.tif", 32, 32)
    old = keep(tmp_path / "out" / "a_probability.tif")
    proc = cli("predict", src, "--model", model, "--out-dir", tmp_path / "out")
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("menet_qgis: error: " + expected)
    assert line.endswith((")", "?", "loaded")) and "weights_only" not in line
    assert not marker.exists()
    assert (tmp_path / "out" / "a_probability.tif").read_bytes() == old and partials(tmp_path / "out") == []


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["empty", "malicious"])
def test_broken_imagenet_weights_get_one_line(cli, tmp_path, kind):
    tiles = make_tiles(tmp_path / "tiles", [half_mask()] * 6)
    weights, marker = tmp_path / "resnet101.pth", tmp_path / "pwned"
    if kind == "empty":
        weights.write_bytes(b"")
    else:
        _malicious_pickle(weights, marker)
    old = keep(tmp_path / "model.pt")
    proc = cli("train", "--tiles", tiles, "--out", tmp_path / "model.pt", "--epochs", 1, "--batch-size", 2,
               "--imagenet-weights", weights)
    assert proc.returncode == 2
    expected = ("resnet101.pth is empty (0 bytes): was it cut short while copying or saving?" if kind == "empty" else
                "resnet101.pth: refused: the file contains Python objects that could run code")
    assert expected in error_line(proc)
    assert not marker.exists()
    assert (tmp_path / "model.pt").read_bytes() == old and partials(tmp_path) == []


def test_truncated_geotiff_is_one_line_naming_the_window(untrained_path, tmp_path):
    whole = write_s2(tmp_path / "whole.tif", 256, 256)
    src = tmp_path / "cut.tif"
    # CreateCopy puts the header and tile index first, so a cut file still opens
    rasterio.shutil.copy(whole, src, driver="GTiff", tiled=True, blockxsize=64, blockysize=64)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    old = keep(out / "cut_probability.tif")
    proc = cli_process("predict", src, "--model", untrained_path, "--out-dir", out, *PREDICT)
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("menet_qgis: error: cut.tif is corrupt or truncated at window col ")
    assert " px): " in line and len(line) < 400
    assert (out / "cut_probability.tif").read_bytes() == old and partials(out) == []


# --- 5. killed runs ----------------------------------------------------------------------------
def test_sigterm_cleans_up_and_sigkill_leftovers_go_on_the_next_run(cli, untrained_path, tmp_path):
    src = write_s2(tmp_path / "scene.tif", 256, 320)
    out = tmp_path / "out"
    old = keep(out / "scene_probability.tif")
    args = ("predict", src, "--model", untrained_path, "--out-dir", out, *PREDICT, "--stages", "stage4")

    proc = cli_start(*args)
    wait_for_partial(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "menet_qgis: terminated; no output was kept"
    assert (out / "scene_probability.tif").read_bytes() == old and partials(out) == []

    proc = cli_start(*args)
    wait_for_partial(proc, out)
    proc.kill()
    proc.communicate(timeout=60)
    left = partials(out)
    assert left and all(f".{files.HOST}-{proc.pid}-" in name for name in left)
    assert (out / "scene_probability.tif").read_bytes() == old

    done = cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    removed = [line for line in done.stderr.splitlines() if line.startswith("removed .")]
    assert sorted(line.split()[1].rstrip(":") for line in removed) == left
    assert all("a partial output left by a run that no longer exists" in line for line in removed)
    assert partials(out) == []
    assert json.loads(done.stdout)[0]["probability"] == str(out / "scene_probability.tif")


def test_partial_files_of_live_runs_are_kept(tmp_path):
    target = tmp_path / "p.tif"
    live = subprocess.Popen(["sleep", "30"])
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        for pid in (live.pid, dead.pid):
            (tmp_path / f".p.{files.HOST}-{pid}-abc.partial.tif").write_bytes(b"x")
        other_output = tmp_path / f".q.{files.HOST}-{dead.pid}-abc.partial.tif"
        other_output.write_bytes(b"x")
        removed = files.remove_stale_partials(target)
        assert [p.name for p in removed] == [f".p.{files.HOST}-{dead.pid}-abc.partial.tif"]
        assert (tmp_path / f".p.{files.HOST}-{live.pid}-abc.partial.tif").exists() and other_output.exists()
    finally:
        live.kill()
        live.wait()


def test_a_failed_write_never_goes_unnoticed(small_fs, tmp_path):
    """Why every write is checked: rasterio 1.3 (Debian 12) raises nothing from write() and close()
    on a full disk and leaves a broken file; verify_geotiff (run before every commit) finds it.
    Newer rasterio (Debian 13) raises: either way the failure is seen."""
    noise = np.random.default_rng(0).random((1, 512, 512), dtype=np.float32)
    profile = dict(driver="GTiff", width=512, height=512, count=1, dtype="float32", crs="EPSG:32717",
                   transform=from_origin(0, 0, 10, 10), compress="deflate", tiled=True)
    out = small_fs(512)
    try:
        with rasterio.open(out / "x.tif", "w", **profile) as ds:
            ds.write(noise)
        raised = False
    except rasterio.errors.RasterioError:
        raised = True
    assert raised or raster_io.verify_geotiff(out / "x.tif", (1, 512, 512)) is not None
    with rasterio.open(tmp_path / "ok.tif", "w", **profile) as ds:
        ds.write(noise)
    assert raster_io.verify_geotiff(tmp_path / "ok.tif", (1, 512, 512)) is None
