"""Window grid, blending, seamless stitching: a constant model gives a constant map."""
import numpy as np
import pytest
import torch
from torch import nn

from helpers import read, write_s2
from menet_qgis.core.inference import engine
from menet_qgis.core.model.checkpoint import ModelBundle
from menet_qgis.core.io import raster_io
from menet_qgis.core.model.stages import STAGES
from menet_qgis.core.inference.tiling import WindowGrid, blend_weights


@pytest.mark.parametrize("h, w, window, overlap", [(700, 513, 256, 64), (100, 90, 256, 64), (256, 256, 256, 0),
                                                   (1000, 257, 128, 32), (333, 999, 64, 32)])
def test_windows_cover_every_pixel_on_32_px_origins(h, w, window, overlap):
    grid = WindowGrid(h, w, window, overlap)
    covered = np.zeros((h, w), int)
    for _, y0, x0 in grid:
        assert y0 % 32 == 0 and x0 % 32 == 0
        covered[y0:y0 + window, x0:x0 + window] += 1
    assert covered.min() >= 1
    assert grid.row_origins[-1] < h and grid.col_origins[-1] < w


@pytest.mark.parametrize("window, overlap", [(250, 64), (256, 48), (256, 160), (32, 0)])
def test_bad_window_or_overlap_refused(window, overlap):
    with pytest.raises(ValueError, match="multiple of 32"):
        WindowGrid(500, 500, window, overlap)


def test_blend_weights_positive_and_flat_in_the_middle():
    w = blend_weights(256, 64)
    assert w.min() > 0 and w.max() == 1.0
    assert np.all(w[64:192, 64:192] == 1.0)
    assert w[0, 128] < w[32, 128] < w[63, 128]


class ConstantModel(nn.Module):
    """Every pixel gets the same logit; every stage map the same value."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward_with_stages(self, x):
        n, _, h, w = x.shape
        logits = torch.full((n, 1, h, w), self.value)
        feats = {s.name: torch.full((n, s.channels, h // s.stride, w // s.stride), 2.0) for s in STAGES}
        return logits, feats


def test_constant_model_gives_constant_seamless_map(bundle, tmp_path):
    src = write_s2(tmp_path / "in.tif", 300, 430)
    const = ModelBundle(ConstantModel(0.8), bundle.norm_mean, bundle.norm_std, bundle.pca, recipe=bundle.recipe)
    opts = engine.EngineOptions(window=128, overlap=64, stages=["stage3"])
    result = engine.extract(const, raster_io.RasterInput(src), tmp_path / "p.tif", opts)
    prob = read(result.probability)[0]
    expected = 1 / (1 + np.exp(-0.8))
    assert np.isfinite(prob).all(), "every pixel must be covered"
    assert np.allclose(prob, expected, atol=1e-6), "blending must not leave seams"
    stage = read(result.stages["stage3"])
    assert np.allclose(stage[0], 2.0, atol=1e-6) and np.allclose(stage[2], 0.0, atol=1e-6)  # mean 2, std 0
