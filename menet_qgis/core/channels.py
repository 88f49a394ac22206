"""ME-Net's input channel recipe: which 11 channels, from which bands, by which formula.

The recipe is a named, versioned list.  A checkpoint records the recipe it was
trained on (name, version and channel names) and ``check_recipe`` refuses a
checkpoint made for another recipe, so a model can never be fed channels it was
not trained on.  The formulas exist twice: with torch (``compute_channels``,
on the model's device, the GPU when there is one) and with numpy
(``compute_channels_numpy``, for the ONNX runtimes, so mapping on the CPU does
not need torch).  Tests hold the two equal, NaN for NaN.

Inputs are surface reflectance in [0, ~1] for the six Sentinel-2 bands the
recipe needs: B2 (blue), B3 (green), B4 (red), B8 (NIR), B11 (SWIR-1),
B12 (SWIR-2), all at 10 m.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

#: Sentinel-2 bands the recipe is computed from, in this order.
SOURCE_BANDS: List[str] = ["B2", "B3", "B4", "B8", "B11", "B12"]
#: Denominators smaller than this count as zero (the index is then 0, not inf).
EPS = 1e-6
#: Ratio indices (not bounded like normalised differences) are clipped to this.
RATIO_LIMIT = 50.0


@dataclass(frozen=True)
class Channel:
    name: str
    formula: str
    citation: str


RECIPE_NAME = "menet-s2"
RECIPE_VERSION = 1
CHANNELS: Sequence[Channel] = (
    Channel("red", "B4", "Sentinel-2 band 4, 665 nm"),
    Channel("green", "B3", "Sentinel-2 band 3, 560 nm"),
    Channel("blue", "B2", "Sentinel-2 band 2, 490 nm"),
    Channel("nir", "B8", "Sentinel-2 band 8, 842 nm"),
    Channel("swir1", "B11", "Sentinel-2 band 11, 1610 nm"),
    Channel("ndvi", "(B8 - B4) / (B8 + B4)",
            "Normalised difference vegetation index; Rouse et al. 1974"),
    Channel("mndwi", "(B3 - B11) / (B3 + B11)",
            "Modified normalised difference water index; Xu 2006, Int. J. Remote Sens. 27(14)"),
    Channel("fdi", "B8 - (B4 + B2)",
            "Forest discrimination index NIR - (RedEdge + Blue), Bunting & Lucas 2006; "
            "SUBSTITUTION: red-edge (B5/B6) is not among the six bands, B4 (red) stands in"),
    Channel("wfi", "(B8 - B4) / B12",
            "Wetland forest index (NIR - Red) / SWIR-2, as listed in Tran et al. 2022, "
            "Remote Sens. 14(19) 4868 (review of mangrove indices); clipped to +-50"),
    Channel("mdi", "(B8 - B12) / B12",
            "Mangrove discrimination index (NIR - SWIR) / SWIR, Shi et al. 2016 (SWIR-2 variant); "
            "clipped to +-50"),
    Channel("pc1", "first principal component of B2, B3, B4, B8, B11, B12",
            "basis fitted once on training pixels and stored in the checkpoint"),
)
CHANNEL_NAMES: List[str] = [c.name for c in CHANNELS]
N_CHANNELS = len(CHANNELS)


def recipe_record() -> Dict:
    """What a checkpoint stores about the recipe (plain types only)."""
    return {"name": RECIPE_NAME, "version": RECIPE_VERSION, "channels": list(CHANNEL_NAMES)}


def check_recipe(record: Dict) -> None:
    """Raise ``ValueError`` naming the mismatch if ``record`` is not this code's recipe."""
    got = (record.get("name"), record.get("version"), list(record.get("channels", [])))
    want = (RECIPE_NAME, RECIPE_VERSION, CHANNEL_NAMES)
    if got != want:
        raise ValueError(
            f"checkpoint was made for channel recipe {got[0]} v{got[1]} ({', '.join(map(str, got[2]))}); "
            f"this plugin computes {want[0]} v{want[1]} ({', '.join(want[2])})")


def safe_ratio(num: "torch.Tensor", den: "torch.Tensor") -> "torch.Tensor":
    """num / den, with 0 where |den| < EPS: no inf or NaN from a zero denominator
    (a NaN input still gives NaN, so no-data stays no-data)."""
    import torch
    ok = (den.abs() >= EPS) | den.isnan()
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


