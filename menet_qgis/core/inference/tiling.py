"""Window grid, blending weights and the strip blender for seamless sliding-window inference.

Window origins and overlaps are multiples of 32 px (the deepest stage's
stride), so each window's stageN map starts on a whole stageN pixel and maps
from neighbouring windows line up.  Overlaps are blended with a linear ramp
(as geoai's ``predict_geotiff`` does), never last-write-wins; the ramp never
reaches zero so every pixel has positive total weight.  ``StripStitcher``
blends each output into a strip one window tall and writes the rows no later
window can touch, so memory depends on the window and the raster's width,
never on its height.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..model.stages import check_window


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


def blend_weights(size: int, overlap: int) -> np.ndarray:
    """(size, size) float32 weights: 1 in the middle, ramping linearly down
    across the ``overlap`` band at each edge to 0.5/overlap (never 0)."""
    if overlap <= 0:
        return np.ones((size, size), np.float32)
    distance = np.minimum(np.arange(size), np.arange(size)[::-1]) + 0.5
    ramp = np.clip(distance / overlap, 0.0, 1.0).astype(np.float32)
    return np.outer(ramp, ramp)


# --- blending window results into the output rasters -------------------------------------
def pooled_valid(valid: np.ndarray, stride: int) -> np.ndarray:
    """A stage pixel is valid when any input pixel under it is."""
    if stride == 1:
        return valid
    h, w = valid.shape
    return valid.reshape(h // stride, stride, w // stride, stride).any(axis=(1, 3))


class StripStitcher:
    """Blends window results for one output into a strip one window tall and
    writes rows as soon as no later window can touch them.

    Hand-written because no library blends overlapping windows into a
    streamed GeoTIFF; geoai and rasterio hold the whole raster in memory.
    """

    def __init__(self, sink, channels: int, stride: int, grid: WindowGrid):
        """``sink`` takes the finished rows: ``write_rows(row0, (channels, rows, width) block)`` (an AtomicRaster)."""
        self.sink, self.stride, self.channels = sink, stride, channels
        self.size = grid.window // stride
        self.weights = blend_weights(self.size, grid.overlap // stride)
        self.out_h = math.ceil(grid.height / stride)
        self.out_w = math.ceil(grid.width / stride)
        strip_w = (grid.col_origins[-1] + grid.window) // stride
        self.acc = np.zeros((channels, self.size, strip_w), np.float32)
        self.wsum = np.zeros((self.size, strip_w), np.float32)
        self.valid = np.zeros((self.size, strip_w), bool)
        self.top = 0  # output row held by strip row 0

    def add(self, y0: int, x0: int, values: np.ndarray, valid: np.ndarray) -> None:
        """Blend one window in.  Windows arrive in row-major order, so rows above
        this window's top can no longer change: they are written first."""
        self.flush_until(y0)
        r, c, s = y0 // self.stride - self.top, x0 // self.stride, self.size
        self.acc[:, r:r + s, c:c + s] += values * self.weights
        self.wsum[r:r + s, c:c + s] += self.weights
        self.valid[r:r + s, c:c + s] |= valid

    def flush_until(self, row_end_px: Optional[int] = None) -> None:
        """Write and drop strip rows above input row ``row_end_px`` (all rows if None).
        Rows no window touched (skipped no-data windows) come out as no-data."""
        end = self.out_h if row_end_px is None else min(self.out_h, row_end_px // self.stride)
        while self.top < end:
            n = min(end - self.top, self.size)
            ok = self.valid[:n, :self.out_w] & (self.wsum[:n, :self.out_w] > 0)
            block = np.full((self.channels, n, self.out_w), np.nan, np.float32)
            np.divide(self.acc[:, :n, :self.out_w], np.maximum(self.wsum[:n, :self.out_w], 1e-12),
                      out=block, where=ok[None])
            self.sink.write_rows(self.top, block)
            for arr in (self.acc, self.wsum[None], self.valid[None]):
                arr[:, :self.size - n] = arr[:, n:].copy()
                arr[:, self.size - n:] = 0
            self.top += n


class CroppedSink:
    """Passes on to ``sink`` only rows [top, top + height) and columns [left, left + width) of what a
    ``StripStitcher`` writes, renumbered from 0: an extent mapped with context around it keeps the extent."""

    def __init__(self, sink, top: int, left: int, height: int, width: int):
        self.sink, self.top, self.left, self.height, self.width = sink, top, left, height, width

    def write_rows(self, row0: int, block: np.ndarray) -> None:
        first, end = max(row0, self.top), min(row0 + block.shape[1], self.top + self.height)
        if first < end:
            self.sink.write_rows(first - self.top,
                                 block[:, first - row0:end - row0, self.left:self.left + self.width])


def stitch_batch(stitchers: Dict[str, "StripStitcher"], batch, results: Dict[str, np.ndarray]) -> None:
    """Blend every window of ``batch`` [(y0, x0, data, valid), ...] into each output's strip;
    ``results`` holds each output's (N, C, h, w) values."""
    for i, (y0, x0, _data, valid) in enumerate(batch):
        for name, stitcher in stitchers.items():
            values = results[name][i]
            stitcher.add(y0, x0, values, pooled_valid(valid, stitcher.stride))
