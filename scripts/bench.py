"""Benchmark: end-to-end windows/s vs the model's forward-only ceiling, memory, device.

    .venv/bin/python scripts/bench.py [--raster PATH | --size N] [--batch-size B] [--device auto|cpu|cuda]

Measures, in one run and on one device: end-to-end extraction (GeoTIFF in ->
probability GeoTIFF out) in windows/s and wall time, then the forward-only rate
of the same model at the same batch size with inputs already on the device
(the ceiling), their ratio, the naive fp32 batch-1 rate, peak resident memory
of the end-to-end phase, peak GPU memory and the device name.  Prints a table
and writes JSON (--json).
"""
import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from menet_qgis.core import checkpoint, engine, raster_io  # noqa: E402
from menet_qgis.core.device import auto_batch_size, choose_device  # noqa: E402
from menet_qgis.resources import default_model_path  # noqa: E402
from synthetic_s2 import generate  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def forward_rate(bundle, device, batch: int, window: int, seconds: float) -> float:
    """Windows/s of the model alone, input already on the device, same precision as the engine."""
    model = bundle.model.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 11, window, window, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model.forward_with_stages(x)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2:
        step()
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - t0)


def naive_rate(bundle, device, window: int, count: int) -> float:
    """The question's way: fp32, one window at a time, contiguous memory."""
    model = bundle.model.to(device).float().to(memory_format=torch.contiguous_format).eval()
    x = torch.randn(1, 11, window, window, device=device)
    with torch.inference_mode():
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(count):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return count / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raster", help="input raster (default: a generated one of --size)")
    p.add_argument("--size", type=int, default=2048, help="side of the generated raster (10980 = a full tile)")
    p.add_argument("--model", help="checkpoint (default: the shipped model, else untrained)")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--overlap", type=int, default=0, help="0 for the rate comparison: every window is new pixels")
    p.add_argument("--forward-seconds", type=float, default=20.0)
    p.add_argument("--naive-windows", type=int, default=10)
    p.add_argument("--json", help="write the result here")
    p.add_argument("--workdir", help="where generated rasters and outputs go (default: a temp folder)")
    a = p.parse_args(argv)

    raster_io.limit_gdal_cache()  # as the CLI does (GDAL_CACHEMAX in the environment wins)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="menet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    raster = Path(a.raster) if a.raster else work / f"synthetic_{a.size}.tif"
    if not raster.exists():
        t0 = time.perf_counter()
        generate(raster, a.size)
        print(f"generated {raster} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    model_path = Path(a.model) if a.model else default_model_path()
    bundle = checkpoint.load(model_path) if model_path.is_file() else checkpoint.new_bundle(seed=0)
    device, device_text = choose_device(a.device)
    batch = a.batch_size or auto_batch_size(device, a.window)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    source = raster_io.RasterInput(raster)
    options = engine.EngineOptions(window=a.window, overlap=a.overlap, batch_size=batch, device=a.device)
    t0 = time.perf_counter()
    result = engine.extract(bundle, source, work / "bench_probability.tif", options)
    wall = time.perf_counter() - t0
    e2e_rss = peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    e2e_rate = result.windows_run / wall
    ceiling = forward_rate(bundle, device, result.batch_size, a.window, a.forward_seconds)
    naive = naive_rate(bundle, device, a.window, a.naive_windows)
    report = {
        "device": device_text, "raster": str(raster), "width": source.width, "height": source.height,
        "windows": result.windows, "windows_run": result.windows_run, "window": a.window, "overlap": a.overlap,
        "batch_size": result.batch_size, "threads": torch.get_num_threads(),
        "end_to_end_windows_per_s": round(e2e_rate, 2), "forward_only_windows_per_s": round(ceiling, 2),
        "ratio": round(e2e_rate / ceiling, 3), "naive_fp32_batch1_windows_per_s": round(naive, 2),
        "wall_s": round(wall, 1), "peak_rss_mb_end_to_end": round(e2e_rss), "peak_gpu_mb": gpu_peak and round(gpu_peak),
    }
    width = max(len(k) for k in report)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in report.items()))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
