"""Benchmark the runtimes in interleaved rounds: only ratios measured side by side mean anything.

    .venv/bin/python -m benchmarks.bench [--raster PATH | --size N] [--runtimes torch,onnxruntime,openvino]
        [--rounds 3] [--threads N] [--threads-sweep 1,2] [--overlap 64] [--device cpu|cuda] [--json out.json]

Each round runs, one after the other: for every runtime a whole CLI process
(``python -m menet_qgis predict RASTER --runtime R``: GeoTIFF in, probability
GeoTIFF out; its engine windows/s, process wall time and peak RSS), then for
every runtime its forward-only rate in this process (same batch size and
threads, normalised real windows already in memory: the runtime's ceiling),
then torch's naive fp32 batch-1 rate.  A, B, C, A, B, C, ...: load that comes
and goes hits every runtime alike.  Reports medians and per-round ratios:
end-to-end vs the runtime's own forward-only rate, vs the torch path, vs naive;
km²/s and the implied time for a full 10980² tile; the map difference between
each runtime and torch (max |Δp|, % pixels changing class at the model's threshold).
With ``--asset [dist/menet_coasts_v2.onnx]`` it compares the shipped model asset with torch fp32 on
the ``.pt`` it was exported from (``--model``, default resources/models/menet_coasts_v2.pt), in the
same interleaved rounds: torch fp32, ``auto`` (the runtime and precision the engine picks on this
CPU, and why), every other precision ``auto`` can pick on this CPU in OpenVINO, and ONNX Runtime
fp32 (auto's pick without OpenVINO).  Per configuration: the CLI end to end (process wall time and
engine windows/s), forward-only windows/s, in-process load time (file to first batch ready: torch
load, ONNX Runtime session, OpenVINO read + compile), the map difference against torch fp32 and,
with ``--validation``, F1 per source on the model's validation and held-out windows (its own split,
as studies/evaluate_coasts.py rebuilds it).  Prints the CPU's flags that matter and the load average
before and after:

    make bench BENCH_ARGS="--asset --raster /work/shared/data/jambeli/scene_2020.tif --validation"

With ``--memory-sizes 1024,4096`` it instead measures peak RSS on generated
rasters of those sizes (flat memory): of the CLI, or with ``--memory-via
qgis_process`` of ``qgis_process run menet:extractmangroves`` plus its engine
worker (``make bench BENCH_ARGS="--memory-sizes 1024,4096 --memory-via qgis_process"``).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from menet_qgis.options import RUNTIMES
from menet_qgis.core.inference import runtimes
from menet_qgis.core.inference.engine import THRESHOLD_TAG
from menet_qgis.core.inference.tiling import WindowGrid
from menet_qgis.options import DEFAULT_OVERLAP
from menet_qgis.core.io import raster_io
from menet_qgis.model_store import default_model_path
from scripts.synthetic_s2 import generate

ROOT = Path(__file__).resolve().parents[1]

FULL_TILE = 10980


#: Runs the CLI and prints the process's own peak RSS (VmHWM) last on stderr.  Not the
#: rusage of wait4: Linux carries the parent's peak over fork + exec into the child's ru_maxrss.
CLI_WITH_PEAK_RSS = ("import runpy, sys\nsys.argv[0] = 'menet_qgis'\ntry:\n"
                     "    runpy.run_module('menet_qgis', run_name='__main__')\nfinally:\n"
                     "    print('VmHWM_kB', open('/proc/self/status').read().split('VmHWM:')[1].split()[0], "
                     "file=sys.stderr)\n")


def run_cli(raster, out_dir, runtime, a, extra=(), model=None):
    """One whole `predict` process; returns its summary plus wall time and peak RSS (MB)."""
    cmd = [sys.executable, "-c", CLI_WITH_PEAK_RSS, "predict", str(raster), "--out-dir", str(out_dir), "--quiet",
           "--runtime", runtime, "--device", a.device, "--overlap", str(a.overlap), "--window", str(a.window),
           "--threads", str(a.threads), "--batch-size", str(a.batch_size), *extra]
    if model or a.model:
        cmd += ["--model", str(model or a.model)]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "stdout.json", "w") as out, open(out_dir / "stderr.txt", "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=out, stderr=err, cwd=ROOT)
        wall = time.perf_counter() - t0
    log = (out_dir / "stderr.txt").read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed: {log[-2000:]}")
    peak_kb = int(log.rsplit("VmHWM_kB", 1)[1].split()[0])
    summary = json.loads((out_dir / "stdout.json").read_text())[0]
    return {"engine_s": summary["seconds"], "windows_run": summary["windows_run"], "wall_s": round(wall, 2),
            "peak_rss_mb": round(peak_kb / 1024), "device": summary["device"],
            "batch_size": summary["batch_size"], "probability": summary["probability"],
            "windows_per_s": summary["windows_run"] / max(summary["seconds"], 1e-9)}


def real_input(raster, bundle, window: int, batch: int) -> np.ndarray:
    """``batch`` normalised windows from the raster (the most valid ones near its centre)."""
    source = raster_io.RasterInput(raster)
    grid = WindowGrid(source.height, source.width, window, 0)
    picked = []
    for _, y0, x0 in grid:
        data, valid = source.read(y0, x0, window)
        if valid.mean() > 0.5:
            picked.append((data, valid))
        if len(picked) == batch:
            break
    while len(picked) < batch:
        picked.append(picked[-1] if picked else source.read(0, 0, window))
    source.close()
    raw, valid = np.stack([p[0] for p in picked]), np.stack([p[1] for p in picked])
    return runtimes.prepare_batch_numpy(raw, valid, bundle, source.plan)


class ForwardOnly:
    """A runtime's model alone on ready input: its ceiling at this batch size and thread count."""

    def __init__(self, runtime, bundle, x, threads, device):
        self.runtime, self.x, self.threads = runtime, x, threads
        if runtime == "torch":
            import torch
            self.torch = torch
            self.device = torch.device("cuda" if device == "cuda" else "cpu")
            self.model = bundle.model.to(self.device).eval().to(memory_format=torch.channels_last)
            self.xt = torch.from_numpy(x).to(self.device).contiguous(memory_format=torch.channels_last)
        else:
            onnx_model = runtimes.ensure_onnx(bundle, "probability")
            self.runner = runtimes.RUNNERS[runtime](onnx_model, [], "compact", threads, "fp32")
            self.runner.prepare(x.shape[0], x.shape[-1])

    def step(self):
        if self.runtime == "torch":
            torch = self.torch
            if self.threads and self.device.type == "cpu":
                torch.set_num_threads(self.threads)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16,
                                                        enabled=self.device.type == "cuda"):
                torch.sigmoid(self.model(self.xt)).cpu()
        else:
            self.runner.infer(self.x, self.x.shape[0])

    def rate(self, batches: int) -> float:
        self.step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(batches):
            self.step()
        return batches * self.x.shape[0] / (time.perf_counter() - t0)


