"""Cloud-free composites: one image from several dates of one area, clear observations only.

``clear_composite`` takes observations on one grid, each a (bands, h, w)
float32 reflectance (NaN = no data) and an (h, w) uint8 quality code
(``clouds.CLEAR`` = a usable pixel; cloud, shadow, cirrus, defective or no
data otherwise), and returns the composite and, per pixel, how many clear
observations went into it.  Pixels that no date sees clear are NaN in every
band and 0 in the count.

Rules (``method``):

- ``median`` (default): per pixel and band, the median of the clear
  observations.  With two clear values it is their mean.
- ``medoid``: per pixel, the whole spectrum of the one clear observation
  closest (sum of Euclidean distances over the bands) to the others, so all
  bands come from one date.
- ``ndvi_max``: per pixel, the clear observation of greatest NDVI (needs
  ``bands`` naming B4 and B8).

numpy only: no torch, no GDAL here.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple

import numpy as np

try:
    from .clouds import CLEAR
except ImportError:  # pragma: no cover - until clouds.py (issue 27, H2) lands: its agreed code for a clear pixel
    CLEAR = 0

METHODS = ("median", "medoid", "ndvi_max")
#: Most observations ``clear_composite`` stacks at once; the count band is uint8.
MAX_OBSERVATIONS = 255


def _stack(observations) -> Tuple[np.ndarray, np.ndarray]:
    """(n, b, h, w) float32 reflectance with NaN wherever an observation is not clear, and the (n, h, w) clear mask."""
    observations = list(observations)
    if not observations:
        raise ValueError("a composite needs at least one observation")
    if len(observations) > MAX_OBSERVATIONS:
        raise ValueError(f"{len(observations)} observations: at most {MAX_OBSERVATIONS} go into one composite")
    first = np.asarray(observations[0][0])
    if first.ndim != 3:
        raise ValueError(f"an observation's reflectance must be (bands, height, width), not shape {first.shape}")
    data = np.empty((len(observations),) + first.shape, dtype=np.float32)
    clear = np.empty((len(observations),) + first.shape[1:], dtype=bool)
    for i, (reflectance, quality) in enumerate(observations):
        reflectance, quality = np.asarray(reflectance), np.asarray(quality)
        if reflectance.shape != first.shape:
            raise ValueError(f"observation {i + 1} has shape {reflectance.shape}, the first {first.shape}: "
                             "composites need every date on one grid")
        if quality.shape != first.shape[1:]:
            raise ValueError(f"observation {i + 1}'s quality has shape {quality.shape}, its reflectance "
                             f"{first.shape[1:]}")
        data[i] = reflectance
        clear[i] = (quality == CLEAR) & np.isfinite(data[i]).all(axis=0)
    data[~np.broadcast_to(clear[:, None], data.shape)] = np.nan
    return data, clear


def _pick(data: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Per pixel, all bands of observation ``index`` (h, w) from data (n, b, h, w)."""
    return np.take_along_axis(data, index[None, None], axis=0)[0]


def clear_composite(observations: Sequence[Tuple[np.ndarray, np.ndarray]], method: str = "median",
                    bands: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(composite (b, h, w) float32, count (h, w) uint8) of the clear observations.

    ``observations``: (reflectance (b, h, w) float32, quality (h, w) uint8)
    pairs on one grid.  A pixel counts as clear where its quality is CLEAR
    and every band is finite.  The composite is NaN where count == 0.
    """
    if method not in METHODS:
        raise ValueError(f"unknown composite method {method!r}: one of {', '.join(METHODS)}")
    data, clear = _stack(observations)
    count = clear.sum(axis=0).astype(np.uint8)
    none = count == 0
    if method == "median":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: NaN, as wanted
            composite = np.nanmedian(data, axis=0).astype(np.float32)
    elif method == "medoid":
        n = data.shape[0]
        filled = np.nan_to_num(data)
        cost = np.zeros(clear.shape, dtype=np.float64)
        for i in range(n):
            for j in range(i + 1, n):
                both = clear[i] & clear[j]
                d = np.sqrt(((filled[i] - filled[j]) ** 2).sum(axis=0)) * both
                cost[i] += d
                cost[j] += d
        cost[~clear] = np.inf
        composite = _pick(data, np.argmin(cost, axis=0))
    else:
        if not bands or "B4" not in bands or "B8" not in bands:
            raise ValueError("the ndvi_max composite needs the band names, with B4 and B8")
        red, nir = data[:, list(bands).index("B4")], data[:, list(bands).index("B8")]
        with np.errstate(divide="ignore", invalid="ignore"):
            ndvi = (nir - red) / (nir + red)
        ndvi = np.where(clear & np.isfinite(ndvi), ndvi, -np.inf)
        composite = _pick(data, np.argmax(ndvi, axis=0))
    composite = np.ascontiguousarray(composite, dtype=np.float32)
    composite[:, none] = np.nan
    return composite, count
