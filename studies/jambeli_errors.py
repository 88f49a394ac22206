"""Where the models' Jambelí errors lie, and how far two hand-drawn labels of one place agree.

Every model trained here stops near F1 0.93 on the 58 Jambelí validation windows, whatever it starts
from or is trained on.  This asks why, without training anything:

* **Errors by distance to the label's mangrove edge** (<= 1 px, 2 px, farther) for each model given,
  at its stored threshold, and F1 with the 1 px and 2 px edge bands left out: how much of the gap to
  a perfect score is about *where* a mangrove ends (10 m pixels) rather than *whether* it is there.
* **Copies of one footprint whose masks differ**: the Jambelí folder holds files with the same bounds
  (the data README: 41 duplicates).  Where their masks differ: by how much, whether the images differ
  too, and how well each mask agrees with its image's vegetation (the loader's rule for which to keep).

    .venv/bin/python -m studies.jambeli_errors resources/models/menet_coasts_v2.pt \
        resources/models/menet_jambeli_v1.pt --json build/jambeli_errors.json
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np
import rasterio
import torch

from menet_qgis.core.evaluation.metrics import Confusion
from menet_qgis.core.model import checkpoint
from menet_qgis.core.training import data as training_data
from menet_qgis.core.training import train as training
from studies.evaluate_coasts import JAMBELI, SHARED, load

ROOT = Path(__file__).resolve().parents[1]

V1 = ROOT / "resources" / "models" / "menet_jambeli_v1.pt"


def edge_distance_classes(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """0: within 1 px of a label edge, 1: 2 px from it, 2: farther (per pixel, valid pixels only)."""
    near1 = training_data.label_edge_band(labels, 1, valid)
    near2 = training_data.label_edge_band(labels, 2, valid)
    return np.where(near1, 0, np.where(near2, 1, 2))


def model_errors(path: str, names, device) -> dict:
    """Error shares by edge distance and F1 with the edge bands left out, on the named windows."""
    bundle = checkpoint.load(path)
    tiles = load(bundle.recipe, [JAMBELI])
    tiles = tiles.subset([i for i, n in enumerate(tiles.names) if n in names])
    predicted = training.predict_windows(bundle, tiles, device) >= bundle.threshold
    truth, valid = tiles.labels >= 0.5, tiles.valid
    distance = edge_distance_classes(tiles.labels, valid)
    wrong = (predicted != truth) & valid
    errors = int(wrong.sum())
    scores = {}
    for name, keep in (("all pixels", valid), ("edge band 1 px left out", valid & (distance > 0)),
                       ("edge band 2 px left out", valid & (distance > 1))):
        scores[name] = Confusion().add(predicted[keep], truth[keep]).scores()["f1"]
    return {"model": Path(path).name, "threshold": bundle.threshold, "windows": len(tiles), "errors": errors,
            "error_share_within_1px": float((wrong & (distance == 0)).sum() / errors),
            "error_share_at_2px": float((wrong & (distance == 1)).sum() / errors),
            "error_share_farther": float((wrong & (distance == 2)).sum() / errors),
            "pixel_share_within_1px": float((valid & (distance == 0)).sum() / valid.sum()),
            "f1": scores}


def differing_copies(folder: Path, recipe) -> dict:
    """Files with the same bounds whose masks differ: how much, and how well each copy's mask agrees
    with its image's vegetation (``training_data.copy_agreement``, the loader's rule for choosing a copy)."""
    by_place = {}
    for path in sorted(glob.glob(str(folder / "tile_*.tif"))):
        with rasterio.open(path) as ds:
            by_place.setdefault(tuple(round(v, 3) for v in ds.bounds), []).append(path)
    pairs, out = 0, []
    for paths in (p for p in by_place.values() if len(p) > 1):
        copies = []
        for path in paths:
            image, ok, _, _ = training_data._read_reflectance(path, recipe, georeferenced=False)
            with rasterio.open(path.replace("tile_", "mask_")) as ds:
                mask = ds.read(1)
            copies.append((Path(path).name, image, ok & np.isfinite(mask), np.nan_to_num(mask) >= 0.5))
        (name_a, image_a, ok_a, a) = copies[0]
        for name_b, image_b, ok_b, b in copies[1:]:
            pairs += 1
            both = ok_a & ok_b
            if not np.array_equal(a[both], b[both]):
                out.append({"files": [name_a, name_b], "disagreement": float((a[both] != b[both]).mean()),
                            "image_difference": float(np.nanmean(np.abs(image_a - image_b))),
                            "vegetation_f1": [training_data.copy_agreement(image_a, ok_a, a, recipe),
                                              training_data.copy_agreement(image_b, ok_b, b, recipe)]})
    return {"pairs": pairs, "differing": out}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.jambeli_errors", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--json")
    args = parser.parse_args()
    v1 = checkpoint.load(V1)
    names = set(v1.training["val_names"])  # the 58 windows every model is scored on
    result = {"models": [model_errors(m, names, torch.device("cpu")) for m in args.models],
              "copies": differing_copies(SHARED / "jambeli" / "train", v1.recipe)}
    for r in result["models"]:
        print(f"{r['model']} (threshold {r['threshold']:.2f}): errors within 1 px of a label edge "
              f"{r['error_share_within_1px']:.1%}, at 2 px {r['error_share_at_2px']:.1%}, farther "
              f"{r['error_share_farther']:.1%} (1 px band = {r['pixel_share_within_1px']:.1%} of pixels); F1 "
              + ", ".join(f"{k} {v:.4f}" for k, v in r["f1"].items()))
    c = result["copies"]
    print(f"copies of one footprint: {c['pairs']} pairs, {len(c['differing'])} with different masks:")
    for p in c["differing"]:
        print(f"  {' / '.join(p['files'])}: masks differ on {p['disagreement']:.1%} of pixels, images by "
              f"{p['image_difference']:.4f} reflectance; each mask against its image's vegetation: F1 "
              + " / ".join(f"{f:.2f}" for f in p["vegetation_f1"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
