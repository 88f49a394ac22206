"""ME-Net's input channel recipe: which 11 channels, from which bands, by which formula.

A recipe is named and versioned (v1 and v2 below).  A checkpoint records the
recipe it was trained on (name, version and channel names) and ``recipe_for``
finds it or refuses a recipe this code does not compute, so a model can never be
fed channels it was not trained on.  The formulas exist twice: with torch (``compute_channels``,
on the model's device, the GPU when there is one) and with numpy
(``compute_channels_numpy``, for the ONNX runtimes, so mapping on the CPU does
not need torch).  Tests hold the two equal, NaN for NaN.

Inputs are surface reflectance in [0, ~1] for the Sentinel-2 bands the recipe
needs, all at 10 m: v1 reads B2 (blue), B3 (green), B4 (red), B8 (NIR), B11
(SWIR-1) and B12 (SWIR-2); v2 the same without B12, which many exports lack.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

#: Denominators smaller than this count as zero (the index is then 0, not inf).
EPS = 1e-6
#: Ratio indices (not bounded like normalised differences) are clipped to this.
RATIO_LIMIT = 50.0


@dataclass(frozen=True)
class Channel:
    name: str
    formula: str
    citation: str


@dataclass(frozen=True)
class Recipe:
    """A versioned channel recipe: the Sentinel-2 bands it reads and the 11 channels it makes.

    ``formulas(b, ratio, clip)`` returns the first 10 channels from ``b`` (band name ->
    array) with backend-neutral helpers, so torch and numpy share one definition; the
    11th channel is always PC1 of ``source_bands`` (basis stored in the checkpoint)."""

    name: str
    version: int
    source_bands: Tuple[str, ...]
    channels: Tuple[Channel, ...]
    formulas: Callable

    @property
    def channel_names(self) -> List[str]:
        return [c.name for c in self.channels]

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    def record(self) -> Dict:
        """What a checkpoint stores about the recipe (plain types only)."""
        return {"name": self.name, "version": self.version, "channels": self.channel_names,
                "source_bands": list(self.source_bands)}

    def default_pca(self) -> "PCABasis":
        """Equal-weight basis used only by untrained checkpoints (no training data yet)."""
        w = 1.0 / np.sqrt(len(self.source_bands))
        return PCABasis([0.1] * len(self.source_bands), [w] * len(self.source_bands))


def _pc1_channel(bands: str) -> Channel:
    return Channel("pc1", f"first principal component of {bands}",
                   "basis fitted once on training pixels and stored in the checkpoint")


_COMMON = (
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
            "SUBSTITUTION: red-edge (B5/B6) is not among the bands, B4 (red) stands in"),
)


def _common_formulas(b, ratio):
    return [b["B4"], b["B3"], b["B2"], b["B8"], b["B11"],
            ratio(b["B8"] - b["B4"], b["B8"] + b["B4"]),
            ratio(b["B3"] - b["B11"], b["B3"] + b["B11"]),
            b["B8"] - (b["B4"] + b["B2"])]


def _v1_formulas(b, ratio, clip):
    return _common_formulas(b, ratio) + [clip(ratio(b["B8"] - b["B4"], b["B12"])),
                                         clip(ratio(b["B8"] - b["B12"], b["B12"]))]


def _v2_formulas(b, ratio, clip):
    return _common_formulas(b, ratio) + [clip(ratio(b["B8"] - b["B3"], b["B11"] - b["B3"])),
                                         clip(ratio(b["B8"] - b["B11"], b["B11"]))]


#: The original recipe: needs B12 (SWIR-2) for WFI and MDI.  The Jambelí v1 model uses it.
RECIPE_V1 = Recipe("menet-s2", 1, ("B2", "B3", "B4", "B8", "B11", "B12"), _COMMON + (
    Channel("wfi", "(B8 - B4) / B12",
            "Wetland forest index (NIR - Red) / SWIR-2, as listed in Tran et al. 2022, "
            "Remote Sens. 14(19) 4868 (review of mangrove indices); clipped to +-50"),
    Channel("mdi", "(B8 - B12) / B12",
            "Mangrove discrimination index (NIR - SWIR) / SWIR, Shi et al. 2016 (SWIR-2 variant); "
            "clipped to +-50"),
    _pc1_channel("B2, B3, B4, B8, B11, B12"),
), _v1_formulas)

#: Only the bands every Sentinel-2 export has (no B12): MVI and the SWIR-1 MDI replace the
#: two SWIR-2 indices, in the same places, so a v1 model is a sensible start for fine-tuning.
RECIPE_V2 = Recipe("menet-s2", 2, ("B2", "B3", "B4", "B8", "B11"), _COMMON + (
    Channel("mvi", "(B8 - B3) / (B11 - B3)",
            "Mangrove vegetation index, Baloloy et al. 2020, ISPRS J. 166; clipped to +-50"),
    Channel("mdi11", "(B8 - B11) / B11",
            "Mangrove discrimination index (NIR - SWIR) / SWIR, Shi et al. 2016 (SWIR-1 variant); "
            "clipped to +-50"),
    _pc1_channel("B2, B3, B4, B8, B11"),
), _v2_formulas)

RECIPES: Dict[int, Recipe] = {r.version: r for r in (RECIPE_V1, RECIPE_V2)}
#: The recipe new models are trained on.
DEFAULT_RECIPE = RECIPE_V2
#: Every recipe gives this many channels (the architecture's conv1 input).
N_CHANNELS = 11
assert all(len(r.channels) == N_CHANNELS for r in RECIPES.values())

# The v1 names, as earlier versions of this module exported them.
SOURCE_BANDS: List[str] = list(RECIPE_V1.source_bands)
CHANNELS: Sequence[Channel] = RECIPE_V1.channels
CHANNEL_NAMES: List[str] = RECIPE_V1.channel_names
RECIPE_NAME, RECIPE_VERSION = RECIPE_V1.name, RECIPE_V1.version


def recipe_for(record: Dict) -> Recipe:
    """The recipe a checkpoint names; ``ValueError`` naming the mismatch if this code has none like it."""
    got = (record.get("name"), record.get("version"), list(record.get("channels", [])))
    recipe = RECIPES.get(got[1]) if got[0] == RECIPE_V1.name else None
    if recipe is None or got[2] != recipe.channel_names:
        known = "; ".join(f"{r.label} ({', '.join(r.channel_names)})" for r in RECIPES.values())
        raise ValueError(
            f"checkpoint was made for channel recipe {got[0]} v{got[1]} ({', '.join(map(str, got[2]))}); "
            f"this plugin computes {known}")
    return recipe


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


def compute_channels(bands: "torch.Tensor", pca: PCABasis, recipe: Recipe = RECIPE_V1) -> "torch.Tensor":
    """(N, B, H, W) reflectance in ``recipe.source_bands`` order -> (N, 11, H, W) recipe channels.

    NaN inputs give NaN outputs at the same pixels (callers mask them); no new
    NaN or inf is created anywhere else.
    """
    import torch
    _check_band_count(bands.shape[1], recipe, len(pca.mean))
    b = dict(zip(recipe.source_bands, bands.unbind(dim=1)))
    mean = torch.as_tensor(pca.mean, dtype=bands.dtype, device=bands.device).view(1, -1, 1, 1)
    comp = torch.as_tensor(pca.component, dtype=bands.dtype, device=bands.device).view(1, -1, 1, 1)
    channels = recipe.formulas(b, safe_ratio, lambda x: x.clamp(-RATIO_LIMIT, RATIO_LIMIT))
    channels.append(((bands - mean) * comp).sum(dim=1))
    return torch.stack(channels, dim=1)


def _check_band_count(count: int, recipe: Recipe, pca_bands: int) -> None:
    if count != len(recipe.source_bands):
        raise ValueError(f"recipe {recipe.label} expects {len(recipe.source_bands)} bands "
                         f"({', '.join(recipe.source_bands)}), got {count}")
    if pca_bands != count:
        raise ValueError(f"the PCA basis has {pca_bands} bands, recipe {recipe.label} reads {count}")


def safe_ratio_numpy(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``safe_ratio`` in numpy: 0 where |den| < EPS, NaN stays NaN."""
    ok = (np.abs(den) >= EPS) | np.isnan(den)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=ok)
    return out


def compute_channels_numpy(bands: np.ndarray, pca: PCABasis, out: np.ndarray = None,
                           recipe: Recipe = RECIPE_V1) -> np.ndarray:
    """``compute_channels`` in numpy (float32), for the runtimes that do not need torch:
    (N, B, H, W) reflectance -> (N, 11, H, W), written into ``out`` when given."""
    _check_band_count(bands.shape[1], recipe, len(pca.mean))
    bands = np.asarray(bands, dtype=np.float32)
    b = {name: bands[:, i] for i, name in enumerate(recipe.source_bands)}
    if out is None:
        out = np.empty((bands.shape[0], N_CHANNELS) + bands.shape[2:], np.float32)
    clip = lambda x: np.clip(x, -RATIO_LIMIT, RATIO_LIMIT, out=x)  # noqa: E731
    for i, value in enumerate(recipe.formulas(b, safe_ratio_numpy, clip)):
        out[:, i] = value
    mean = np.asarray(pca.mean, np.float32).reshape(1, -1, 1, 1)
    comp = np.asarray(pca.component, np.float32).reshape(1, -1, 1, 1)
    out[:, N_CHANNELS - 1] = ((bands - mean) * comp).sum(axis=1)
    return out

