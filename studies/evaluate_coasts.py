"""Per-zone scores of ME-Net models next to a random forest and MVI, on the same pixels.

Rebuilds the split a model was trained with from what it stores (its validation window names and
held-out zones).  For the default model (``scripts/train_default_model.sh``): Jambelí validation =
the v1 model's 58 validation windows, MagSet-2 zone 6 = validation (it chose the epoch and the
threshold), zones 3 and 8 = held out (never trained on, never used to choose).
The forest (100 trees, 8 per-pixel features: B2, B3, B4, B8, B11, NDVI, MNDWI, MVI) is trained on
exactly the model's training windows.  Every method is scored on the valid pixels of each group,
with the raw labels (no edge band removed).  Optional: the v2 model with test-time flips (mean of
the 8 flips/rotations), the Jambelí-only v1 model (Jambelí only: it needs B12), and ``--align N``:
MagSet-2's labels moved onto their images first (``training_data.label_offsets``, up to N px; the forest
then trains on the moved labels too), to see how much of a score is the labels' 1 px misregistration,
and ``--ensemble M ...``: the mean probability of the model and these (e.g. other seeds of its recipe),
thresholded where that mean scores best on the validation windows (held-out zones are not looked at).

    .venv/bin/python -m studies.evaluate_coasts resources/models/menet_coasts_v2.pt \
        --v1 resources/models/menet_jambeli_v1.pt --tta --json out.json --markdown out.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from menet_qgis.core.evaluation import assessment
from menet_qgis.core.evaluation.metrics import Confusion
from menet_qgis.core.model import checkpoint
from menet_qgis.core.model.flips import dihedral, undo_dihedral
from menet_qgis.core.training import data as training_data
from menet_qgis.core.training import train as training

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data"
JAMBELI = f"{SHARED / 'jambeli' / 'train'}:name=jambeli"
MAGSET2 = f"{SHARED / 'magset2' / 'tiles'}:name=magset2,edge_ignore=1,group=tile_(\\d+)_"
VAL_GROUPS, HOLDOUT = ["magset2:6"], ["magset2:3", "magset2:8"]


def load(recipe, sources):
    specs = [training_data.SourceSpec.parse(s) for s in sources]
    return training_data.TileSet.concat([training_data.load_tile_folder(spec.folder, recipe=recipe, spec=spec)
                                         for spec in specs])


def holdout_of(bundle):
    """The zones a model was never trained on nor chose anything with (stored in it; default 3 and 8)."""
    return list(bundle.training.get("holdout_groups") or HOLDOUT)


def split(tiles, bundle):
    """The model's own split: its stored validation windows and held-out zones."""
    return training_data.split_windows(tiles, 0.2, 0, VAL_GROUPS, holdout_of(bundle),
                                       bundle.training.get("val_names", []))


def forest_probability(train_set, tiles):
    """Mangrove probability of the baseline forest (100 trees, seed 0) trained on ``train_set``'s scored pixels
    (valid ones, less those under clouds when the loader looked for them)."""
    forest = assessment.train_random_forest(train_set.images.transpose(1, 0, 2, 3)[:, train_set.scored],
                                            train_set.labels[train_set.scored], 100, 0)
    flat = np.nan_to_num(tiles.images.transpose(1, 0, 2, 3).reshape(tiles.images.shape[1], -1))
    return forest.predict_proba(assessment.pixel_features(flat))[:, 1].reshape(tiles.labels.shape).astype(np.float32)


def tta_probability(bundle, tiles, device):
    """Mean probability over the 8 flips/90° rotations (each undone before averaging)."""
    total = np.zeros(tiles.labels.shape, np.float64)
    for k in range(8):
        moved = tiles.subset(range(len(tiles)))
        moved.images = np.ascontiguousarray(dihedral(tiles.images, k))
        moved.valid = np.ascontiguousarray(dihedral(tiles.valid, k))
        total += undo_dihedral(training.predict_windows(bundle, moved, device), k)
    return (total / 8).astype(np.float32)


def ensemble_probability(prob, members, recipe, tiles, device):
    """Mean of ``prob`` (the first model's) and each member's probability on the same windows."""
    for member in members:
        if member.recipe is not recipe:
            raise SystemExit(f"ensemble members must use channel recipe {recipe.label}, not {member.recipe.label}")
    return (prob + sum(training.predict_windows(m, tiles, device) for m in members)) / (1 + len(members))


