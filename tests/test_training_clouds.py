"""Training does not learn to see through clouds (issue 27, item 5): labelled pixels the maps' cloud detector
calls cloud, cloud shadow or cirrus carry no loss and no validation score, the pixels set aside are counted
per source (log line and the checkpoint's training record), and ``train_on_clouds`` turns it off."""
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import S2_NAMES, TRAIN, s2_reflectance, write_raster
from menet_qgis.core.io import clouds
from menet_qgis.core.model import channels, checkpoint
from menet_qgis.core.model.checkpoint import read_record
from menet_qgis.core.training import data as training_data
from menet_qgis.core.training import train as training
from menet_qgis.core.training.train import TrainOptions

MAGSET2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "magset2" / "tiles"
#: An opaque cloud's reflectance in B2, B3, B4, B8, B11, B12: bright and flat from blue to SWIR.
CLOUD = np.array([0.55, 0.54, 0.55, 0.58, 0.42, 0.30], np.float32)
SIZE = 64


def cloudy_tiles(folder: Path, n: int = 6, flip_under_cloud: bool = False) -> Path:
    """Tile pairs (vegetation left, water right, left half labelled mangrove) on a 10 m grid; tiles 0 and 3
    carry an opaque cloud over rows 8-31 of their left half.  ``flip_under_cloud``: the labels under the
    cloud say the opposite (as a mask from another date or a coarse map may)."""
    from rasterio.transform import from_origin
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        t = from_origin(600000 + 4000 * i, 9700000, 10, 10)
        img = s2_reflectance(SIZE, SIZE, seed=i)
        mask = np.zeros((1, SIZE, SIZE), np.float32)
        mask[0, :, : SIZE // 2] = 1.0
        if i in (0, 3):
            img[:, 8:32, 4:28] = CLOUD[:, None, None] + np.random.default_rng(i).normal(0, 0.01, (6, 24, 24))
            if flip_under_cloud:
                mask[0, 8:32, 4:28] = 0.0
        write_raster(folder / f"tile_{i:04d}.tif", img, S2_NAMES, transform=t)
        write_raster(folder / f"mask_{i:04d}.tif", mask, transform=t)
    return folder


class Log:
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)

    warn = info

    def progress(self, value):
        pass

    def cancelled(self):
        return False


def test_pixels_under_clouds_leave_the_loss_and_the_scores_and_are_counted(tmp_path):
    tiles = training_data.load_tile_folder(cloudy_tiles(tmp_path / "t"), spec=training_data.SourceSpec(
        str(tmp_path / "t"), name="coast"))
    lines = []
    report = training_data.leave_out_clouds(tiles, channels.DEFAULT_RECIPE, lines.append)
    placed, near = np.zeros(tiles.valid.shape, bool), np.zeros(tiles.valid.shape, bool)
    placed[[0, 3], 8:32, 4:28] = True
    near[[0, 3], 4:36, 0:32] = True                          # the cloud and a rim the detector may add
    assert tiles.cloud[placed].mean() > 0.95              # the opaque cloud is found ...
    assert not tiles.cloud[~near].any()                     # ... and nothing else (vegetation, water)
    assert not (tiles.loss_valid & tiles.cloud).any() and not (tiles.scored & tiles.cloud).any()
    assert tiles.valid[placed].all()                        # still input: the model sees the cloud
    r = report["coast"]
    assert r["cloud_pixels"] == int(tiles.cloud.sum()) and r["windows"] == 2 and r["of_windows"] == 6
    assert len(lines) == 1 and lines[0].startswith(f"coast: {r['cloud_pixels']} labelled pixels under clouds")
    assert "in 2 of 6 windows" in lines[0] and "carry no loss" in lines[0]


def test_a_window_under_a_cloud_keeps_its_labels_in_subsets_and_concatenations(tmp_path):
    a = training_data.load_tile_folder(cloudy_tiles(tmp_path / "a"))
    b = training_data.load_tile_folder(cloudy_tiles(tmp_path / "b", n=2))
    training_data.leave_out_clouds(a, channels.DEFAULT_RECIPE)
    both = training_data.TileSet.concat([a, b])             # b was not looked at: no clouds marked there
    assert both.cloud.shape == both.valid.shape and both.cloud[:6].sum() == a.cloud.sum()
    assert not both.cloud[6:].any() and np.array_equal(both.scored[6:], b.valid)
    sub = both.subset([3, 7])
    assert np.array_equal(sub.cloud[0], a.cloud[3]) and not sub.cloud[1].any()


def test_the_loss_does_not_see_labels_under_clouds():
    """With the cloud's pixels out of loss_valid, any label there gives the same loss (and gradient)."""
    logits = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    target = (torch.arange(16)[None, None, :] < 8).float().expand(2, 16, 16).clone()
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    valid[0, 2:10, 1:7] = False                              # under a cloud
    flipped = target.clone()
    flipped[0, 2:10, 1:7] = 1 - flipped[0, 2:10, 1:7]
    grads = []
    for t in (target, flipped):
        logits.grad = None
        loss = training.masked_loss(logits, t, valid, 2.0)
        loss.backward()
        grads.append((float(loss.detach()), logits.grad.clone()))
    assert grads[0][0] == grads[1][0] and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.training
