"""How much a threshold chosen on a few labelled windows of a new coast is worth there.

The stored threshold is chosen on validation coasts, but the F1-best threshold differs from coast to
coast (MagSet-2 zone 6: 0.30, zone 3: 0.62, zone 8: 0.79 for the previous, fine-tuned default model).  A user with a few
reference windows on their own coast can choose it there (``assess`` reports the F1-best threshold
of a probability map).  This measures that honestly on the held-out zones: draw ``k`` of a zone's
windows, choose the threshold on them, score the zone's *other* windows at it, repeat; compare with
the stored threshold on the same other windows, and with a random forest (trained on the model's
training windows, as in evaluate_coasts.py) whose threshold is chosen the same way on the same draws.

    .venv/bin/python -m studies.local_threshold_study resources/models/menet_coasts_v2.pt --k 3 5 10
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from menet_qgis.core.evaluation.metrics import LOCAL_THRESHOLD_RANGE, Confusion, ProbabilityCounts
from menet_qgis.core.model import checkpoint
from menet_qgis.core.training import train as training
from studies.evaluate_coasts import JAMBELI, MAGSET2, forest_probability, holdout_of, load, split


def window_counts(prob, tiles):
    """One probability histogram per window (valid pixels only)."""
    out = []
    for i in range(len(tiles)):
        ok = tiles.valid[i]
        out.append(ProbabilityCounts())
        out[-1].add(prob[i][ok], tiles.labels[i][ok] >= 0.5)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.local_threshold_study",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5, 10], help="labelled windows the threshold is chosen on")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args()
    bundle = checkpoint.load(args.model)
    tiles = load(bundle.recipe, [JAMBELI, MAGSET2])
    train_idx, _, test_idx = split(tiles, bundle)
    held = tiles.subset(test_idx)
    prob = {"model": training.predict_windows(bundle, held, torch.device("cpu")), "forest": forest_probability(tiles.subset(train_idx), held)}
    zones = {zone: [i for i, g in enumerate(held.groups) if g == zone] for zone in holdout_of(bundle)}
    result = {"model": args.model, "stored_threshold": bundle.threshold, "draws": args.draws, "k": {}}
    for method, p in prob.items():
        counts = window_counts(p, held)
        rng = np.random.default_rng(0)  # the same draws for every method
        fixed = bundle.threshold if method == "model" else 0.5
        for k in args.k:
            f1 = {name: {"local": [], "fixed": []} for name in [*zones, "pooled"]}
            chosen = {zone: [] for zone in zones}
            for _ in range(args.draws):
                pooled_conf = {"local": Confusion(), "fixed": Confusion()}
                for zone, idx in zones.items():
                    pick = set(rng.choice(idx, size=k, replace=False).tolist())
                    threshold, _ = sum((counts[i] for i in pick), ProbabilityCounts()).best_threshold(*LOCAL_THRESHOLD_RANGE)
                    rest = sum((counts[i] for i in idx if i not in pick), ProbabilityCounts())
                    chosen[zone].append(threshold)
                    for how, t in (("local", threshold), ("fixed", fixed)):
                        conf = rest.confusion(t)
                        f1[zone][how].append(conf.scores()["f1"])
                        pooled_conf[how] += conf
                for how in ("local", "fixed"):
                    f1["pooled"][how].append(pooled_conf[how].scores()["f1"])
            row = {name: {"f1_local_mean": float(np.mean(v["local"])), "f1_local_p10": float(np.percentile(v["local"], 10)),
                          "f1_fixed_mean": float(np.mean(v["fixed"])), "fixed_threshold": fixed}
                   for name, v in f1.items()}
            for zone in zones:
                row[zone]["threshold_median"] = float(np.median(chosen[zone]))
            result["k"].setdefault(k, {})[method] = row
            for name, r in row.items():
                print(f"{method} k={k} {name}: F1 on the other windows with the local threshold {r['f1_local_mean']:.4f} "
                      f"(10th percentile {r['f1_local_p10']:.4f}"
                      + (f", median threshold {r['threshold_median']:.2f}" if "threshold_median" in r else "")
                      + f"); at {fixed:.2f}: {r['f1_fixed_mean']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
