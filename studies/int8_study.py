"""int8 for the model asset: NNCF post-training quantisation calibrated on training windows, scored
against fp32 (validation F1 per source, map difference) and timed in OpenVINO, interleaved.

Two Pythons, because the window loaders need torch and NNCF is not in the checkout's environment:

    .venv/bin/python -m studies.int8_study prepare --work build/int8_study
    python3 -m venv build/nncf && build/nncf/bin/pip install nncf openvino numpy
    build/nncf/bin/python -m studies.int8_study quantize --work build/int8_study [--asset dist/menet_coasts_v2.onnx]

``prepare`` writes the model's own split (as studies/evaluate_coasts.py rebuilds it) as normalised
model input: up to 300 training windows for calibration, and the validation + held-out windows
with their labels.  ``quantize`` quantises the asset's probability graph with NNCF (OpenVINO
backend, mixed preset: symmetric weights, asymmetric activations), writes the int8 model as
OpenVINO IR, and reports F1 per source at the model's threshold for fp32 and int8 (the rule for
``auto``: int8 only if it stays within 0.2 F1 points of fp32 on every source), max |Δp| and
class flips, and forward-only windows/s and compile time of both, in interleaved rounds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: int8 is acceptable where F1 drops by at most this much on every source (issue 24).
F1_TOLERANCE = 0.002


def prepare(work: Path, model: Path, calibration: int) -> None:
    from menet_qgis.core.inference import runtimes
    from menet_qgis.core.model import checkpoint
    from menet_qgis.core.training.train import _reflectance_plan
    from studies import evaluate_coasts
    bundle = checkpoint.load(model)
    tiles = evaluate_coasts.load(bundle.recipe, [evaluate_coasts.JAMBELI, evaluate_coasts.MAGSET2])
    train, val, test = evaluate_coasts.split(tiles, bundle)
    plan = _reflectance_plan(tiles.images.shape[1])

    def model_input(indexes):
        part = tiles.subset(indexes)
        return runtimes.prepare_batch_numpy(np.nan_to_num(part.images), part.valid, bundle, plan), part

    picked = sorted(np.random.default_rng(0).choice(train, min(calibration, len(train)), replace=False).tolist())
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "calibration.npy", model_input(picked)[0])
    x, scored = model_input(val + test)
    holdout = evaluate_coasts.holdout_of(bundle)
    units = ["jambeli (validation)" if scored.sources[i] == "jambeli" else
             f"{scored.groups[i]} ({'held out' if scored.groups[i] in holdout else 'validation'})"
             for i in range(len(scored))]
    np.save(work / "scored.npy", x)
    np.save(work / "scored_valid.npy", scored.valid)
    np.save(work / "scored_label.npy", scored.labels >= 0.5)
    (work / "meta.json").write_text(json.dumps({"model": str(model), "threshold": bundle.threshold, "units": units,
                                                "calibration_windows": len(picked), "training_windows": len(train)}))
    print(f"{len(picked)} calibration windows of {len(train)} training windows, {len(units)} scored windows -> {work}")


def f1_by_unit(prediction, labels, valid, units):
    out = {}
    for unit in sorted(set(units)) + ["held-out zones pooled"]:
        rows = [i for i, u in enumerate(units) if u == unit or (unit == "held-out zones pooled" and "held out" in u)]
        p, t = prediction[rows][valid[rows]], labels[rows][valid[rows]]
        tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
        out[unit] = round(2 * tp / max(2 * tp + fp + fn, 1), 4)
    return out


def quantize(work: Path, asset: Path, rounds: int, batches: int) -> None:
    import nncf
    import openvino as ov
    core = ov.Core()
    meta = json.loads((work / "meta.json").read_text())
    net = core.read_model(str(asset))
    net = ov.Model([net.output("probability")], net.get_parameters(), "probability")
    calibration = np.load(work / "calibration.npy", mmap_mode="r")
    t0 = time.perf_counter()
    quantized = nncf.quantize(net, nncf.Dataset(range(len(calibration)),
                                                lambda i: np.ascontiguousarray(calibration[i:i + 1])),
                              subset_size=len(calibration), preset=nncf.QuantizationPreset.MIXED)
    quantize_s = time.perf_counter() - t0
    int8_path = work / "menet_int8.xml"
    ov.save_model(quantized, str(int8_path))

    def compiled(model_path, shape):
        model = core.read_model(str(model_path))
        if len(model.outputs) > 1:
            model = ov.Model([model.output("probability")], model.get_parameters(), "probability")
        model.reshape({model.inputs[0].get_any_name(): shape})
        return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 0, "PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_PRECISION_HINT": "f32"})

    x = np.load(work / "scored.npy")
    valid, labels = np.load(work / "scored_valid.npy"), np.load(work / "scored_label.npy")
    models = {"fp32": asset, "int8": int8_path}
    probability, f1 = {}, {}
    for name, path in models.items():
        batch = 16
        model = compiled(path, [batch, *x.shape[1:]])
        request, parts = model.create_infer_request(), []
        for i in range(0, len(x), batch):
            part = x[i:i + batch]
            padded = np.concatenate([part, np.zeros((batch - len(part),) + part.shape[1:], part.dtype)])
            parts.append(np.array(request.infer({0: padded})[model.output(0)])[:len(part), 0])
        probability[name] = np.concatenate(parts)
        f1[name] = f1_by_unit(probability[name] >= meta["threshold"], labels, valid, meta["units"])
    delta = {u: round(f1["int8"][u] - f1["fp32"][u], 4) for u in f1["fp32"]}
    diff = np.abs(probability["int8"] - probability["fp32"])[valid]
    flips = ((probability["int8"] >= meta["threshold"]) != (probability["fp32"] >= meta["threshold"]))[valid]

    window = np.tile(x[:4], (1, 1, 2, 2))  # 4 real windows at the mapping size, 256 x 256
    timing = {name: {"compile_s": [], "windows_per_s": []} for name in models}
    for _ in range(rounds):
        for name, path in models.items():
            t0 = time.perf_counter()
            model = compiled(path, list(window.shape))
            timing[name]["compile_s"].append(round(time.perf_counter() - t0, 2))
            request = model.create_infer_request()
            request.infer({0: window})
            t0 = time.perf_counter()
            for _ in range(batches):
                request.infer({0: window})
            timing[name]["windows_per_s"].append(round(batches * len(window) / (time.perf_counter() - t0), 2))
    speedup = [round(i / f, 2) for i, f in zip(timing["int8"]["windows_per_s"], timing["fp32"]["windows_per_s"])]
    from menet_qgis.core.inference.runtimes import cpu_features
    features = cpu_features()
    report = {"asset": str(asset), "int8": str(int8_path), "quantize_s": round(quantize_s, 1),
              "calibration_windows": meta["calibration_windows"], "scored_windows": len(x),
              "threshold": meta["threshold"], "f1": f1, "f1_int8_minus_fp32": delta,
              "int8_within_tolerance_on_every_source": all(d >= -F1_TOLERANCE for d in delta.values()),
              "max_abs_diff": float(diff.max()), "class_flips_pct": round(float(100 * flips.mean()), 4),
              "timing": timing, "forward_speedup_per_round": speedup,
              "int8_file_mb": round((int8_path.stat().st_size + int8_path.with_suffix(".bin").stat().st_size) / 1e6, 1),
              "cpu_flags": sorted(features & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16"})}
    print(json.dumps(report, indent=2))
    (work / "int8_study.json").write_text(json.dumps(report, indent=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.int8_study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="(needs torch) calibration and scored windows as model input")
    p.add_argument("--work", default=str(ROOT / "build" / "int8_study"))
    p.add_argument("--model", default=str(ROOT / "resources" / "models" / "menet_coasts_v2.pt"))
    p.add_argument("--calibration", type=int, default=300, help="training windows to calibrate on")
    q = sub.add_parser("quantize", help="(needs nncf, openvino) quantise, score and time")
    q.add_argument("--work", default=str(ROOT / "build" / "int8_study"))
    q.add_argument("--asset", default=str(ROOT / "dist" / "menet_coasts_v2.onnx"))
    q.add_argument("--rounds", type=int, default=3)
    q.add_argument("--batches", type=int, default=3)
    a = parser.parse_args(argv)
    if a.step == "prepare":
        prepare(Path(a.work), Path(a.model), a.calibration)
    else:
        quantize(Path(a.work), Path(a.asset), a.rounds, a.batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