@dataclass
class PCABasis:
    """First principal component of the six reflectance bands: x -> (x - mean) . component."""

    mean: List[float]
    component: List[float]

    def to_record(self) -> Dict:
        return {"mean": [float(v) for v in self.mean], "component": [float(v) for v in self.component]}

    @classmethod
    def from_record(cls, record: Dict) -> "PCABasis":
        return cls(list(record["mean"]), list(record["component"]))

    @classmethod
    def fit(cls, reflectance: np.ndarray) -> "PCABasis":
        """Fit on an (N, 6) array of valid training pixels.  The sign is fixed so
        the component's largest-magnitude weight is positive (reproducible)."""
        x = np.asarray(reflectance, dtype=np.float64)
        mean = x.mean(axis=0)
        cov = np.cov(x - mean, rowvar=False)
        values, vectors = np.linalg.eigh(cov)
        comp = vectors[:, int(np.argmax(values))]
        if comp[int(np.argmax(np.abs(comp)))] < 0:
            comp = -comp
        return cls(mean.tolist(), comp.tolist())


def compute_channels(bands: "torch.Tensor", pca: PCABasis) -> "torch.Tensor":
    """(N, 6, H, W) reflectance in SOURCE_BANDS order -> (N, 11, H, W) recipe channels.

    NaN inputs give NaN outputs at the same pixels (callers mask them); no new
    NaN or inf is created anywhere else.
    """
    import torch
    _check_band_count(bands.shape[1])
    b2, b3, b4, b8, b11, b12 = bands.unbind(dim=1)
    mean = torch.as_tensor(pca.mean, dtype=bands.dtype, device=bands.device).view(1, -1, 1, 1)
    comp = torch.as_tensor(pca.component, dtype=bands.dtype, device=bands.device).view(1, -1, 1, 1)
    channels = [
        b4, b3, b2, b8, b11,
        safe_ratio(b8 - b4, b8 + b4),
        safe_ratio(b3 - b11, b3 + b11),
        b8 - (b4 + b2),
        safe_ratio(b8 - b4, b12).clamp(-RATIO_LIMIT, RATIO_LIMIT),
        safe_ratio(b8 - b12, b12).clamp(-RATIO_LIMIT, RATIO_LIMIT),
        ((bands - mean) * comp).sum(dim=1),
    ]
    return torch.stack(channels, dim=1)


def _check_band_count(count: int) -> None:
    if count != len(SOURCE_BANDS):
        raise ValueError(f"expected {len(SOURCE_BANDS)} bands ({', '.join(SOURCE_BANDS)}), got {count}")


def safe_ratio_numpy(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``safe_ratio`` in numpy: 0 where |den| < EPS, NaN stays NaN."""
    ok = (np.abs(den) >= EPS) | np.isnan(den)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=ok)
    return out


def compute_channels_numpy(bands: np.ndarray, pca: PCABasis, out: np.ndarray = None) -> np.ndarray:
    """``compute_channels`` in numpy (float32), for the runtimes that do not need torch:
    (N, 6, H, W) reflectance -> (N, 11, H, W), written into ``out`` when given."""
    _check_band_count(bands.shape[1])
    bands = np.asarray(bands, dtype=np.float32)
    b2, b3, b4, b8, b11, b12 = (bands[:, i] for i in range(len(SOURCE_BANDS)))
    if out is None:
        out = np.empty((bands.shape[0], N_CHANNELS) + bands.shape[2:], np.float32)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3], out[:, 4] = b4, b3, b2, b8, b11
    out[:, 5] = safe_ratio_numpy(b8 - b4, b8 + b4)
    out[:, 6] = safe_ratio_numpy(b3 - b11, b3 + b11)
    out[:, 7] = b8 - (b4 + b2)
    np.clip(safe_ratio_numpy(b8 - b4, b12), -RATIO_LIMIT, RATIO_LIMIT, out=out[:, 8])
    np.clip(safe_ratio_numpy(b8 - b12, b12), -RATIO_LIMIT, RATIO_LIMIT, out=out[:, 9])
    mean = np.asarray(pca.mean, np.float32).reshape(1, -1, 1, 1)
    comp = np.asarray(pca.component, np.float32).reshape(1, -1, 1, 1)
    out[:, 10] = ((bands - mean) * comp).sum(axis=1)
    return out


def default_pca() -> PCABasis:
    """Equal-weight basis used only by untrained checkpoints (no training data yet)."""
    w = 1.0 / np.sqrt(len(SOURCE_BANDS))
    return PCABasis([0.1] * len(SOURCE_BANDS), [w] * len(SOURCE_BANDS))

