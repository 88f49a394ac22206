"""CPU runtimes: ONNX export parity with torch on real windows, numpy channels, auto choice, no torch needed."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, S2_NAMES, crop_scene, read, refined_bundle, s2_reflectance, write_raster
from menet_qgis.core.model import channels as ch
from menet_qgis.core import reporting
from menet_qgis.core.inference import engine, onnx_model, runtimes
from menet_qgis.core.io import raster_io
from menet_qgis.core.inference.runtimes import ensure_onnx

pytestmark = pytest.mark.skipif(not runtimes.installed("onnxruntime"), reason="onnxruntime not installed")


class Log(reporting.Reporter):
    def __init__(self):
        self.messages = []

    def info(self, message):
        self.messages.append(message)


@pytest.fixture(scope="session")
def exported(bundle):
    """Both graph variants of the untrained checkpoint, exported once per session (cached beside it)."""
    return {need: ensure_onnx(bundle, need) for need in onnx_model.NEEDS}


@pytest.fixture(scope="session")
def real_crop(tmp_path_factory):
    """A 200 x 300 px piece of the real scene holding mangroves, water and the no-data edge."""
    from helpers import SCENE
    if not SCENE.is_file():
        pytest.skip(f"real Sentinel-2 scene not available at {SCENE}")
    return crop_scene(tmp_path_factory.mktemp("crop") / "crop.tif", 1088, 384, 200, 300)


def _map(model, src, out, **options):
    opts = engine.EngineOptions(window=128, overlap=32, device="cpu", **options)
    return engine.extract(model, raster_io.RasterInput(src), out, opts)


@pytest.mark.unit
def test_numpy_channels_equal_torch_including_nan_and_zero_denominators():
    rng = np.random.default_rng(1)
    bands = rng.uniform(0.0, 0.4, (2, 6, 16, 16)).astype(np.float32)
    bands[0, :, 0, 0] = np.nan                      # no-data pixel
    bands[0, 3, 1, 1] = np.nan                      # one band missing
    bands[1, 3, 2, 2] = bands[1, 2, 2, 2] = 0.0     # B8 + B4 = 0
    bands[1, 5, 3, 3] = 0.0                         # B12 = 0 (ratio indices)
    bands[1, 5, 4, 4] = 1e-7                        # tiny denominator
    pca = ch.PCABasis([0.1, 0.1, 0.1, 0.2, 0.15, 0.1], [0.3, 0.3, 0.4, 0.5, 0.5, 0.4])
    want = ch.compute_channels(torch.from_numpy(bands), pca).numpy()
    got = ch.compute_channels_numpy(bands, pca)
    assert got.dtype == np.float32 and got.shape == want.shape == (2, 11, 16, 16)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.isfinite(got[1]).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.unit
def test_numpy_batch_preparation_equals_torch_on_a_real_window(bundle, real_crop):
    source = raster_io.RasterInput(real_crop)
    data, valid = source.read(0, 0, 128)
    source.close()
    assert (~valid).any() and valid.any()           # the crop holds the scene's no-data edge
    want = runtimes.prepare_batch(torch.from_numpy(data[None]), torch.from_numpy(valid[None]), bundle, source.plan)
    got = runtimes.prepare_batch_numpy(data[None], valid[None], bundle, source.plan)
    assert np.isfinite(got).all() and (got[0][:, ~valid] == 0).all()
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_onnx_runtimes_give_the_torch_map_on_real_windows(bundle, exported, real_crop, tmp_path, runtime):
    if not runtimes.installed(runtime):
        pytest.skip(f"{runtime} not installed")
    want = read(_map(bundle, real_crop, tmp_path / "torch.tif", runtime="torch").probability)[0]
    log = Log()
    result = engine.extract(bundle, raster_io.RasterInput(real_crop), tmp_path / f"{runtime}.tif",
                            engine.EngineOptions(window=128, overlap=32, device="cpu", runtime=runtime,
                                                 batch_size=3), log)
    got = read(result.probability)[0]
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(want).any() and np.isfinite(want).any()
    assert np.nanmax(np.abs(got - want)) <= 1e-4
    assert f"runtime: {runtime} (asked for)" in log.messages
    assert any(m.startswith(f"device: CPU, {runtime} ") and "fp32" in m for m in log.messages)


def test_test_time_flips_through_onnx_match_torch_and_are_logged(bundle, exported, real_crop, tmp_path):
    want = read(_map(bundle, real_crop, tmp_path / "torch.tif", runtime="torch", tta=True).probability)[0]
    plain = read(_map(bundle, real_crop, tmp_path / "plain.tif", runtime="onnxruntime").probability)[0]
    log = Log()
    result = engine.extract(bundle, raster_io.RasterInput(real_crop), tmp_path / "flips.tif",
                            engine.EngineOptions(window=128, overlap=32, device="cpu", runtime="onnxruntime",
                                                 tta=True), log)
    got = read(result.probability)[0]
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.nanmax(np.abs(got - want)) <= 1e-4
    assert np.nanmax(np.abs(got - plain)) > 1e-3  # the flips did change the map
    assert any(m.startswith("test-time flips:") and "8x" in m for m in log.messages)


def test_a_refined_model_runs_through_onnx_as_in_torch(real_crop, tmp_path):
    from menet_qgis.core.model import checkpoint
    checkpoint.save(refined_bundle(), tmp_path / "refined.pt")
    refined = checkpoint.load(tmp_path / "refined.pt")
    want = read(_map(refined, real_crop, tmp_path / "torch.tif", runtime="torch").probability)[0]
    got = read(_map(refined, real_crop, tmp_path / "onnx.tif", runtime="onnxruntime").probability)[0]
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isfinite(want).any()
    assert np.nanmax(np.abs(got - want)) <= 1e-4


def test_stage_maps_through_onnx_match_torch(bundle, exported, real_crop, tmp_path):
    for mode in ("compact", "all"):
        stages = ["stage1", "stage4"]
        want = _map(bundle, real_crop, tmp_path / f"t_{mode}.tif", runtime="torch", stages=stages, stage_mode=mode)
        got = _map(bundle, real_crop, tmp_path / f"o_{mode}.tif", runtime="onnxruntime", stages=stages,
                   stage_mode=mode)
        for name in stages:
            a, b = read(want.stages[name]), read(got.stages[name])
            assert a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b))
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-3 * np.nanmax(np.abs(a)), equal_nan=True)


def test_an_onnx_file_alone_is_a_complete_model(exported, tmp_path, monkeypatch):
    lone = tmp_path / "model.onnx"
    shutil.copy(exported["probability"].path, lone)   # no .json sidecar, no checkpoint beside it
    model = runtimes.read_onnx_model(lone)
    assert model.outputs == ["probability"] and model.window_size == 256 and not model.trained
    assert len(model.norm_mean) == 11 and len(model.pca.component) == 5
    if runtimes.installed("openvino"):   # the record is read from the file by OpenVINO too
        real_installed = runtimes.installed
        monkeypatch.setattr(runtimes, "installed", lambda m: m != "onnxruntime" and real_installed(m))
        assert runtimes.read_onnx_model(lone).norm_std == model.norm_std


def test_auto_choice_follows_what_is_installed_and_says_why(bundle, exported, monkeypatch, tmp_path):
    present = {"openvino", "onnxruntime", "torch"}
    monkeypatch.setattr(runtimes, "installed", lambda m: m in present)
    monkeypatch.setattr(runtimes, "torch_sees_cuda", lambda: False)
    assert runtimes.choose_runtime("auto", "auto", "file") == \
        ("openvino", "auto: no CUDA GPU visible to torch; OpenVINO is installed")
    present.discard("openvino")
    assert runtimes.choose_runtime("auto", "cpu", "file")[0] == "onnxruntime"
    present.discard("onnxruntime")
    assert runtimes.choose_runtime("auto", "auto", "file") == \
        ("torch", "auto: no CUDA GPU visible to torch; neither OpenVINO nor onnxruntime installed")
    with pytest.raises(ValueError, match="needs onnxruntime or openvino"):
        runtimes.choose_runtime("auto", "auto", "onnx")
    present.update({"openvino", "onnxruntime"})
    monkeypatch.setattr(runtimes, "torch_sees_cuda", lambda: True)
    assert runtimes.choose_runtime("auto", "auto", "file") == ("torch", "auto: torch sees a CUDA GPU")
    assert runtimes.choose_runtime("auto", "cpu", "file")[0] == "openvino"
    assert runtimes.choose_runtime("auto", "auto", "memory")[0] == "torch"
    with pytest.raises(ValueError, match="not torch"):
        runtimes.choose_runtime("torch", "auto", "onnx")
    # and the engine's log names the choice
    monkeypatch.setattr(runtimes, "torch_sees_cuda", lambda: False)
    present.discard("openvino")
    log = Log()
    src = write_raster(tmp_path / "in.tif", s2_reflectance(64, 64), S2_NAMES)
    engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "p.tif", engine.EngineOptions(window=64, overlap=0), log)
    assert "runtime: onnxruntime (auto: no CUDA GPU visible to torch; OpenVINO is not installed, onnxruntime is)" \
        in log.messages


@pytest.mark.unit
def test_auto_says_torch_is_not_installed_rather_than_no_gpu(monkeypatch):
    monkeypatch.setattr(runtimes, "installed", lambda m: m in {"openvino", "onnxruntime"})
    assert runtimes.choose_runtime("auto", "auto", "onnx") == \
        ("openvino", "auto: torch is not installed; OpenVINO is installed")
    monkeypatch.setattr(runtimes, "installed", lambda m: m == "onnxruntime")
    assert runtimes.choose_runtime("auto", "auto", "file") == \
        ("onnxruntime", "auto: torch is not installed; OpenVINO is not installed, onnxruntime is")


AVX2_ONLY = frozenset("sse4_2 avx avx2 fma f16c sha_ni".split())
AVX512_NO_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_vnni"}


@pytest.mark.unit
def test_auto_precision_on_the_cpu_is_bf16_exactly_where_the_cpu_has_native_bf16():
    rule = runtimes.auto_cpu_precision
    assert rule("openvino", AVX2_ONLY) == ("fp32", "this CPU has no bf16 instructions (AVX2)")
    assert rule("openvino", AVX512_NO_BF16) == ("fp32", "this CPU has no bf16 instructions (AVX-512)")
    assert rule("openvino", AVX512_NO_BF16 | {"avx512_bf16"}) == ("bf16", "this CPU has AVX512_BF16")
    assert rule("openvino", AVX512_NO_BF16 | {"avx512_bf16", "amx_bf16", "amx_tile"}) == \
        ("bf16", "this CPU has AMX-BF16 and AVX512_BF16")
    assert rule("openvino", frozenset({"avx2", "amx_bf16"}))[0] == "bf16"
    assert rule("openvino", frozenset()) == ("fp32", "this CPU has no bf16 instructions")
    # ONNX Runtime computes fp32 on x86 whatever the CPU has
    precision, why = rule("onnxruntime", AVX512_NO_BF16 | {"avx512_bf16"})
    assert precision == "fp32" and "onnxruntime runs fp32" in why
    # asked-for precisions pass through; the features matter only for auto
    assert runtimes.cpu_precision("openvino", "fp32", AVX512_NO_BF16 | {"avx512_bf16"}) == ("fp32", "asked for")
    assert runtimes.cpu_precision("openvino", "auto", AVX2_ONLY)[0] == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        runtimes.cpu_precision("openvino", "int4", AVX2_ONLY)


def test_this_cpus_features_are_read_and_the_choice_is_logged_on_every_run(bundle, exported, tmp_path, monkeypatch):
    features = runtimes.cpu_features()
    assert {"sse4_2", "avx2"} & features or "neon" in features or "asimd" in features  # read, not empty
    src = write_raster(tmp_path / "in.tif", s2_reflectance(64, 64), S2_NAMES)
    for runtime in ("onnxruntime", "openvino"):
        if not runtimes.installed(runtime):
            continue
        log = Log()
        engine.extract(bundle, raster_io.RasterInput(src), tmp_path / f"{runtime}.tif",
                       engine.EngineOptions(window=64, overlap=0, runtime=runtime), log)
        precision, why = runtimes.auto_cpu_precision(runtime, features)
        assert f"precision {precision}: {why}" in log.messages
    monkeypatch.setattr(runtimes, "cpu_features", lambda: AVX2_ONLY)
    log = Log()
    engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "avx2.tif",
                   engine.EngineOptions(window=64, overlap=0, runtime="onnxruntime"), log)
    assert "precision fp32: this CPU has no bf16 instructions (AVX2)" in log.messages
    log = Log()
    engine.extract(bundle, raster_io.RasterInput(src), tmp_path / "torch.tif",
                   engine.EngineOptions(window=64, overlap=0, runtime="torch", device="cpu"), log)
    assert any(m.startswith("precision fp32: torch runs fp32 on the CPU") for m in log.messages)


def test_exports_store_the_checkpoints_fp16_weights_exactly(bundle, exported, untrained_path):
    """Every weight of an fp16 checkpoint is stored as fp16 behind a Cast (lossless: the file is no bigger
    than the .pt, and the runtimes compute in fp32 with the very same values)."""
    import onnx
    from onnx import TensorProto, numpy_helper
    path = exported["stages"].path
    proto = onnx.load(path)
    floats = [t for t in proto.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert floats and all(t.data_type == TensorProto.FLOAT16 for t in floats)
    casts = {n.input[0]: n.output[0] for n in proto.graph.node if n.op_type == "Cast"}
    state = {k: v for k, v in bundle.model.state_dict().items() if v.is_floating_point()}
    stored = {casts[t.name].removeprefix("model."): numpy_helper.to_array(t) for t in floats}
    for name, value in stored.items():  # batch norm unfused: every stored tensor is a checkpoint weight
        assert np.array_equal(value.astype(np.float32), state[name].numpy()), name
    for name in set(state) - set(stored):  # the exporter stores weights of equal value once
        assert any(v.shape == state[name].shape and np.array_equal(v, state[name].numpy()) for v in stored.values())
    assert os.path.getsize(path) <= os.path.getsize(untrained_path)
    assert '"weights":"fp16 where exact' in proto.metadata_props[0].value


def test_precision_bf16_is_refused_where_it_cannot_run(bundle, exported, tmp_path):
    src = write_raster(tmp_path / "in.tif", s2_reflectance(64, 64), S2_NAMES)
    with pytest.raises(ValueError, match="onnxruntime runs fp32"):
        _map(bundle, src, tmp_path / "a.tif", runtime="onnxruntime", precision="bf16")
    if runtimes.installed("openvino") and not runtimes.openvino_bf16_supported():
        with pytest.raises(ValueError, match="bf16 needs a CPU with bf16 instructions"):
            _map(bundle, src, tmp_path / "b.tif", runtime="openvino", precision="bf16")


def test_mapping_without_torch_gives_the_same_map(bundle, exported, real_crop, tmp_path, untrained_path):
    """torch blocked from import (a torch package that raises ImportError first on the path):
    the .onnx model and the already-exported .pt both map, equal to torch's map."""
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch blocked for this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    want = read(_map(bundle, real_crop, tmp_path / "torch.tif", runtime="torch").probability)[0]
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert "torch blocked for this test" in check.stderr
    for name, model in (("onnx", exported["probability"].path), ("pt", untrained_path)):
        proc = subprocess.run([sys.executable, "-m", "menet_qgis", "predict", real_crop, "--model", model,
                               "--out-dir", tmp_path / name, "--window", "128", "--overlap", "32",
                               "--runtime", "onnxruntime", "--device", "cpu"],
                              env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        got = read(tmp_path / name / "crop_probability.tif")[0]
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.nanmax(np.abs(got - want)) <= 1e-4
    # a checkpoint never exported needs torch once: a one-line error says so
    fresh = tmp_path / "fresh" / "fresh.pt"
    fresh.parent.mkdir()
    shutil.copy(untrained_path, fresh)
    proc = subprocess.run([sys.executable, "-m", "menet_qgis", "predict", real_crop, "--model", fresh,
                           "--out-dir", tmp_path / "fresh_out", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("menet_qgis: error:")
    assert "fresh.pt is a torch checkpoint and has not been exported to ONNX" in proc.stderr
    assert "python -m menet_qgis export fresh.pt --stages --out fresh.onnx" in proc.stderr
    assert not (tmp_path / "fresh_out").exists() or not any((tmp_path / "fresh_out").iterdir())
    # the same checkpoint with its .onnx beside it (a model installed as both): that export runs it
    shutil.copy(exported["stages"].path, fresh.with_suffix(".onnx"))
    proc = subprocess.run([sys.executable, "-m", "menet_qgis", "predict", real_crop, "--model", fresh,
                           "--out-dir", tmp_path / "fresh_out", "--window", "128", "--overlap", "32"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    got = read(tmp_path / "fresh_out" / "crop_probability.tif")[0]
    assert np.nanmax(np.abs(got - want)) <= 1e-4
    assert "auto: torch is not installed" in proc.stderr


@pytest.mark.unit
def test_a_torch_checkpoint_without_torch_names_the_file_to_use_instead():
    default = runtimes.torch_required_message(runtimes.Path("/models/menet_coasts_v2.pt"))
    assert "install its ONNX asset menet_coasts_v2.onnx instead" in default
    assert "python -m menet_qgis install-model dist/menet_coasts_v2.onnx" in default and "Install model" in default
    other = runtimes.torch_required_message(runtimes.Path("/models/my_coast.pt"))
    assert "menet_coasts_v2" not in other
    assert "python -m menet_qgis export my_coast.pt --stages --out my_coast.onnx" in other


def test_cli_refuses_runtime_model_mismatches_in_one_line(exported, real_crop, tmp_path):
    cases = [(["--model", exported["probability"].path, "--runtime", "torch"], "not torch"),
             (["--model", exported["probability"].path, "--runtime", "onnxruntime", "--stages", "stage2"],
              "holds no stage maps"),
             (["--model", exported["probability"].path, "--runtime", "onnxruntime", "--device", "cuda"],
              "runs on the CPU here")]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "menet_qgis", "predict", real_crop, "--out-dir",
                               tmp_path / "out", *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 2 and proc.stderr.startswith("menet_qgis: error:"), proc.stderr
        assert message in proc.stderr and proc.stderr.strip().count("\n") == 0
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
