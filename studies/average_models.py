"""Average the weights of ME-Net models fine-tuned from one start ("model soup"), re-choose the threshold.

Models fine-tuned from the same weights on the same windows with different settings stay close to
each other, and the uniform average of their weights often scores better than each of them, on new
data too (Wortsman et al., ICML 2022, "Model soups"), at no cost when mapping: the result is one
model of the same size.  `--weights` gives a weighted average instead: a model and a copy of it
fine-tuned on one coast, mixed (1 - a, a), keep much of what the first knew elsewhere while taking
what the second learned there (Wortsman et al., CVPR 2022, "Robust fine-tuning of zero-shot models",
WiSE-FT).  The models must share architecture, channel recipe, PCA and normalisation
(the same training windows, as every run of studies/ablate_coasts.sh has, or a fine-tune of the
first model, which keeps its statistics; the first model's are kept).  The decision
threshold is chosen again on the validation windows the first model was chosen on (Jambelí
validation + MagSet-2 zone 6, rebuilt as studies/evaluate_coasts.py does); held-out zones are not
looked at.

    .venv/bin/python -m studies.average_models A.pt B.pt [C.pt ...] [--weights 0.5 0.5 ...] --out soup.pt
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from menet_qgis.core.model import checkpoint
from menet_qgis.core.training import train as training
from studies.evaluate_coasts import JAMBELI, MAGSET2, load, split


def same_inputs(a, b) -> bool:
    """Same architecture and recipe, PCA and normalisation within 1 % (runs whose labels differ, e.g.
    align=, fit them on slightly different valid pixels): the weights then mean the same thing."""
    def close(x, y):
        return np.allclose(x, y, rtol=1e-2, atol=1e-3)
    return (a.model.architecture_record() == b.model.architecture_record() and a.recipe is b.recipe
            and close(a.norm_mean, b.norm_mean) and close(a.norm_std, b.norm_std)
            and close(a.pca.mean, b.pca.mean) and close(a.pca.component, b.pca.component))


def average(bundles, shares):
    """A copy of the first bundle holding the mean of every floating-point weight weighted by
    ``shares`` (summing to 1; batch-norm running statistics included; integer counters are the first
    model's)."""
    states = [b.model.state_dict() for b in bundles]
    w = torch.tensor(shares, dtype=torch.float32)
    mean = {k: (torch.einsum("m,m...->...", w, torch.stack([s[k].float() for s in states]))
                if v.is_floating_point() else v)
            for k, v in states[0].items()}
    soup = copy.deepcopy(bundles[0])
    soup.model.load_state_dict(mean)
    soup.model.eval()
    return soup


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.average_models", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--weights", nargs="+", type=float, metavar="W",
                        help="one non-negative weight per model (normalised to sum 1; default: equal)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if len(args.models) < 2:
        parser.error("give at least two models")
    if args.weights is not None and (len(args.weights) != len(args.models) or min(args.weights) < 0
                                     or sum(args.weights) <= 0):
        parser.error("--weights: one non-negative weight per model, not all zero")
    bundles = [checkpoint.load(m) for m in args.models]
    for path, b in zip(args.models[1:], bundles[1:]):
        if not same_inputs(bundles[0], b):
            parser.error(f"{path} differs from {args.models[0]} in architecture, recipe, PCA or normalisation")
    weights = args.weights or [1.0] * len(bundles)
    shares = [w / sum(weights) for w in weights]
    soup = average(bundles, shares)
    tiles = load(soup.recipe, [JAMBELI, MAGSET2])
    _, val_idx, _ = split(tiles, soup)  # the first model's validation windows and held-out zones
    counts = training.probability_counts(soup, tiles.subset(val_idx), torch.device("cpu"))
    threshold, f1 = counts["all"].best_threshold()
    scores = counts["all"].confusion(threshold).scores()
    per_source = {s: counts[s].confusion(threshold).scores()["f1"] for s in ("jambeli", "magset2")}
    sources = [{"model": Path(m).name, "sha256": hashlib.sha256(Path(m).read_bytes()).hexdigest(), "share": share}
               for m, share in zip(args.models, shares)]
    soup.training = {**soup.training, "threshold": float(threshold),
                     "note": f"weight average of {len(bundles)} models from one start "
                             f"(shares {', '.join(f'{x:.2f}' for x in shares)}); "
                             f"validation F1 {f1:.4f} at threshold {threshold:.2f}",
                     "averaged_from": sources,
                     "validation": {**{k: float(v) for k, v in scores.items()}, "threshold": float(threshold)},
                     "validation_f1_per_source": per_source}
    checkpoint.save(soup, args.out, half=True)
    print(f"{args.out}: validation F1 {f1:.4f} at threshold {threshold:.2f} "
          f"(jambeli {per_source['jambeli']:.4f}, magset2 {per_source['magset2']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
