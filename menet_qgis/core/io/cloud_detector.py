"""Opaque cloud from the bands the plugin reads, for inputs without a scene classification (SCL).

A per-pixel spectral test in the spirit of Fmask's potential-cloud-pixel test and Sen2Cor's cloud
thresholds, restricted to the bands every input here has (B2, B3, B4, B8 or B8A, B11; B12 optional; no
cirrus band B10, no thermal band).  A pixel is CLOUD when all of these hold (reflectance 0-1):

- bright in the visible: mean of B2, B3, B4 > ``MIN_VISIBLE``;
- white (flat across the visible): Fmask's whiteness, sum |band - mean| / mean over B2, B3, B4,
  < ``MAX_WHITENESS``;
- not red: blue at least ``MIN_BLUE_RED`` x red (sand, salt crusts and turbid water are red-yellow);
- bright in the shortwave infrared too: B11 > ``MIN_SWIR``, and the snow index NDSI = (B3 - B11) /
  (B3 + B11) < ``MAX_NDSI`` (bright shallow water, wet salt flats and salt ponds are dark in B11);
- not bare soil or rock: NIR / B11 > ``MIN_NIR_SWIR`` (dry sand and rock reflect more at 1.6 um than at
  0.8 um, clouds less: Fmask's NIR/SWIR1 ratio test);
- and it is part of a patch at least 3 px across (a morphological opening, ``OPENING``): one- and
  two-pixel lines of bright mixed pixels along pond dykes and beaches pass the spectral tests, clouds do
  not come that thin.

Detected cloud is then grown by ``BUFFER`` pixels (as Fmask does): the semi-transparent rim of a cloud
carries no usable ground evidence either.  SHADOW is not reported: a "dark and near a cloud" rule
flagged river channels and dark mangrove as speckle on the labelled tiles (docs/experiments/clouds.md),
and water must never be masked.  CIRRUS is never reported (it needs B10).  NaN pixels are CLEAR here:
no-data is the caller's business (``clouds.NO_DATA``).

The thresholds were chosen and checked on hand-labelled MagSet-2 tiles (tests/data/clouds/, the study
``python -m studies.cloud_detector``, docs/experiments/clouds.md): it finds the labelled opaque cloud and
leaves arid coasts' bright sand and salt ponds and the cloud-free Jambelí scene alone.  Thin haze is not
cloud here: the ground is still seen through it.  numpy only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .clouds import CLEAR, CLOUD

MIN_VISIBLE = 0.15
MAX_WHITENESS = 0.35
MIN_BLUE_RED = 0.9
MIN_SWIR = 0.10
MAX_NDSI = 0.5
MIN_NIR_SWIR = 1.2
#: Cloud narrower than 2 x OPENING + 1 pixels is dropped (see ``cloud_test``).
OPENING = 1

#: Pixels around detected cloud that are masked with it (Chebyshev distance, px).
BUFFER = 2


def _names(bands: Sequence[str]) -> list:
    """Sentinel-2 band names (B2 ...) for ``bands``, which may also use the aliases of ``bands.ALIASES``
    (Blue, NIR, SWIR1, ...)."""
    from .bands import _LOOKUP
    return [_LOOKUP.get("".join(ch for ch in str(b).lower() if ch.isalnum()), str(b).upper()) for b in bands]


def _band(reflectance: np.ndarray, names: Sequence[str], *choices: str) -> np.ndarray:
    for choice in choices:
        if choice in names:
            return reflectance[names.index(choice)]
    raise ValueError(f"the cloud detector needs band {' or '.join(choices)}; got {', '.join(names) or 'none'}")


def cloud_test(reflectance: np.ndarray, bands: Sequence[str], opening: int = OPENING) -> np.ndarray:
    """Boolean (h, w): the opaque-cloud test alone (see the module docstring); ``opening`` as OPENING."""
    names = _names(bands)
    refl = np.asarray(reflectance, dtype=np.float32)
    if refl.ndim != 3 or refl.shape[0] != len(names):
        raise ValueError(f"reflectance must be (bands, h, w) with one band per name; got shape {refl.shape} "
                         f"for {len(names)} band names")
    b2, b3, b4 = (_band(refl, names, b) for b in ("B2", "B3", "B4"))
    nir = _band(refl, names, "B8", "B8A")
    b11 = _band(refl, names, "B11")
    with np.errstate(invalid="ignore", divide="ignore"):
        visible = (b2 + b3 + b4) / 3
        whiteness = (np.abs(b2 - visible) + np.abs(b3 - visible) + np.abs(b4 - visible)) / visible
        ndsi = (b3 - b11) / (b3 + b11)
        cloud = ((visible > MIN_VISIBLE) & (whiteness < MAX_WHITENESS) & (b2 >= MIN_BLUE_RED * b4)
                 & (b11 > MIN_SWIR) & (ndsi < MAX_NDSI) & (nir > MIN_NIR_SWIR * b11))
    # Comparisons with NaN are False: no data is never cloud.  Opening (erode, then dilate, by OPENING
    # px) keeps only cloud at least 2 x OPENING + 1 px across: bright mixed pixels along pond dykes and
    # beaches pass the spectral test one or two pixels wide, clouds do not come that thin.
    if opening > 0:
        cloud = _near(~_near(~cloud, opening), opening) & cloud
    return cloud


def _near(mask: np.ndarray, distance: int) -> np.ndarray:
    """Pixels within ``distance`` (Chebyshev) of a True pixel of the 2-D boolean ``mask`` (a separable
    max filter by shifted ORs; outside the array counts as False)."""
    out = np.array(mask, dtype=bool)
    for axis in (0, 1):
        src = out.copy()
        for k in range(1, distance + 1):
            if axis == 0:
                out[k:] |= src[:-k]
                out[:-k] |= src[k:]
            else:
                out[:, k:] |= src[:, :-k]
                out[:, :-k] |= src[:, k:]
    return out


def detect(reflectance: np.ndarray, bands: Sequence[str], buffer: int = BUFFER) -> np.ndarray:
    """Quality codes (uint8, (h, w)): CLOUD or CLEAR for a (bands, h, w) reflectance (0-1, NaN = no data)
    whose band names are ``bands`` (B2, B3, B4, B8 or B8A, B11, optionally B12 and others).  Cloud is
    grown by ``buffer`` pixels; NaN pixels stay CLEAR unless they lie in that rim."""
    cloud = cloud_test(reflectance, bands)
    if buffer > 0 and cloud.any():
        cloud = _near(cloud, buffer)
    return np.where(cloud, CLOUD, CLEAR).astype(np.uint8)
