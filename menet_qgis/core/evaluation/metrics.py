"""Binary accuracy figures from a confusion matrix (mangrove = positive class)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Tuple

import numpy as np


@dataclass
class Confusion:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, predicted: np.ndarray, reference: np.ndarray) -> "Confusion":
        """Count boolean arrays of the same shape (only pixels you pass are counted)."""
        p, r = np.asarray(predicted, bool), np.asarray(reference, bool)
        self.tp += int(np.count_nonzero(p & r))
        self.fp += int(np.count_nonzero(p & ~r))
        self.fn += int(np.count_nonzero(~p & r))
        self.tn += int(np.count_nonzero(~p & ~r))
        return self

    def __add__(self, other: "Confusion") -> "Confusion":
        """Pool two counts (zones, windows): ``sum(confusions, Confusion())`` pools many."""
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def scores(self) -> Dict[str, float]:
        n = self.total
        div = lambda a, b: float(a) / b if b else 0.0  # noqa: E731
        oa = div(self.tp + self.tn, n)
        precision = div(self.tp, self.tp + self.fp)
        recall = div(self.tp, self.tp + self.fn)
        f1 = div(2 * self.tp, 2 * self.tp + self.fp + self.fn)
        iou = div(self.tp, self.tp + self.fp + self.fn)
        expected = div((self.tp + self.fp) * (self.tp + self.fn) + (self.fn + self.tn) * (self.fp + self.tn), n * n)
        kappa = div(oa - expected, 1 - expected) if expected < 1 else 0.0
        return {"overall_accuracy": oa, "precision": precision, "recall": recall, "f1": f1, "iou": iou,
                "kappa": kappa}

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)


#: Thresholds scanned when choosing the decision threshold on validation (training) ...
THRESHOLD_BINS = 100
THRESHOLD_RANGE = (0.2, 0.8)
#: ... and on a user's own reference of one coast (assess), where the best one ranged 0.30-0.79 over
#: MagSet-2 zones for one model: wider, so a coast far from the validation coasts is not clipped.
LOCAL_THRESHOLD_RANGE = (0.05, 0.95)


@dataclass
class ProbabilityCounts:
    """Histogram of predicted probabilities per reference class: the confusion at any threshold."""

    positive: np.ndarray = field(default_factory=lambda: np.zeros(THRESHOLD_BINS, np.int64))
    negative: np.ndarray = field(default_factory=lambda: np.zeros(THRESHOLD_BINS, np.int64))

    def add(self, prob: np.ndarray, truth: np.ndarray) -> None:
        bins = np.clip((prob * THRESHOLD_BINS).astype(np.int64), 0, THRESHOLD_BINS - 1)
        self.positive += np.bincount(bins[truth], minlength=THRESHOLD_BINS)
        self.negative += np.bincount(bins[~truth], minlength=THRESHOLD_BINS)

    def __add__(self, other: "ProbabilityCounts") -> "ProbabilityCounts":
        """Pool two histograms: ``sum(counts, ProbabilityCounts())`` pools many."""
        return ProbabilityCounts(self.positive + other.positive, self.negative + other.negative)

    def confusion(self, threshold: float) -> Confusion:
        k = int(round(threshold * THRESHOLD_BINS))
        tp, fp = int(self.positive[k:].sum()), int(self.negative[k:].sum())
        return Confusion(tp, fp, int(self.positive.sum()) - tp, int(self.negative.sum()) - fp)

    def best_threshold(self, low: float = THRESHOLD_RANGE[0], high: float = THRESHOLD_RANGE[1]) -> Tuple[float, float]:
        """(threshold, F1) maximising F1 within ``low``..``high`` (ties: the one nearest 0.5)."""
        candidates = [k / THRESHOLD_BINS for k in range(int(round(low * THRESHOLD_BINS)),
                                                       int(round(high * THRESHOLD_BINS)) + 1)]
        scored = [(self.confusion(t).scores()["f1"], -abs(t - 0.5), t) for t in candidates]
        f1, _, t = max(scored)
        return t, f1
