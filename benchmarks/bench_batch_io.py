"""CPU cost of a scene's non-model work, per megapixel: what bounds batch throughput on GPUs.

On a synthetic Sentinel-2-like DN raster (uint16, deflate, 256² tiles, like a prepared stack):
reading every window as the engine does (256², overlap 64), writing the float32 probability in
strips as the engine's sink thread does (deflate, floating-point predictor), and the batch's COG
translation.  CPU seconds (process time), so a loaded machine inflates them less than wall time.

    .venv/bin/python -m benchmarks.bench_batch_io [--size 2048]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    from menet_qgis.batch.manifest import write_cog
    from menet_qgis.core.inference.tiling import WindowGrid
    from menet_qgis.core.io.raster_io import AtomicRaster, RasterInput, limit_gdal_cache
    from scripts.synthetic_s2 import generate

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_batch_io")
    ap.add_argument("--size", type=int, default=2048)
    args = ap.parse_args()
    limit_gdal_cache()
    tile_mp = 10980 * 10980 / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        src = generate(Path(tmp) / "in.tif", args.size)
        mp = args.size * args.size / 1e6
        source = RasterInput(src)
        grid = WindowGrid(source.height, source.width, 256, 64)
        t = time.process_time()
        for _, y0, x0 in grid:
            source.read(y0, x0, 256)
        read_s = time.process_time() - t
        source.close()
        # probability-like: 64-px patches near 0 or 1 with a little noise (a real map is smoother)
        rng = np.random.default_rng(0)
        patches = np.kron(rng.integers(0, 2, (4, args.size // 64)), np.ones((64, 64)))
        prob = (0.03 + 0.94 * patches + rng.normal(0, 0.02, patches.shape)).clip(0, 1).astype(np.float32)[None]
        t = time.process_time()
        out = AtomicRaster(Path(tmp) / "prob.tif", args.size, args.size, 1, source.crs, source.transform)
        for row in range(0, args.size, 256):
            out.write_rows(row, prob[:, :min(256, args.size - row)])
        out.commit()
        write_s = time.process_time() - t
        t = time.process_time()
        write_cog(Path(tmp) / "prob.tif", Path(tmp) / "cog.tif", {"K": "V"}, threads=1)
        cog_s = time.process_time() - t
        sizes = {"input": src.stat().st_size, "probability GeoTIFF": (Path(tmp) / "prob.tif").stat().st_size,
                 "probability COG": (Path(tmp) / "cog.tif").stat().st_size}
    for name, s in (("read windows (overlap 64)", read_s), ("write probability", write_s), ("COG translate", cog_s)):
        print(f"{name:28s} {s / mp:6.3f} CPU s/MP  -> full 10980² tile {s / mp * tile_mp:6.1f} CPU s")
    for name, b in sizes.items():
        print(f"{name:28s} {b / mp / 2**20:6.3f} MiB/MP   -> full 10980² tile {b / mp * tile_mp / 2**30:6.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