def test_labels_under_clouds_do_not_change_what_is_learned_unless_asked(tmp_path):
    """The same windows with the labels under their clouds flipped train to the same weights when clouds
    carry no loss (the default), and to other weights with train_on_clouds; the count is in the log and in
    the checkpoint's training record."""
    def load(folder, ignore_clouds=True):
        log = Log()
        return training_data.load_tile_folder(folder, log=log.info, ignore_clouds=ignore_clouds), log.lines

    def weights(tiles, **kw):
        log = Log()
        options = TrainOptions(epochs=1, batch_size=2, lr=1e-3, val_fraction=0.34, seed=3, head_width=16, **kw)
        result = training.train(tiles, options, log)
        return result, log.lines, torch.cat([p.detach().flatten() for p in result.bundle.model.parameters()])

    (right, said), (wrong, _) = load(cloudy_tiles(tmp_path / "right")), \
        load(cloudy_tiles(tmp_path / "wrong", flip_under_cloud=True))
    assert (right.labels != wrong.labels).sum() == 2 * 24 * 24
    a, lines, wa = weights(right)
    b, _, wb = weights(wrong)
    assert torch.equal(wa, wb) and a.best == b.best
    said = [line for line in said if "labelled pixels under clouds" in line]
    assert len(said) == 1 and said[0].startswith("right: ")   # the source: the folder's name
    assert not any("labelled pixels under clouds" in line for line in lines)  # looked for once, by the loader
    counted = int(said[0].split(": ")[1].split()[0])
    assert counted >= 0.95 * 2 * 24 * 24
    checkpoint.save(a.bundle, tmp_path / "m.pt", half=True)
    record = read_record(tmp_path / "m.pt")["training"]
    source = record["sources"]["right"]
    assert record["clouds_ignored"] is True
    assert source["cloud_pixels_ignored"] + source["val_cloud_pixels_unscored"] == counted

    # train() alone leaves clouds out of windows loaded without it, on a copy (the caller's are left as they were)
    (plain, _), (plain_wrong, _) = load(tmp_path / "right", False), load(tmp_path / "wrong", False)
    before = plain.loss_valid.copy()
    c, lines_c, wc = weights(plain)
    assert plain.cloud is None and np.array_equal(plain.loss_valid, before)
    assert [line for line in lines_c if "labelled pixels under clouds" in line] == said
    assert c.bundle.training["clouds_ignored"] is True

    d, lines_d, wd = weights(plain, train_on_clouds=True)
    e, _, we = weights(plain_wrong, train_on_clouds=True)
    assert not torch.equal(wd, we)                             # the labels under the clouds taught something
    assert not any("labelled pixels under clouds" in line for line in lines_d)
    assert d.bundle.training["clouds_ignored"] is False
    assert "cloud_pixels_ignored" not in d.bundle.training["sources"]["right"]


def test_the_switch_is_declared_once_and_reaches_the_training_loop():
    from menet_qgis import jobs, options
    option = options.by_name(options.TRAIN, "train_on_clouds")
    assert option.default is False and TrainOptions().train_on_clouds is False
    job = jobs.TrainJob.from_dict({"output": "m.pt", "tiles": ["t"], "train_on_clouds": True})
    assert job.train_on_clouds is True
    parser = options.argparse.ArgumentParser()
    options.add_arguments(parser, options.TRAIN)
    assert parser.parse_args(["--tiles", "t", "--out", "m.pt", "--train-on-clouds"]).train_on_clouds is True


@pytest.mark.data
@pytest.mark.skipif(not MAGSET2.is_dir(), reason=f"MagSet-2 tiles not available at {MAGSET2}")
def test_real_cloudy_magset2_tiles_lose_their_cloud_pixels_and_clear_ones_keep_theirs(tmp_path):
    """On real MagSet-2 tiles: the cloudy tiles 1_41, 1_48 and 2_01 lose their cloud's labelled pixels (71 %,
    46 % and 9 % of them with the detector of d6fe56d), the clear and bright ones (sand 0_45, salt ponds 0_23,
    dense mangrove 5_10, 3_05) none."""
    import shutil
    names = ["1_41", "1_48", "2_01", "0_45", "0_23", "5_10", "3_05"]
    for n in names:
        for kind in ("tile", "mask"):
            shutil.copy(MAGSET2 / f"{kind}_{n}.tif", tmp_path / f"{kind}_{n}.tif")
    tiles = training_data.load_tile_folder(tmp_path, recipe=channels.RECIPE_V2)
    training_data.leave_out_clouds(tiles, channels.RECIPE_V2)
    share = {name[5:-4]: float(tiles.cloud[i].sum() / tiles.valid[i].sum()) for i, name in enumerate(tiles.names)}
    assert share["1_41"] > 0.5 and share["1_48"] > 0.3 and share["2_01"] > 0.04, share
    assert all(share[n] < 0.005 for n in ("0_45", "0_23", "5_10", "3_05")), share
    assert not (tiles.loss_valid & tiles.cloud).any()
