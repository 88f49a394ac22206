"""Benchmarks: how fast the engine, the runtimes and batch run on this machine (nothing here ships).

Interleaved rounds, so that load which comes and goes hits every configuration alike; run from the
checkout's root with the project's environment, e.g.

    .venv/bin/python -m benchmarks.bench --help          (also `make bench BENCH_ARGS=...`)
    .venv/bin/python -m benchmarks.bench_batch           1 vs 2 batch workers on crops of the real scene
    .venv/bin/python -m benchmarks.bench_batch_io        CPU cost of a scene's reading and writing
    .venv/bin/python -m benchmarks.worker_overhead       start-up cost of the out-of-process engine

Synthetic Sentinel-2 rasters come from scripts/synthetic_s2.py (also the `make run` demo input).
"""
