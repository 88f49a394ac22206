"""Training data handling (soft labels, NaN, duplicates, location split) and a real short training run."""
import numpy as np
import pytest
import torch

from helpers import S2_NAMES, TRAIN, s2_reflectance, write_raster
from menet_qgis.core.model import checkpoint
from menet_qgis.core.training import data as training_data
from menet_qgis.core.training import train as training


def make_tiles(folder, n=6, size=64, duplicate_of=None):
    """Tile pairs on a 10 m grid, one tile per 640 m column; left half mangrove-like."""
    from rasterio.transform import from_origin
    for i in range(n):
        j = duplicate_of if (duplicate_of is not None and i == n - 1) else i
        t = from_origin(600000 + 4000 * j, 9700000, 10, 10)
        img = s2_reflectance(size, size, seed=i)
        if i == 1:
            img[:, :3, :3] = np.nan
        mask = np.zeros((1, size, size), np.float32)
        mask[0, :, : size // 2] = 0.76 if i == 2 else 1.0      # soft label
        mask[0, :, size // 2: size // 2 + 2] = 0.33             # soft non-mangrove
        write_raster(folder / f"tile_{i:04d}.tif", img, S2_NAMES, transform=t)
        write_raster(folder / f"mask_{i:04d}.tif", mask, transform=t)
    return folder


def test_tile_folder_loading_handles_real_label_quirks(tmp_path):
    tiles = training_data.load_tile_folder(make_tiles(tmp_path, duplicate_of=0))
    assert len(tiles) == 5 and tiles.duplicates_dropped == 1
    assert set(np.unique(tiles.labels)) == {0.0, 1.0}
    assert tiles.labels[2, 0, 0] == 1.0 and tiles.labels[0, 0, 33] == 0.0
    assert not tiles.valid[1, :3, :3].any() and tiles.valid[1, 3:, 3:].all()


def test_location_split_never_puts_one_place_on_both_sides():
    bounds = [(0, 0, 1280, 1280), (640, 0, 1920, 1280),       # overlapping pair
              (10000, 0, 11280, 1280), (10000, 0, 11280, 1280),  # identical pair
              (50000, 0, 51280, 1280), (90000, 0, 91280, 1280)]
    groups = training_data.location_groups(bounds, block=0)
    assert groups[0] == groups[1] and groups[2] == groups[3] and len(set(groups)) == 4
    for seed in range(10):
        train_idx, val_idx = training_data.spatial_split(bounds, 0.3, seed, block=0)
        assert sorted(train_idx + val_idx) == list(range(6))
        for a, b in ((0, 1), (2, 3)):
            assert (a in val_idx) == (b in val_idx)


@pytest.mark.data
@pytest.mark.skipif(not TRAIN.is_dir(), reason=f"real training tiles not available at {TRAIN}")
def test_real_training_tiles_split_without_shared_windows():
    tiles = training_data.load_tile_folder(TRAIN)
    # 41 copies of a footprint are dropped.  On the 6 footprints whose copies disagree the image decides:
    # one copy's label follows the vegetation (F1 0.62-0.90), the other's does not (0.01-0.34).
    conflicts = [f for f in tiles.flags if f["rule"].startswith("copies of one footprint")]
    assert tiles.duplicates_dropped == 41 and len(conflicts) == 6 and len(tiles) == 282
    assert all(f["decision"].startswith("kept") for f in conflicts)
    assert "tile_0188.tif" in tiles.names and "tile_0217.tif" not in tiles.names       # 0217 has 0.4 % mangrove
    assert "tile_0257.tif" in tiles.names and "tile_0173.tif" not in tiles.names
    train_idx, val_idx = training_data.spatial_split(tiles.bounds, 0.2, 0)
    b = np.asarray(tiles.bounds)
    for i in val_idx:
        overlap = (b[train_idx, 0] < b[i, 2]) & (b[train_idx, 2] > b[i, 0]) & \
                  (b[train_idx, 1] < b[i, 3]) & (b[train_idx, 3] > b[i, 1])
        assert not overlap.any()


def test_training_refuses_what_cannot_train(tmp_path):
    tiles = training_data.load_tile_folder(make_tiles(tmp_path, n=4))
    with pytest.raises(ValueError, match="batch size must be at least 2"):
        training.train(tiles, training.TrainOptions(epochs=1, batch_size=1))


def test_masked_loss_ignores_invalid_pixels():
    logits = torch.zeros(1, 1, 4, 4)
    target = torch.zeros(1, 4, 4)
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 0, 0] = False
    base = training.masked_loss(logits, target, valid, 1.0)
    wild = logits.clone()
    wild[0, 0, 0, 0] = 50.0          # a confident wrong answer on a no-data pixel
    assert float(training.masked_loss(wild, target, valid, 1.0)) == pytest.approx(float(base), rel=1e-6)
    valid[0, 0, 0] = True             # ...which counts once the pixel is valid
    assert float(training.masked_loss(wild, target, valid, 1.0)) > float(base) + 1.0


def test_boundary_aware_loss_weighs_mistakes_at_label_edges_only():
    """Left half mangrove, right half not, last column no-data: with a boundary weight, a mistake next to
    the mangrove edge costs more than the same mistake far from it; the no-data edge is no label edge."""
    target = torch.zeros(1, 8, 8)
    target[0, :, :4] = 1.0
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    valid[0, :, 7] = False
    target[0, :, 7] = 1.0  # a mangrove label under the no-data column: not a boundary of valid pixels
    band = training_data.label_edge_band(target.numpy(), 2, valid.numpy())[0]
    assert band[:, 2:6].all() and not band[:, :2].any() and not band[:, 6:].any()
    assert training_data.label_edge_band(target.numpy(), 2)[0][:, 6].all()  # ... which it would be without valid
    right = torch.where(target > 0.5, 5.0, -5.0)[:, None]

    def loss_with_mistake_at(col, weight):
        logits = right.clone()
        logits[0, 0, 3, col] = -logits[0, 0, 3, col]
        return float(training.masked_loss(logits, target, valid, 1.0, boundary_weight=weight))

    assert loss_with_mistake_at(3, 0.0) == pytest.approx(loss_with_mistake_at(0, 0.0), rel=1e-6)
    assert loss_with_mistake_at(3, 2.0) > 1.5 * loss_with_mistake_at(0, 2.0)
    assert loss_with_mistake_at(6, 2.0) == pytest.approx(loss_with_mistake_at(0, 2.0), rel=0.05)  # by the no-data


@pytest.mark.training
def test_short_training_run_is_reproducible_and_its_checkpoint_loads(tmp_path):
    tiles = training_data.load_tile_folder(make_tiles(tmp_path / "tiles", n=6))
    options = training.TrainOptions(epochs=2, batch_size=2, lr=1e-3, val_fraction=0.34, seed=3, head_width=16)
    result = training.train(tiles, options)
    assert len(result.history) == 2 and all(np.isfinite(r["loss"]) for r in result.history)
    assert result.train_windows + result.val_windows == 6
    # the windows trained on come back (a baseline trains on the same), disjoint from validation
    assert len(result.training) == result.train_windows
    assert not set(result.training.names) & set(result.validation.names)
    path = tmp_path / "m.pt"
    checkpoint.save(result.bundle, path, half=True)
    loaded = checkpoint.load(path)
    assert loaded.trained and loaded.training["best_epoch"] in (1, 2)
    assert set(loaded.training["val_names"]) <= {f"tile_{i:04d}.tif" for i in range(6)}
    assert loaded.training["initialisation"].startswith("random")
    # statistics were fitted on training pixels, not left at the untrained placeholders
    assert loaded.norm_mean != checkpoint.UNTRAINED_MEAN
    again = training.train(tiles, options)
    assert [r["loss"] for r in again.history] == pytest.approx([r["loss"] for r in result.history], rel=1e-4)


@pytest.mark.training
def test_train_algorithm_writes_a_model(menet_provider, tmp_path):
    import processing
    folder = make_tiles(tmp_path / "tiles", n=4)
    result = processing.run("menet:trainmenet", {"TILE_FOLDER": str(folder), "EPOCHS": 1, "BATCH_SIZE": 2,
                                                 "VAL_FRACTION": 0.25, "OUTPUT_MODEL": str(tmp_path / "m.pt")})
    assert checkpoint.load(result["OUTPUT_MODEL"]).trained
    assert 0.0 <= result["VAL_F1"] <= 1.0
