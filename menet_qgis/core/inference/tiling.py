"""Window grid and blending weights for seamless sliding-window inference.

Window origins and overlaps are multiples of 32 px (the deepest stage's
stride), so each window's stageN map starts on a whole stageN pixel and maps
from neighbouring windows line up.  Overlaps are blended with a linear ramp
(as geoai's ``predict_geotiff`` does), never last-write-wins; the ramp never
reaches zero so every pixel has positive total weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Tuple

import numpy as np

from ...options import DEFAULT_OVERLAP  # noqa: F401 (re-exported)
from ..model.stages import MAX_STRIDE


@dataclass(frozen=True)
class WindowGrid:
    """Sliding windows over a (height, width) raster, in row-major order."""

    height: int
    width: int
    window: int
    overlap: int

    def __post_init__(self):
        check_window(self.window, self.overlap)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"empty raster grid ({self.width} x {self.height} px)")

    @property
    def stride(self) -> int:
        return self.window - self.overlap

    def origins(self, length: int) -> List[int]:
        """0, stride, 2*stride ... until the raster is covered; the last window
        may run past the edge (it is padded on read and cropped on write)."""
        if length <= self.window:
            return [0]
        n = -(-(length - self.window) // self.stride) + 1
        return [i * self.stride for i in range(n)]

    @property
    def row_origins(self) -> List[int]:
        return self.origins(self.height)

    @property
    def col_origins(self) -> List[int]:
        return self.origins(self.width)

    def __len__(self) -> int:
        return len(self.row_origins) * len(self.col_origins)

    def __iter__(self) -> Iterator[Tuple[int, int, int]]:
        """Yield (row_index, y0, x0) for every window."""
        for r, y0 in enumerate(self.row_origins):
            for x0 in self.col_origins:
                yield r, y0, x0


def check_window(window: int, overlap: int) -> None:
    if window < 2 * MAX_STRIDE or window % MAX_STRIDE:
        raise ValueError(f"window size must be a multiple of {MAX_STRIDE} and at least {2 * MAX_STRIDE} px, got {window}")
    if overlap < 0 or overlap % MAX_STRIDE or overlap > window // 2:
        raise ValueError(f"overlap must be a multiple of {MAX_STRIDE} between 0 and half the window ({window // 2}), got {overlap}")


def blend_weights(size: int, overlap: int) -> np.ndarray:
    """(size, size) float32 weights: 1 in the middle, ramping linearly down
    across the ``overlap`` band at each edge to 0.5/overlap (never 0)."""
    if overlap <= 0:
        return np.ones((size, size), np.float32)
    distance = np.minimum(np.arange(size), np.arange(size)[::-1]) + 0.5
    ramp = np.clip(distance / overlap, 0.0, 1.0).astype(np.float32)
    return np.outer(ramp, ramp)
