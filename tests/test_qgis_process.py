"""Headless use: qgis_process runs the algorithm and a graphical model that chains it."""
import json
import subprocess

import numpy as np
import pytest

from helpers import ROOT, crop_scene, qgis_process, raster_profile, read, write_s2

MODEL3 = ROOT / "resources" / "models" / "mangrove_mask.model3"


def run_json(args, env):
    proc = qgis_process(["--json", "run", *args], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_qgis_process_on_a_real_sentinel2_geotiff(qgis_env, scene, untrained_path, tmp_path):
    src = crop_scene(tmp_path / "jambeli_crop.tif", 1200, 1400, 200, 260)
    out = tmp_path / "prob.tif"
    result = run_json(["menet:extractmangroves", "--", f"INPUT={src}", f"MODEL={untrained_path}", f"OUTPUT={out}",
                       "STAGES=4", "WINDOW_SIZE=128", "OVERLAP=32"], qgis_env)
    assert result["results"]["OUTPUT"] == str(out)
    inp, prof = raster_profile(src), raster_profile(out)
    assert (prof["crs"], prof["transform"], prof["width"], prof["height"]) == \
        (inp["crs"], inp["transform"], inp["width"], inp["height"])
    nodata_in = ~np.isfinite(read(src)).all(axis=0)
    assert np.array_equal(np.isnan(read(out)[0]), nodata_in)
    assert len(result["results"]["STAGE_LAYERS"]) == 1


def test_qgis_process_reports_bad_input_and_fails(qgis_env, untrained_path, tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster")
    proc = qgis_process(["run", "menet:extractmangroves", "--", f"INPUT={bad}", f"MODEL={untrained_path}",
                         f"OUTPUT={tmp_path / 'p.tif'}"], qgis_env)
    assert proc.returncode != 0
    assert not (tmp_path / "p.tif").exists()


def test_graphical_model_chains_extract_into_core_reclassify(qgis_env, untrained_path, tmp_path):
    src = write_s2(tmp_path / "in.tif", 90, 120)
    out = tmp_path / "mask.tif"
    result = run_json([str(MODEL3), "--", f"input={src}", f"model={untrained_path}", "threshold=0.5",
                       f"mask:mangrove_mask={out}"], qgis_env)
    assert out.is_file(), result
    mask = read(out)[0]
    prof = raster_profile(out)
    assert (prof["width"], prof["height"]) == (120, 90)
    assert prof["transform"] == raster_profile(src)["transform"]
    assert set(np.unique(mask)) <= {0, 1}


def test_graphical_model_thresholds_at_the_models_own_threshold_by_default(qgis_env, untrained_path, tmp_path):
    """No threshold given: the mask step uses Extract's THRESHOLD output, the model's stored threshold."""
    from menet_qgis.core.model import checkpoint
    src = write_s2(tmp_path / "in.tif", 64, 64)
    out, prob = tmp_path / "mask.tif", tmp_path / "prob.tif"
    bundle = checkpoint.load(untrained_path)
    run_json(["menet:extractmangroves", "--", f"INPUT={src}", f"MODEL={untrained_path}", f"OUTPUT={prob}"], qgis_env)
    p = read(prob)[0]
    threshold = float(np.quantile(np.unique(p), 0.5))   # a threshold that splits this map, stored in the model
    assert 0 < threshold < 1 and threshold != 0.5
    bundle.training = {**bundle.training, "threshold": threshold}
    model = tmp_path / "thresholded.pt"
    checkpoint.save(bundle, model)
    result = run_json([str(MODEL3), "--", f"input={src}", f"model={model}", f"mask:mangrove_mask={out}"], qgis_env)
    mask = read(out)[0]
    np.testing.assert_array_equal(mask, (p >= threshold).astype(mask.dtype))
    assert 0 < mask.mean() < 1 and ((p >= threshold) != (p >= 0.5)).any(), result


def test_whole_2020_scene_with_no_band_parameters_and_the_default_model(qgis_env, scene, tmp_path):
    """Issue 3's must-show: the real 6-band float32 export (NaN nodata), bands found from their names."""
    out = tmp_path / "scene_2020_probability.tif"
    result = run_json(["menet:extractmangroves", "--", f"INPUT={scene}", f"OUTPUT={out}"], qgis_env)
    info = result["log"]["info"]
    log = "\n".join(info) if isinstance(info, list) else info
    assert "from band descriptions" in log and "read as surface reflectance" in log
    inp, prof = raster_profile(scene), raster_profile(out)
    assert (prof["crs"], prof["transform"], prof["width"], prof["height"]) == \
        (inp["crs"], inp["transform"], inp["width"], inp["height"])
    nodata_in = ~np.isfinite(read(scene)).all(axis=0)
    prob = read(out)[0]
    assert np.array_equal(np.isnan(prob), nodata_in)
    valid = prob[~nodata_in]
    assert 0.0 <= valid.min() and valid.max() <= 1.0
    share = float((valid >= 0.5).mean())
    assert 0.02 < share < 0.8, f"implausible mangrove share {share:.3f} for the Jambelí coast"


@pytest.mark.unit
def test_shipped_model_opens_valid_with_the_raster_first(menet_provider, tmp_path):
    """What the graphical modeler checks when it opens the model, and the order it lists the inputs in."""
    from qgis.core import QgsProcessingContext, QgsProcessingModelAlgorithm
    model = QgsProcessingModelAlgorithm()
    assert model.fromFile(str(MODEL3))
    ok, issues = model.validate()
    assert ok, issues
    inputs = [p.name() for p in model.parameterDefinitions() if not p.isDestination()]
    assert inputs == ["input", "model", "threshold"]
    src = write_s2(tmp_path / "in.tif", 20, 20)
    ok, message = model.checkParameterValues({"input": str(src), "threshold": 0.5,
                                              "mask:mangrove_mask": str(tmp_path / "m.tif")}, QgsProcessingContext())
    assert ok, message


def test_provider_loads_and_explains_when_the_engine_python_is_missing(qgis_env, tmp_path):
    """QGIS's own Python without the venv lists the algorithms (the provider imports nothing heavy);
    a run whose chosen Python lacks torch says what is missing and how to install it."""
    env = dict(qgis_env, PYTHONPATH="")
    listing = qgis_process(["list"], env)
    assert "menet:extractmangroves" in listing.stdout and "menet:trainmenet" in listing.stdout
    system = "/usr/bin/python3"
    if subprocess.run([system, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("the system Python has torch")
    src = write_s2(tmp_path / "in.tif", 20, 20)
    proc = qgis_process(["run", "menet:extractmangroves", "--", f"INPUT={src}", f"OUTPUT={tmp_path / 'p.tif'}"],
                        dict(env, MENET_PYTHON=system))
    assert proc.returncode != 0
    assert "lacks torch" in proc.stdout + proc.stderr and "Install ME-Net dependencies" in proc.stdout + proc.stderr
    assert not (tmp_path / "p.tif").exists()
