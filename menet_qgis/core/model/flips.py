"""The 8 flips/rotations of overhead imagery (the dihedral group of the square), for training
augmentation and for test-time flips.

Overhead imagery has no "up": a mangrove edge seen mirrored or turned is still a mangrove
edge.  Test-time flips run the model on all 8 views of a window and average the
probabilities after turning each back, at 8× the model's time; what that gains is in the model
card's scores (resources/models/MODEL_CARD.md), so it is an option, off by default.

Works on numpy arrays and torch tensors alike (last two axes) without importing torch:
the ONNX runtimes map without it.
"""
from __future__ import annotations

import numpy as np

FLIPS = 8


def dihedral(x, k: int):
    """View ``k`` (0..7) of ``x``: a mirror (k >= 4) then ``k % 4`` quarter turns."""
    if isinstance(x, np.ndarray):
        return np.rot90(x[..., ::-1] if k >= 4 else x, k % 4, axes=(-2, -1))
    import torch
    return torch.rot90(x.flip(-1) if k >= 4 else x, k % 4, dims=(-2, -1))


def undo_dihedral(y, k: int):
    """Turn a prediction made on view ``k`` back onto the original window."""
    if isinstance(y, np.ndarray):
        back = np.rot90(y, -(k % 4), axes=(-2, -1))
        return back[..., ::-1] if k >= 4 else back
    import torch
    back = torch.rot90(y, -(k % 4), dims=(-2, -1))
    return back.flip(-1) if k >= 4 else back


def mean_over_flips(predict, x, first=None):
    """Mean of ``predict`` over the 8 views of square windows ``x`` (N, C, S, S), each turned back.
    ``first``: ``predict(x)`` when the caller already has it (the stage maps come from that pass)."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"test-time flips need square windows, got {x.shape[-2]} x {x.shape[-1]}")
    total = predict(x) if first is None else first
    for k in range(1, FLIPS):
        total = total + undo_dihedral(predict(dihedral(x, k)), k)
    return total / FLIPS