def by_group(tiles, values, key_of, kind=Confusion):
    """A ``kind`` per reporting unit (``key_of(i)``; None leaves a window out) over the scored pixels: a
    ``Confusion`` of a boolean prediction (N, H, W), or a ``ProbabilityCounts`` of a probability."""
    out = {}
    scored = tiles.scored
    for i in range(len(tiles)):
        key = key_of(i)
        if key is not None:
            out.setdefault(key, kind()).add(values[i][scored[i]], tiles.labels[i][scored[i]] >= 0.5)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.evaluate_coasts", description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--v1", help="the Jambelí-only v1 model, scored on the Jambelí windows")
    parser.add_argument("--tta", action="store_true", help="also score the model with test-time flips (8x time)")
    parser.add_argument("--align", type=int, default=0,
                        help="score against MagSet-2 labels moved onto their images (up to N px)")
    parser.add_argument("--ensemble", nargs="+", default=[], metavar="MODEL",
                        help="also score the mean probability of the model and these models (same recipe)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    device = torch.device("cpu")
    bundle = checkpoint.load(args.model)
    tiles = load(bundle.recipe, [JAMBELI, MAGSET2 + (f",align={args.align}" if args.align else "")])
    train_idx, val_idx, test_idx = split(tiles, bundle)
    train_set = tiles.subset(train_idx)
    scored = tiles.subset(val_idx + test_idx)
    holdout = holdout_of(bundle)

    def unit(i):
        g = scored.groups[i]
        return "jambeli (validation)" if scored.sources[i] == "jambeli" else \
            f"{g} ({'held out' if g in holdout else 'validation'})"

    rows = {}
    t0 = time.perf_counter()
    prob = training.predict_windows(bundle, scored, device)
    rows[f"ME-Net v2 (threshold {bundle.threshold:.2f})"] = by_group(scored, prob >= bundle.threshold, unit)
    rows["ME-Net v2 at 0.5"] = by_group(scored, prob >= 0.5, unit)
    seconds = {"model": time.perf_counter() - t0}
    if args.tta:
        t0 = time.perf_counter()
        tta = tta_probability(bundle, scored, device)
        seconds["model_tta"] = time.perf_counter() - t0
        rows[f"ME-Net v2 + 8 flips (threshold {bundle.threshold:.2f})"] = by_group(scored, tta >= bundle.threshold, unit)
    if args.ensemble:
        t0 = time.perf_counter()
        mean = ensemble_probability(prob, [checkpoint.load(m) for m in args.ensemble], bundle.recipe, scored, device)
        seconds["ensemble"] = seconds["model"] + time.perf_counter() - t0
        counts = training.ProbabilityCounts()
        for i in (i for i in range(len(scored)) if "validation" in unit(i)):
            counts.add(mean[i][scored.valid[i]], scored.labels[i][scored.valid[i]] >= 0.5)
        threshold, _ = counts.best_threshold()
        rows[f"mean of {1 + len(args.ensemble)} models (threshold {threshold:.2f})"] = by_group(scored, mean >= threshold, unit)
    rf = forest_probability(train_set, scored) > 0.5   # = the forest's predict(): a 0.5 tie is not mangrove
    rows[assessment.forest_label(scored.images.shape[1])] = by_group(scored, rf, unit)
    b = scored.images
    with np.errstate(divide="ignore", invalid="ignore"):
        mvi = assessment.mvi_mangrove(b[:, 1], b[:, 3], b[:, 4])
    rows["MVI 4.5-16.5"] = by_group(scored, mvi, unit)
    if args.v1:
        v1 = checkpoint.load(args.v1)
        jt = load(v1.recipe, [JAMBELI])
        names = set(scored.names[i] for i in range(len(scored)) if scored.sources[i] == "jambeli")
        jv = jt.subset([i for i, n in enumerate(jt.names) if n in names])
        p1 = training.predict_windows(v1, jv, device)
        rows[f"ME-Net v1, Jambelí only (threshold {v1.threshold:.2f})"] = by_group(
            jv, p1 >= v1.threshold, lambda i: "jambeli (validation)")
    units = sorted({u for r in rows.values() for u in r}, key=lambda u: (not u.startswith("jambeli"), u))
    table = {name: {u: r[u].scores() | {"pixels": r[u].total} for u in units if u in r} for name, r in rows.items()}
    new_coasts = {}
    for name, r in rows.items():
        pooled = sum((r[u] for u in units if "held out" in u and u in r), Confusion())
        if pooled.total:
            new_coasts[name] = pooled.scores() | {"pixels": pooled.total}
    result = {"model": args.model, "threshold": bundle.threshold, "align": args.align, "train_windows": len(train_set),
              "scored_windows": len(scored), "seconds": seconds, "table": table, "held_out_pooled": new_coasts}
    lines = ["| method | " + " | ".join(units) + " | held-out zones pooled |", "|---" * (len(units) + 2) + "|"]
    for name, r in table.items():
        cells = [f"{r[u]['f1']:.4f} / {r[u]['iou']:.4f}" if u in r else "—" for u in units]
        pooled = new_coasts.get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {pooled['f1']:.4f} / {pooled['iou']:.4f} |"
                     if pooled else f"| {name} | " + " | ".join(cells) + " | — |")
    text = ("F1 / IoU per zone (valid pixels of each zone's windows" +
            (f"; MagSet-2 labels moved onto their images, up to {args.align} px)" if args.align else ")") +
            "\n\n" + "\n".join(lines))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
