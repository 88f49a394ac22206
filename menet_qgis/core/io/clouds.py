"""Which pixels have no ground evidence (cloud, shadow, cirrus, defective, no data), and why.

One small vocabulary of per-pixel quality codes (uint8) shared by every source of that knowledge: the
product's scene classification (SCL, Sentinel-2 L2A), a mask the user gives, and the spectral detector
(``cloud_detector.detect``).  The engine turns every non-``CLEAR`` pixel into no-data (NaN) in the
probability and writes the codes as a quality layer beside it, so a user can tell evidence from guesswork.
numpy only (the light engine environment has no torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional

import numpy as np

#: Quality codes (uint8).  0 is the only code with ground evidence; the order is the precedence when
#: sources disagree (``combine``: the larger code wins, so a user's mask and clouds are never hidden by
#: a milder reason).
CLEAR = 0
NO_DATA = 1
DEFECTIVE = 2   # saturated or defective
SHADOW = 3      # cloud shadow
CLOUD = 4       # opaque cloud (medium or high probability)
CIRRUS = 5      # thin cirrus
USER_MASK = 6   # a mask layer the user gave
#: Words for each code: the quality layer's legend, logs and reports.
QUALITY_NAMES: Dict[int, str] = {
    CLEAR: "clear",
    NO_DATA: "no data",
    DEFECTIVE: "saturated or defective",
    SHADOW: "cloud shadow",
    CLOUD: "cloud",
    CIRRUS: "cirrus",
    USER_MASK: "user mask",
}
#: Colours (RGBA) for the quality layer's palette; clear is transparent.
QUALITY_COLOURS: Dict[int, tuple] = {
    CLEAR: (0, 0, 0, 0),
    NO_DATA: (0, 0, 0, 255),
    DEFECTIVE: (255, 0, 255, 255),
    SHADOW: (90, 90, 90, 255),
    CLOUD: (200, 200, 200, 255),  # light grey: white would vanish on the white legend panel
    CIRRUS: (170, 220, 255, 255),
    USER_MASK: (255, 170, 0, 255),
}
#: Tag (on the probability and the quality layer) naming the quality layer's codes.
QUALITY_TAG = "MENET_QUALITY_CODES"

#: Sentinel-2 L2A scene classification (SCL) classes -> quality codes; classes not listed are clear
#: (2 dark area pixels, 4 vegetation, 5 not vegetated, 6 water, 7 unclassified, 11 snow or ice).
SCL_QUALITY: Dict[int, int] = {0: NO_DATA, 1: DEFECTIVE, 3: SHADOW, 8: CLOUD, 9: CLOUD, 10: CIRRUS}


def scl_quality(scl: np.ndarray) -> np.ndarray:
    """Quality codes (uint8, same shape) for an SCL array: 0 -> NO_DATA, 1 -> DEFECTIVE, 3 -> SHADOW,
    8, 9 -> CLOUD, 10 -> CIRRUS, every other class -> CLEAR."""
    scl = np.asarray(scl)
    lut = np.zeros(256, dtype=np.uint8)
    for scl_class, code in SCL_QUALITY.items():
        lut[scl_class] = code
    values = scl.astype(np.int64, copy=False)
    out = np.zeros(scl.shape, dtype=np.uint8)
    inside = (values >= 0) & (values < 256)
    out[inside] = lut[values[inside]]
    return out


def user_mask_quality(mask: np.ndarray) -> np.ndarray:
    """Quality codes for a user's mask raster: nonzero (and not NaN) -> USER_MASK, else CLEAR."""
    mask = np.asarray(mask)
    if np.issubdtype(mask.dtype, np.floating):
        masked = np.nan_to_num(mask, nan=0.0) != 0
    else:
        masked = mask != 0
    return np.where(masked, USER_MASK, CLEAR).astype(np.uint8)