def naive_rate(bundle, x, count: int, threads: int) -> float:
    """The plain way: torch, fp32, one window at a time, contiguous memory."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    model = bundle.model.float().to(memory_format=torch.contiguous_format).eval()
    one = torch.from_numpy(x[:1].copy())
    with torch.inference_mode():
        model(one)
        t0 = time.perf_counter()
        for _ in range(count):
            model(one)
    return count / (time.perf_counter() - t0)


def map_difference(a_path, b_path):
    """Max |Δp| and the % of pixels on the other side of the model's threshold (stored in the map)."""
    with raster_io.rasterio.open(a_path) as da, raster_io.rasterio.open(b_path) as db:
        a, b = da.read(1), db.read(1)
        threshold = float(db.tags().get(THRESHOLD_TAG, 0.5))
    both = np.isfinite(a) & np.isfinite(b)
    return {"max_abs_diff": float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0,
            "threshold": threshold,
            "class_flips_pct": float(100.0 * ((a[both] >= threshold) != (b[both] >= threshold)).mean())
            if both.any() else 0.0,
            "same_nodata": bool(np.array_equal(np.isnan(a), np.isnan(b)))}


def median(values):
    return round(statistics.median(values), 3) if values else None


QGIS_PROCESS = "/usr/bin/qgis_process.bin"  # Debian's wrapper passes --noversioncheck, which 3.22 rejects


