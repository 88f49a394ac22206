"""Per-run overhead of the out-of-process engine, in interleaved rounds:
bare Python start, + the engine's imports, + loading the default model, and one
whole worker run on a tiny raster (the engine's own time reported apart).  Every
child runs in the checkout (its working folder), as the engine process does.

    .venv/bin/python -m benchmarks.worker_overhead [--python PATH] [--rounds 2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.synthetic_s2 import generate

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = "import menet_qgis.core.inference.engine, menet_qgis.core.model.checkpoint, menet_qgis.core.io.raster_io"
LOAD = IMPORTS + "; from menet_qgis import jobs; jobs.load_model(jobs.resolve_model(None))"


def timed(python, code):
    started = time.perf_counter()
    subprocess.run([python, "-c", code], cwd=ROOT, check=True)
    return time.perf_counter() - started


def worker_run(python, raster, out):
    job = {"job": "extract", "params": {"input": str(raster), "output": str(out),
                                        "options": {"window": 64, "overlap": 0}}}
    started = time.perf_counter()
    proc = subprocess.Popen([python, "-m", "menet_qgis", "worker"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc.stdin.write(json.dumps(job) + "\n")
    proc.stdin.flush()
    lines = proc.stdout.read().splitlines()
    proc.stdin.close()
    proc.wait()
    last = json.loads(lines[-1])
    return time.perf_counter() - started, last["result"]["seconds"]


def main():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker_overhead")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raster = generate(Path(tmp) / "in.tif", 128)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        for r in range(args.rounds):
            start = timed(args.python, "pass")
            imports = timed(args.python, IMPORTS)
            load = timed(args.python, LOAD)
            total, engine = worker_run(args.python, raster, Path(tmp) / f"p{r}.tif")
            print(f"round {r + 1}: python start {start:.2f} s, + imports {imports:.2f} s, + default model "
                  f"{load:.2f} s; whole worker run {total:.2f} s (engine {engine:.2f} s, so "
                  f"{total - engine:.2f} s overhead)")
        print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
