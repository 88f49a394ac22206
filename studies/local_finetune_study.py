"""How much fine-tuning the model on a few labelled windows of a new coast is worth there.

A user with reference data on their own coast can run *Train ME-Net* with "Fine-tune from model"
(CLI: ``train --init``) on it.  This measures that honestly on the held-out zones: draw ``k`` of a
zone's windows, fine-tune on them as the tool would (its own split: a fifth of them validate, which
chooses the epoch and the threshold), score the zone's *other* windows, repeat.  Beside it, on the
same draws and the same other windows: the model as shipped (stored threshold), the model with a
threshold chosen on the k windows (as studies/local_threshold_study.py), a fine-tune whose channel
statistics are refitted on the k windows (what fine-tuning did before it kept the start's), and the
random forest of evaluate_coasts.py trained on the model's training windows plus the k windows.

    .venv/bin/python -m studies.local_finetune_study resources/models/menet_coasts_v2.pt --k 10 --draws 3
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from menet_qgis.core.evaluation.metrics import LOCAL_THRESHOLD_RANGE, ProbabilityCounts
from menet_qgis.core.model import checkpoint
from menet_qgis.core.training import data as training_data
from menet_qgis.core.training import train as training
from studies.evaluate_coasts import JAMBELI, MAGSET2, by_group, forest_probability, holdout_of, load, split
from studies.local_threshold_study import window_counts

METHODS = ("shipped", "local threshold", "fine-tuned", "fine-tuned, statistics refitted", "forest + local windows")


def confusion(prob, tiles, threshold):
    """Pooled confusion of all of ``tiles``' valid pixels at ``threshold``."""
    return by_group(tiles, prob >= threshold, lambda i: "all")["all"]


def fine_tune(start_path, local, options):
    """The model fine-tuned on ``local`` (each window its own location group, so the tool's split can
    set a fifth of them aside for validation)."""
    local = local.subset(range(len(local)))
    local.groups = [f"{s}:{n}" for s, n in zip(local.sources, local.names)]
    return training.train(local, training.TrainOptions(init_from=str(start_path), **options)).bundle


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.local_finetune_study", description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--k", type=int, default=10, help="labelled windows of the coast")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    bundle = checkpoint.load(args.model)
    tiles = load(bundle.recipe, [JAMBELI, MAGSET2])
    train_idx, _, test_idx = split(tiles, bundle)
    trained_on, held = tiles.subset(train_idx), tiles.subset(test_idx)
    shipped_prob = training.predict_windows(bundle, held, torch.device("cpu"))
    options = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, val_fraction=0.2, device="cpu",
                   head_width=bundle.model.head_width, recipe=bundle.recipe)
    rng = np.random.default_rng(0)
    rows, seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for zone in holdout_of(bundle):
            idx = [i for i, g in enumerate(held.groups) if g == zone]
            for draw in range(args.draws):
                pick = sorted(rng.choice(idx, size=args.k, replace=False).tolist())
                local, rest = held.subset(pick), held.subset([i for i in idx if i not in pick])
                rest_prob = shipped_prob[[i for i in idx if i not in pick]]
                local_threshold, _ = sum(window_counts(shipped_prob[pick], local),
                                          ProbabilityCounts()).best_threshold(*LOCAL_THRESHOLD_RANGE)
                refit = copy.deepcopy(bundle)  # the start's weights with statistics fitted on the k windows
                refit.pca, refit.norm_mean, refit.norm_std = training.fit_statistics(local, recipe=bundle.recipe)
                checkpoint.save(refit, Path(tmp) / "refit.pt")
                t0 = time.perf_counter()
                tuned = fine_tune(args.model, local, dict(options, seed=draw))
                seconds.append(time.perf_counter() - t0)
                tuned_refit = fine_tune(Path(tmp) / "refit.pt", local, dict(options, seed=draw))
                forest = forest_probability(training_data.TileSet.concat([trained_on, local]), rest)
                scores = {
                    "shipped": confusion(rest_prob, rest, bundle.threshold),
                    "local threshold": confusion(rest_prob, rest, local_threshold),
                    "fine-tuned": confusion(training.predict_windows(tuned, rest, torch.device("cpu")), rest,
                                            tuned.threshold),
                    "fine-tuned, statistics refitted": confusion(
                        training.predict_windows(tuned_refit, rest, torch.device("cpu")), rest, tuned_refit.threshold),
                    "forest + local windows": confusion(forest, rest, 0.5)}
                rows.append({"zone": zone, "draw": draw, "windows": [held.names[i] for i in pick],
                             "thresholds": {"stored": bundle.threshold, "local": local_threshold,
                                            "fine-tuned": tuned.threshold, "refitted": tuned_refit.threshold},
                             "confusion": {m: c.__dict__.copy() for m, c in scores.items()},
                             "f1": {m: c.scores()["f1"] for m, c in scores.items()}})
                print(f"{zone} draw {draw}: " + ", ".join(f"{m} {f:.4f}" for m, f in rows[-1]["f1"].items())
                      + f" (thresholds: fine-tuned {tuned.threshold:.2f}, refitted {tuned_refit.threshold:.2f}, "
                      f"local {local_threshold:.2f}; fine-tune {seconds[-1]:.0f} s)", flush=True)
    summary = {}
    for name in [*holdout_of(bundle), "all draws"]:
        chosen = [r for r in rows if name in (r["zone"], "all draws")]
        summary[name] = {m: float(np.mean([r["f1"][m] for r in chosen])) for m in METHODS}
        print(f"{name}, mean of {len(chosen)} draws: " + ", ".join(f"{m} {v:.4f}" for m, v in summary[name].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "k": args.k, "options": {
            k: v for k, v in options.items() if k != "recipe"}, "fine_tune_seconds": seconds,
            "summary": summary, "draws": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
