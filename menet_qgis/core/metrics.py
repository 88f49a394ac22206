"""Binary accuracy figures from a confusion matrix (mangrove = positive class)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

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