def combine(*qualities: Optional[np.ndarray]) -> np.ndarray:
    """One quality array from several sources on one grid (``None`` skipped): per pixel the largest code
    (USER_MASK > CIRRUS > CLOUD > SHADOW > DEFECTIVE > NO_DATA > CLEAR)."""
    present = [np.asarray(q, dtype=np.uint8) for q in qualities if q is not None]
    if not present:
        raise ValueError("combine needs at least one quality array")
    out = present[0].copy()
    for quality in present[1:]:
        if quality.shape != out.shape:
            raise ValueError(f"quality arrays differ in shape: {out.shape} and {quality.shape}")
        np.maximum(out, quality, out=out)
    return out


def apply_mask(probability: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """``probability`` (float) with NaN wherever ``quality`` is not CLEAR (in place when float; returned)."""
    probability = np.asarray(probability)
    if not np.issubdtype(probability.dtype, np.floating):
        probability = probability.astype(np.float32)
    probability[np.asarray(quality) != CLEAR] = np.nan
    return probability


def code_counts(quality: np.ndarray) -> Dict[int, int]:
    """Pixels per quality code (every code in ``QUALITY_NAMES``, zeros included)."""
    counts = np.bincount(np.asarray(quality, dtype=np.uint8).ravel(), minlength=256)
    return {code: int(counts[code]) for code in QUALITY_NAMES}


def add_counts(total: Dict[int, int], more: Mapping[int, int]) -> Dict[int, int]:
    """``total`` with ``more`` added code by code (``total`` updated and returned)."""
    for code, count in more.items():
        total[code] = total.get(code, 0) + int(count)
    return total


def masked_share(counts_or_quality) -> float:
    """Share (0-1) of pixels that are not CLEAR, from ``code_counts`` or a quality array; 0 when empty."""
    counts = counts_or_quality if isinstance(counts_or_quality, Mapping) else code_counts(counts_or_quality)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return (total - counts.get(CLEAR, 0)) / total


def evidence_masked(counts: Mapping[int, int]) -> int:
    """Pixels masked for a reason other than having no data (cloud, shadow, cirrus, defective, user mask)."""
    return sum(count for code, count in counts.items() if code not in (CLEAR, NO_DATA))


def _percent(share: float) -> str:
    value = 100.0 * share
    if 0 < value < 0.1:
        return "< 0.1"
    if value < 10:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.0f}"


def _reasons(codes: Iterable[int]) -> str:
    codes = sorted(set(codes))
    cloudy = [c for c in codes if c in (SHADOW, CLOUD, CIRRUS)]
    words = []
    if cloudy:
        words.append("cloud or shadow" if SHADOW in cloudy or len(cloudy) > 1 else QUALITY_NAMES[cloudy[0]])
    words += [QUALITY_NAMES[c] for c in codes if c not in (CLEAR, SHADOW, CLOUD, CIRRUS)]
    return ", ".join(words)


def masked_summary(counts_or_quality) -> str:
    """One line for the log and the outputs' tags, e.g. ``"23 % cloud or shadow: left as no-data"``, with the
    per-reason shares in brackets when more than one reason applies and the share the input has no data
    for after a semicolon; ``"no cloud, shadow or defective pixels found"`` when nothing but no data is
    masked."""
    counts = counts_or_quality if isinstance(counts_or_quality, Mapping) else code_counts(counts_or_quality)
    total = sum(counts.values())
    if total == 0:
        return "no pixels"
    present = [c for c in sorted(counts) if c not in (CLEAR, NO_DATA) and counts[c] > 0]
    if present:
        share = sum(counts[c] for c in present) / total
        line = f"{_percent(share)} % {_reasons(present)}: left as no-data"
        if len(present) > 1:
            line += " (" + ", ".join(f"{QUALITY_NAMES[c]} {_percent(counts[c] / total)} %" for c in present) + ")"
    else:
        line = "no cloud, shadow or defective pixels found"
    if counts.get(NO_DATA, 0):
        line += f"; {_percent(counts[NO_DATA] / total)} % no data"
    return line


def quality_legend() -> str:
    """``"0=clear;1=no data;..."``: the value of ``QUALITY_TAG``."""
    return ";".join(f"{code}={name}" for code, name in sorted(QUALITY_NAMES.items()))


def quality_path(probability) -> Path:
    """The quality layer beside a probability: ``<stem>_quality.tif``."""
    probability = Path(probability)
    return probability.with_name(f"{probability.stem}_quality.tif")
