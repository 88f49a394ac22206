"""Synthetic Sentinel-2-like rasters, up to a full 10980² tile: the `make run` demo input when the
shared data is absent (scripts/run_demo.py) and the generated inputs of benchmarks/.

    python3 scripts/synthetic_s2.py OUT.tif [--size 10980] [--dtype uint16|float32]

Written block by block (memory stays small): uint16 L2A-style DN with the
baseline-04.00 offset tag, or float32 reflectance; 6 named bands; a mosaic of
mangrove-, water-, mud- and pond-like patches with noise; optional NaN/0 border.
"""
import argparse
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

NAMES = ["B2", "B3", "B4", "B8", "B11", "B12"]
CLASSES = np.array([  # reflectance of B2, B3, B4, B8, B11, B12
    [0.03, 0.05, 0.03, 0.28, 0.13, 0.06],   # mangrove
    [0.06, 0.07, 0.05, 0.03, 0.02, 0.01],   # water
    [0.08, 0.10, 0.12, 0.18, 0.25, 0.20],   # mud flat
    [0.05, 0.07, 0.06, 0.06, 0.04, 0.03],   # shrimp pond
], np.float32)


def generate(path, size: int, dtype: str = "uint16", block: int = 512, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    profile = dict(driver="GTiff", width=size, height=size, count=6, dtype=dtype, crs="EPSG:32717",
                   transform=from_origin(600000, 9700000, 10, 10), tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate", BIGTIFF="IF_SAFER", nodata=0 if dtype == "uint16" else None)
    patch = 64
    with rasterio.open(path, "w", **profile) as ds:
        for i, name in enumerate(NAMES, 1):
            ds.set_band_description(i, name)
        if dtype == "uint16":
            ds.update_tags(BOA_ADD_OFFSET="-1000", PROCESSING_BASELINE="05.09")
        for y in range(0, size, block):
            for x in range(0, size, block):
                h, w = min(block, size - y), min(block, size - x)
                labels = rng.integers(0, len(CLASSES), (-(-h // patch), -(-w // patch)))
                labels = np.kron(labels, np.ones((patch, patch), int))[:h, :w]
                refl = CLASSES[labels].transpose(2, 0, 1) + rng.normal(0, 0.01, (6, h, w)).astype(np.float32)
                refl = refl.clip(0.001, 1.0)
                data = np.round(refl * 10000 + 1000).astype("uint16") if dtype == "uint16" else refl
                ds.write(data, window=Window(x, y, w, h))
    return Path(path)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--size", type=int, default=10980)
    p.add_argument("--dtype", choices=["uint16", "float32"], default="uint16")
    a = p.parse_args()
    print(generate(a.out, a.size, a.dtype))