def vm_hwm_mb(pid: int):
    """Peak RSS so far of a live process (VmHWM only grows), or None once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return int(status.read().split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return None


def run_qgis_process(raster, out_dir, runtime, a):
    """One `qgis_process run menet:extractmangroves`: the QGIS process's peak RSS (its VmHWM, polled
    every 50 ms until it exits) and the engine worker's own peak, which the worker logs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [QGIS_PROCESS, "run", "menet:extractmangroves", "--", f"INPUT={raster}",
           f"OUTPUT={out_dir / 'probability.tif'}", f"RUNTIME={RUNTIMES.index(runtime)}",
           f"OVERLAP={a.overlap}", f"THREADS={a.threads}"]
    if a.model:
        cmd.append(f"MODEL={a.model}")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    t0 = time.perf_counter()
    with open(out_dir / "qgis_process.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        qgis_peak = 0.0
        while proc.poll() is None:
            qgis_peak = max(qgis_peak, vm_hwm_mb(proc.pid) or 0.0)
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    text = (out_dir / "qgis_process.log").read_text()
    if proc.returncode != 0 or "engine process peak memory:" not in text:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {text[-2000:]}")
    worker_peak = int(text.rsplit("engine process peak memory:", 1)[1].split()[0])
    return {"qgis_process_peak_rss_mb": round(qgis_peak), "worker_peak_rss_mb": worker_peak,
            "peak_rss_mb": round(qgis_peak) + worker_peak, "wall_s": round(wall, 2)}


def memory_mode(a, work) -> int:
    """Peak RSS on generated rasters of growing size: flat memory means the largest costs about what
    the smallest does.  ``--memory-via qgis_process`` measures it inside QGIS (its process + the
    engine worker, summed: an upper bound of the two at once)."""
    rows = []
    for size in a.memory_sizes:
        raster = work / f"synthetic_{size}.tif"
        if not raster.exists():
            generate(raster, size)
        runtime = a.runtimes[0]
        if a.memory_via == "qgis_process":
            res = run_qgis_process(raster, work / f"mem_qgis_{size}", runtime, a)
        else:
            res = run_cli(raster, work / f"mem_{size}", runtime, a)
            res = {k: res[k] for k in ("peak_rss_mb", "wall_s", "engine_s", "windows_run")}
        rows.append({"size": size, "runtime": runtime, "via": a.memory_via, **res})
        print(json.dumps(rows[-1]), file=sys.stderr)
    report = {"mode": "memory", "via": a.memory_via, "rows": rows,
              "rss_ratio_largest_to_smallest": round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3)}
    print(json.dumps(report, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


# --- the model asset against torch fp32 ------------------------------------------------------
CPU_FLAGS_OF_NOTE = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                     "amx_int8")


class Config:
    """One way of mapping: a model file, a runtime and a precision (``auto`` as the engine resolves it)."""

    def __init__(self, label, model, runtime, precision):
        self.label, self.model, self.runtime, self.precision = label, Path(model), runtime, precision

    def resolved(self):
        """(runtime, precision, why) the engine runs for this configuration on this machine."""
        runtime, why = runtimes.choose_runtime(self.runtime, "cpu", "onnx" if self.model.suffix == ".onnx" else "file")
        if runtime == "torch":
            return runtime, "fp32" if self.precision in ("auto", "fp32") else self.precision, why
        precision, precision_why = runtimes.cpu_precision(runtime, self.precision)
        return runtime, precision, f"{why}; precision: {precision_why}"


def asset_configs(asset: Path, checkpoint_path: Path):
    """torch fp32 on the .pt, auto on the asset, every other precision auto can pick here, ONNX Runtime."""
    configs = [Config("torch fp32 (.pt)", checkpoint_path, "torch", "fp32"), Config("auto (.onnx)", asset, "auto", "auto")]
    auto_runtime, auto_precision, _ = configs[1].resolved()
    if runtimes.installed("openvino"):
        pickable = {runtimes.auto_cpu_precision("openvino", runtimes.cpu_features())[0], "fp32"}
        configs += [Config(f"openvino {p} (.onnx)", asset, "openvino", p) for p in sorted(pickable)
                    if (auto_runtime, auto_precision) != ("openvino", p)]
    if runtimes.installed("onnxruntime") and auto_runtime != "onnxruntime":
        configs.append(Config("onnxruntime fp32 (.onnx)", asset, "onnxruntime", "fp32"))
    return configs


class AssetRunner:
    """A configuration in this process: its load time and forward-only rate on ready input."""

    def __init__(self, config, threads, batch, window):
        self.config, self.threads, self.batch, self.window = config, threads, batch, window
        self.runtime, self.precision, _ = config.resolved()

    def load(self):
        """Seconds from the file to a model ready for the first batch (no cache between rounds)."""
        t0 = time.perf_counter()
        if self.runtime == "torch":
            import torch
            from menet_qgis.core.model import checkpoint
            torch.set_num_threads(self.threads)
            bundle = checkpoint.load(self.config.model)
            self.model = bundle.model.eval().to(memory_format=torch.channels_last)
            self.bundle = bundle
        else:
            runtimes._CACHE.clear()
            self.bundle = runtimes.read_onnx_model(self.config.model)
            self.runner = runtimes.open_onnx_runner(self.runtime, self.bundle, [], "compact", self.threads,
                                                    self.precision)
            self.runner.prepare(self.batch, self.window)
        return time.perf_counter() - t0

    def infer(self, x):
        if self.runtime == "torch":
            import torch
            with torch.inference_mode():
                return torch.sigmoid(self.model(torch.from_numpy(x).contiguous(
                    memory_format=torch.channels_last)))[:, 0].numpy()
        return self.runner.infer(x, self.batch)["probability"][:, 0]

    def rate(self, x, batches):
        self.infer(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(batches):
            self.infer(x)
        return batches * x.shape[0] / (time.perf_counter() - t0)


def validation_f1(runner: AssetRunner, bundle, tiles, batch: int):
    """F1 per source (and pooled held-out zones) on ``tiles``; returns it and the probabilities."""
    from studies import evaluate_coasts
    from menet_qgis.core.evaluation.metrics import Confusion
    from menet_qgis.core.training.train import _reflectance_plan
    plan = _reflectance_plan(tiles.images.shape[1])
    prob = np.empty(tiles.labels.shape, np.float32)
    for i in range(0, len(tiles), batch):
        raw, valid = np.nan_to_num(tiles.images[i:i + batch]), tiles.valid[i:i + batch]
        x = runtimes.prepare_batch_numpy(raw, valid, runner.bundle, plan)
        prob[i:i + batch] = runner.infer(x)
    holdout = evaluate_coasts.holdout_of(bundle)

    def unit(i):
        g = tiles.groups[i]
        return "jambeli (validation)" if tiles.sources[i] == "jambeli" else \
            f"{g} ({'held out' if g in holdout else 'validation'})"

    groups = evaluate_coasts.by_group(tiles, prob >= bundle.threshold, unit)
    groups["held-out zones pooled"] = sum((c for u, c in groups.items() if "held out" in u), Confusion())
    return {u: round(c.scores()["f1"], 4) for u, c in sorted(groups.items())}, prob


def scored_tiles(bundle):
    """The checkpoint's own validation and held-out windows (its stored split, as evaluate_coasts rebuilds it)."""
    from studies import evaluate_coasts
    tiles = evaluate_coasts.load(bundle.recipe, [evaluate_coasts.JAMBELI, evaluate_coasts.MAGSET2])
    _train, val, test = evaluate_coasts.split(tiles, bundle)
    return tiles.subset(val + test)


def cpu_description():
    features = runtimes.cpu_features()
    name = ""
    try:
        name = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"model": name, "cores_usable": runtimes.default_threads(),
            "flags_of_note": [f for f in CPU_FLAGS_OF_NOTE if f in features],
            "absent": [f for f in CPU_FLAGS_OF_NOTE if f not in features]}


def asset_mode(a, work) -> int:
    """The asset against torch fp32, interleaved: see the module docstring."""
    from menet_qgis.core.model import checkpoint
    asset = Path(a.asset)
    pt = Path(a.model) if a.model else ROOT / "resources" / "models" / "menet_coasts_v2.pt"
    if not asset.is_file():
        raise SystemExit(f"bench: no {asset}: run `make package` first")
    raster = Path(a.raster) if a.raster else work / f"synthetic_{a.size}.tif"
    if not raster.exists():
        generate(raster, a.size)
    load_before = os.getloadavg()
    configs = asset_configs(asset, pt)
    bundle = checkpoint.load(pt)
    batch = a.batch_size or 4
    threads = a.threads or runtimes.default_threads()
    x = real_input(raster, bundle, a.window, batch)
    runners = [AssetRunner(c, threads, batch, a.window) for c in configs]
    rounds = []
    for i in range(a.rounds):
        row = {"e2e": {}, "forward": {}, "load_s": {}}
        for c in configs:
            row["e2e"][c.label] = run_cli(raster, work / f"round{i}_{c.runtime}_{c.precision}", c.runtime, a,
                                          ["--precision", c.precision], model=c.model)
            print(f"round {i + 1} {c.label}: wall {row['e2e'][c.label]['wall_s']} s, engine "
                  f"{row['e2e'][c.label]['windows_per_s']:.2f} windows/s", file=sys.stderr)
        for r in runners:
            row["load_s"][r.config.label] = r.load()
            row["forward"][r.config.label] = r.rate(x, a.forward_batches)
        print(f"round {i + 1} forward-only: " + ", ".join(f"{k} {v:.2f}" for k, v in row["forward"].items()),
              file=sys.stderr)
        rounds.append(row)
    torch_label = configs[0].label
    summary = {}
    for c in configs:
        runtime, precision, why = c.resolved()
        entry = {"runtime": runtime, "precision": precision, "why": why,
                 "model_file_mb": round(c.model.stat().st_size / 1e6, 2),
                 "process_wall_s": median([rd["e2e"][c.label]["wall_s"] for rd in rounds]),
                 "engine_windows_per_s": median([rd["e2e"][c.label]["windows_per_s"] for rd in rounds]),
                 "forward_only_windows_per_s": median([rd["forward"][c.label] for rd in rounds]),
                 "load_s": median([rd["load_s"][c.label] for rd in rounds]),
                 "peak_rss_mb": max(rd["e2e"][c.label]["peak_rss_mb"] for rd in rounds)}
        if c.label != torch_label:
            entry["wall_speedup_vs_torch_per_round"] = [round(rd["e2e"][torch_label]["wall_s"] / rd["e2e"][c.label]["wall_s"], 3)
                                                        for rd in rounds]
            entry["engine_speedup_vs_torch_per_round"] = [
                round(rd["e2e"][c.label]["windows_per_s"] / rd["e2e"][torch_label]["windows_per_s"], 3) for rd in rounds]
            entry["forward_speedup_vs_torch_per_round"] = [round(rd["forward"][c.label] / rd["forward"][torch_label], 3)
                                                           for rd in rounds]
            entry["map_vs_torch_fp32"] = map_difference(rounds[-1]["e2e"][c.label]["probability"],
                                                        rounds[-1]["e2e"][torch_label]["probability"])
        summary[c.label] = entry
    if a.validation:
        want, tiles = None, scored_tiles(bundle)
        for r in runners:
            f1, prob = validation_f1(r, bundle, tiles, batch)
            summary[r.config.label]["validation_f1"] = f1
            if want is None:
                want = prob
            else:
                valid = tiles.valid
                summary[r.config.label]["validation_windows_vs_torch"] = {
                    "max_abs_diff": float(np.abs(prob - want)[valid].max()),
                    "class_flips_pct": float(100 * ((prob >= bundle.threshold) != (want >= bundle.threshold))[valid].mean())}
        report_extra = {"validation_windows": len(tiles)}
    else:
        report_extra = {}
    with raster_io.rasterio.open(raster) as ds:
        size = f"{ds.width} x {ds.height} px"
    report = {"mode": "asset", "raster": str(raster), "raster_size": size, "window": a.window,
              "overlap": a.overlap, "rounds": a.rounds, "threads": threads, "batch_size": batch,
              "cpu": cpu_description(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "asset": str(asset), "checkpoint": str(pt), **report_extra, "summary": summary, "per_round": rounds}
    print(json.dumps({k: v for k, v in report.items() if k != "per_round"}, indent=2))
    print(markdown_table(report), file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


def markdown_table(report) -> str:
    """The README's table: one row per configuration, ratios as per-round ranges."""
    def span(values):
        return f"{min(values):.2f}–{max(values):.2f}×" if values else "1"
    lines = ["| configuration | runs as | end to end (s) | vs torch | engine windows/s | forward windows/s | "
             "vs torch | load (s) | max abs Δp | class flips | validation F1 (pooled held-out) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, e in report["summary"].items():
        diff = e.get("map_vs_torch_fp32")
        max_diff = f"{diff['max_abs_diff']:.1e}" if diff else "—"
        flips = f"{diff['class_flips_pct']:.4f} %" if diff else "—"
        f1 = e.get("validation_f1", {}).get("held-out zones pooled", "—")
        lines.append(f"| {label} | {e['runtime']} {e['precision']} | {e['process_wall_s']} | "
                     f"{span(e.get('wall_speedup_vs_torch_per_round', []))} | {e['engine_windows_per_s']} | "
                     f"{e['forward_only_windows_per_s']} | {span(e.get('forward_speedup_vs_torch_per_round', []))} | "
                     f"{e['load_s']} | {max_diff} | {flips} | {f1} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raster", help="input raster (default: a generated one of --size)")
    p.add_argument("--size", type=int, default=1024, help="side of the generated raster (10980 = a full tile)")
    p.add_argument("--model", help="checkpoint (default: the shipped model)")
    p.add_argument("--runtimes", default="torch,onnxruntime,openvino",
                   type=lambda t: [r for r in t.split(",") if r], help="runtimes to compare; torch first")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=0, help="0 = the engine's automatic size")
    p.add_argument("--threads", type=int, default=0, help="0 = the runtimes' default")
    p.add_argument("--threads-sweep", type=lambda t: [int(v) for v in t.split(",") if v], default=[],
                   help="also measure forward-only rates at these thread counts (same rounds)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP)
    p.add_argument("--forward-batches", type=int, default=3)
    p.add_argument("--naive-windows", type=int, default=4)
    p.add_argument("--memory-sizes", type=lambda t: [int(v) for v in t.split(",") if v], default=[],
                   help="peak-RSS mode: generated rasters of these sizes")
    p.add_argument("--memory-via", choices=("cli", "qgis_process"), default="cli",
                   help="peak-RSS mode through the CLI or through qgis_process (run it via `make bench`, "
                        "which stages the plugin)")
    p.add_argument("--asset", nargs="?", const=str(ROOT / "dist" / "menet_coasts_v2.onnx"),
                   help="compare this model asset (default: dist/menet_coasts_v2.onnx) with torch fp32 on --model")
    p.add_argument("--validation", action="store_true",
                   help="with --asset: also F1 per source on the model's validation and held-out windows")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--workdir", help="where generated rasters and outputs go (default: a temp folder)")
    a = p.parse_args(argv)

    work = Path(a.workdir or tempfile.mkdtemp(prefix="menet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.memory_sizes:
        return memory_mode(a, work)
    if a.asset:
        return asset_mode(a, work)
    raster = Path(a.raster) if a.raster else work / f"synthetic_{a.size}.tif"
    if not raster.exists():
        generate(raster, a.size)
    from menet_qgis.core.model import checkpoint
    model_path = Path(a.model) if a.model else default_model_path()
    bundle = checkpoint.load(model_path)
    batch = a.batch_size or 4
    x = real_input(raster, bundle, a.window, batch)
    threads = a.threads or runtimes.default_threads()
    forward = {(r, threads): ForwardOnly(r, bundle, x, threads, a.device) for r in a.runtimes}
    for r in a.runtimes:
        for t in a.threads_sweep:
            forward.setdefault((r, t), ForwardOnly(r, bundle, x, t, a.device))
    with raster_io.rasterio.open(raster) as ds:
        pixel_km2 = abs(ds.transform.a * ds.transform.e) / 1e6
    stride = a.window - a.overlap
    tile_windows = len(WindowGrid(FULL_TILE, FULL_TILE, a.window, a.overlap))

    rounds = []
    for i in range(a.rounds):
        row = {"e2e": {}, "forward": {}}
        for r in a.runtimes:
            row["e2e"][r] = run_cli(raster, work / f"round{i}_{r}", r, a)
            print(f"round {i + 1} {r}: end-to-end {row['e2e'][r]['windows_per_s']:.2f} windows/s, "
                  f"wall {row['e2e'][r]['wall_s']} s", file=sys.stderr)
        for (r, t), fw in forward.items():
            row["forward"][f"{r}@{t}"] = fw.rate(a.forward_batches)
        row["naive_torch_fp32_batch1"] = naive_rate(bundle, x, a.naive_windows, threads)
        print(f"round {i + 1} forward-only: " + ", ".join(f"{k} {v:.2f}" for k, v in row["forward"].items())
              + f"; naive {row['naive_torch_fp32_batch1']:.2f} windows/s", file=sys.stderr)
        rounds.append(row)

    last = rounds[-1]["e2e"]
    summary = {}
    for r in a.runtimes:
        e2e = [rd["e2e"][r]["windows_per_s"] for rd in rounds]
        fwd = [rd["forward"][f"{r}@{threads}"] for rd in rounds]
        entry = {
            "device": last[r]["device"], "batch_size": last[r]["batch_size"], "windows_run": last[r]["windows_run"],
            "end_to_end_windows_per_s": median(e2e), "forward_only_windows_per_s": median(fwd),
            "e2e_over_forward_per_round": [round(e / f, 3) for e, f in zip(e2e, fwd)],
            "e2e_over_naive_per_round": [round(rd["e2e"][r]["windows_per_s"] / rd["naive_torch_fp32_batch1"], 3)
                                         for rd in rounds],
            "process_wall_s": median([rd["e2e"][r]["wall_s"] for rd in rounds]),
            "peak_rss_mb": max(rd["e2e"][r]["peak_rss_mb"] for rd in rounds),
            "km2_per_s": round(median(e2e) * stride * stride * pixel_km2, 3),
            "full_tile_s_implied": round(tile_windows / median(e2e)),
        }
        if r != "torch" and "torch" in a.runtimes:
            entry["e2e_over_torch_per_round"] = [round(rd["e2e"][r]["windows_per_s"] / rd["e2e"]["torch"]["windows_per_s"], 3)
                                                 for rd in rounds]
            entry["wall_over_torch_per_round"] = [round(rd["e2e"]["torch"]["wall_s"] / rd["e2e"][r]["wall_s"], 3)
                                                  for rd in rounds]
            entry["map_vs_torch"] = map_difference(last[r]["probability"], last["torch"]["probability"])
        for key in ("e2e_over_forward_per_round", "e2e_over_naive_per_round", "e2e_over_torch_per_round",
                    "wall_over_torch_per_round"):
            if key in entry:
                entry[key.replace("_per_round", "_median")] = median(entry[key])
        summary[r] = entry
    sweep = {k: median([rd["forward"][k] for rd in rounds]) for k in rounds[0]["forward"]}
    report = {"raster": str(raster), "window": a.window, "overlap": a.overlap, "rounds": a.rounds,
              "threads": threads, "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
              "naive_torch_fp32_batch1_windows_per_s": median([rd["naive_torch_fp32_batch1"] for rd in rounds]),
              "forward_only_median_by_runtime_and_threads": sweep,
              "full_tile_windows": tile_windows, "summary": summary, "per_round": rounds}
    print(json.dumps({k: v for k, v in report.items() if k != "per_round"}, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
