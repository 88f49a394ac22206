"""Batch scaling on this machine: the same scenes with 1 and with 2 worker processes, interleaved.

Each configuration gets its own warm LocalCluster (model preloaded, one warm-up scene), then the
rounds alternate A B / B A so machine noise hits both alike; the ratio of median times is what
counts.  Both configurations use all the cores: 1 worker × N torch threads vs 2 workers × N/2.

    .venv/bin/python -m benchmarks.bench_batch [--scenes 6] [--size 512] [--rounds 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "jambeli" / "scene_2020.tif"
#: Crop origins (row, col) inside the 2020 scene where the pixels are valid.
ORIGINS = [(1536, 0), (1536, 768), (1536, 1536), (1792, 384), (1792, 1152), (1792, 1920), (1920, 768), (1280, 2304)]


def crop(path: Path, row: int, col: int, size: int) -> str:
    """A size² GeoTIFF cut from the 2020 scene (georeferencing, nodata and band names kept)."""
    from osgeo import gdal
    gdal.UseExceptions()
    gdal.Translate(str(path), str(SCENE), srcWin=[col, row, size, size], creationOptions=["COMPRESS=DEFLATE"])
    return str(path)


def main() -> int:
    from distributed import Client

    from menet_qgis.batch.runner import BatchOptions, embedded_cluster, run_batch
    from menet_qgis.model_store import default_model_path

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_batch", description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=6)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--json")
    args = ap.parse_args()
    cpus = len(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp(prefix="menet-bench-batch-"))
    try:
        scenes = [crop(tmp / f"s{i}.tif", *ORIGINS[i % len(ORIGINS)], args.size) for i in range(args.scenes)]
        engine = {"window": 0, "overlap": 64, "device": "cpu"}
        configs = {"1 worker": 1, "2 workers": 2}
        clusters = {}
        for name, n in configs.items():
            cluster = embedded_cluster(n, {})
            client = Client(cluster)
            opts = BatchOptions(engine_options=dict(engine, threads=max(1, cpus // n)), progress=False)
            run_batch(scenes[:1], tmp / f"warm-{n}", args.model, opts, client=client, log=lambda _l: None)
            clusters[name] = (cluster, client, opts)
        times = {name: [] for name in configs}
        for r in range(args.rounds):
            order = list(configs) if r % 2 == 0 else list(configs)[::-1]
            for name in order:
                _cluster, client, opts = clusters[name]
                out = tmp / f"out-{r}-{configs[name]}"
                t0 = time.perf_counter()
                manifest = run_batch(scenes, out, args.model, opts, client=client, log=lambda _l: None)
                seconds = time.perf_counter() - t0
                assert manifest.counts() == {"ok": len(scenes)}, manifest.counts()
                windows = sum(r.windows or 0 for r in manifest.records)
                times[name].append(seconds)
                print(f"round {r + 1} {name:9s} {seconds:7.1f} s  {len(scenes) / seconds * 60:6.2f} scenes/min  "
                      f"{windows / seconds:5.2f} windows/s", flush=True)
        for cluster, client, _ in clusters.values():
            client.close()
            cluster.close()
        med = {name: statistics.median(v) for name, v in times.items()}
        ratio = med["1 worker"] / med["2 workers"]
        print(f"median: 1 worker × {cpus} threads {med['1 worker']:.1f} s, 2 workers × {max(1, cpus // 2)} "
              f"thread(s) {med['2 workers']:.1f} s; speed-up of 2 workers: {ratio:.2f}× "
              f"({args.scenes} scenes of {args.size}², {cpus} cores)")
        if args.json:
            Path(args.json).write_text(json.dumps({"cpus": cpus, "scenes": args.scenes, "size": args.size,
                                                   "times": times, "median": med, "speedup_2_workers": ratio}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
