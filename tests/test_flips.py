"""Test-time flips: the 8 views, their undoing, and a map that no longer depends on the scene's orientation."""
import numpy as np
import pytest
import rasterio
import torch

from helpers import crop_scene, read
from menet_qgis.core.inference import engine
from menet_qgis.core.io import raster_io
from menet_qgis.core.model.flips import FLIPS, dihedral, mean_over_flips, undo_dihedral


def test_the_eight_views_are_distinct_undone_exactly_and_the_same_in_numpy_and_torch():
    x = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    views = [dihedral(x, k) for k in range(FLIPS)]
    assert len({v.tobytes() for v in map(np.ascontiguousarray, views)}) == 8
    for k, view in enumerate(views):
        np.testing.assert_array_equal(view, dihedral(torch.from_numpy(x), k).numpy())
        np.testing.assert_array_equal(undo_dihedral(view, k), x)
        np.testing.assert_array_equal(undo_dihedral(torch.from_numpy(view.copy()), k).numpy(), x)
    # a per-pixel "model" is unchanged by averaging over the views
    np.testing.assert_allclose(mean_over_flips(lambda v: v * 2.0, x[None]), x[None] * 2.0)
    with pytest.raises(ValueError, match="square windows"):
        mean_over_flips(lambda v: v, np.zeros((1, 1, 4, 5)))


def _mirrored(src, dst):
    """The same georeferenced raster mirrored left-right (same grid, pixels swapped)."""
    with rasterio.open(src) as ds:
        profile, data, names = ds.profile, ds.read(), ds.descriptions
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data[:, :, ::-1])
        for i, name in enumerate(names, 1):
            out.set_band_description(i, name)
    return dst


@pytest.fixture
def square_crop(scene, tmp_path):
    """One 128² window of the real scene with mangroves, water and the no-data edge."""
    return crop_scene(tmp_path / "crop.tif", 1088, 384, 128, 128)


@pytest.mark.integration
def test_with_flips_the_map_of_a_mirrored_scene_is_the_mirrored_map(bundle, square_crop, tmp_path):
    mirrored = _mirrored(square_crop, tmp_path / "mirrored.tif")

    def probability(src, name, tta):
        options = engine.EngineOptions(window=128, overlap=0, device="cpu", runtime="torch", tta=tta)
        return read(engine.extract(bundle, raster_io.RasterInput(src), tmp_path / name, options).probability)[0]

    plain, plain_mirrored = probability(square_crop, "p.tif", False), probability(mirrored, "pm.tif", False)
    flips, flips_mirrored = probability(square_crop, "f.tif", True), probability(mirrored, "fm.tif", True)
    assert np.isnan(plain).any() and np.isfinite(plain).any()   # the no-data edge stays no-data
    assert np.array_equal(np.isnan(flips), np.isnan(plain))
    # without flips the (untrained) model sees a mirrored scene differently ...
    assert np.nanmax(np.abs(plain_mirrored[:, ::-1] - plain)) > 1e-3
    # ... with flips the answer no longer depends on which way the scene is turned
    assert np.nanmax(np.abs(flips_mirrored[:, ::-1] - flips)) < 1e-5
