"""Channel recipe v2 (no B12), training on several sources (un-georeferenced tiles, per-source
weights, coarse-label handling, label-noise rules, splits by location group), the decision
threshold chosen on validation, and resumable training."""
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from helpers import S2_NAMES, s2_reflectance, write_raster
from menet_qgis.core.model import channels, checkpoint
from menet_qgis.core.inference import engine
from menet_qgis.core.training import data as training_data
from menet_qgis.core.training import train as training
from menet_qgis.core.io.bands import BandError, plan_input
from menet_qgis.core.reporting import Cancelled, Reporter

MAGSET2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "magset2" / "tiles"
V2_NAMES = ["B2", "B3", "B4", "B8", "B8A", "B11"]   # MagSet-2's bands: no B12


# --- recipe v2 --------------------------------------------------------------------
def test_recipe_v2_channels_follow_the_published_formulas_in_torch_and_numpy():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.01, 0.5, (2, 5, 6, 7)).astype(np.float32)
    x[0, 3, 0, 0], x[0, 1, 0, 0] = 0.2, 0.2   # B8 - B3 = 0
    x[0, 4, 1, 1], x[0, 1, 1, 1] = 0.1, 0.1   # B11 - B3 = 0: MVI's denominator is zero -> 0
    pca = channels.RECIPE_V2.default_pca()
    got_t = channels.compute_channels(torch.from_numpy(x), pca, channels.RECIPE_V2).numpy()
    got_n = channels.compute_channels_numpy(x, pca, recipe=channels.RECIPE_V2)
    b2, b3, b4, b8, b11 = (x[:, i].astype(np.float64) for i in range(5))
    with np.errstate(divide="ignore", invalid="ignore"):
        mvi = np.where(np.abs(b11 - b3) >= 1e-6, (b8 - b3) / (b11 - b3), 0.0).clip(-50, 50)
        mdi11 = np.where(np.abs(b11) >= 1e-6, (b8 - b11) / b11, 0.0).clip(-50, 50)
    names = channels.RECIPE_V2.channel_names
    np.testing.assert_allclose(got_t[:, names.index("mvi")], mvi, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_t[:, names.index("mdi11")], mdi11, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_t[:, names.index("ndvi")], (b8 - b4) / (b8 + b4), rtol=1e-5)
    np.testing.assert_allclose(got_n, got_t, rtol=1e-5, atol=1e-6)
    assert got_t[0, names.index("mvi"), 1, 1] == 0 and np.isfinite(got_t).all()


def test_recipes_are_told_apart_and_unknown_ones_refused():
    assert channels.recipe_for(channels.RECIPE_V1.record()) is channels.RECIPE_V1
    assert channels.recipe_for(channels.RECIPE_V2.record()) is channels.RECIPE_V2
    # an old v1 record (before source_bands was stored) still reads as v1
    old = {k: v for k, v in channels.RECIPE_V1.record().items() if k != "source_bands"}
    assert channels.recipe_for(old) is channels.RECIPE_V1
    with pytest.raises(ValueError, match="v2 .*wfi"):  # v2's number with v1's channels: refused
        channels.recipe_for({**channels.RECIPE_V2.record(), "channels": channels.RECIPE_V1.channel_names})


def test_band_mapping_finds_b8_not_b8a_and_needs_b12_only_for_v1():
    tags = [{}] * 6
    plan = plan_input(V2_NAMES, tags, {"BOA_ADD_OFFSET": "0"}, "uint16", recipe=channels.RECIPE_V2)
    assert plan.band_indexes == [1, 2, 3, 4, 6] and plan.offset == 0 and plan.scale == 1e-4
    with pytest.raises(BandError, match="B12.*recipe menet-s2 v1"):
        plan_input(V2_NAMES, tags, {}, "uint16", recipe=channels.RECIPE_V1)
    # six band numbers in the documented B2..B12 order: a v2 model ignores the sixth
    plan = plan_input(["a"] * 6, tags, {}, "float32", band_numbers=[1, 2, 3, 4, 5, 6], recipe=channels.RECIPE_V2)
    assert plan.band_indexes == [1, 2, 3, 4, 5]


# --- several sources ----------------------------------------------------------------
def write_plain_tiles(folder: Path, zones=(0, 1, 2), per_zone=3, size=32, water_in_label=None):
    """Un-georeferenced uint16 DN tiles named like MagSet-2's (tile_<zone>_<k>.tif, no CRS)."""
    folder.mkdir(parents=True, exist_ok=True)
    for zone in zones:
        for k in range(per_zone):
            refl = s2_reflectance(size, size, seed=10 * zone + k)[[0, 1, 2, 3, 3, 4]]  # B8A ~ B8
            mask = np.zeros((size, size), np.uint8)
            mask[:, : size // 2] = 1
            if (zone, k) == water_in_label:   # coarse label: a channel of water inside the polygon
                refl[:, :, 2:10] = np.array([0.06, 0.08, 0.05, 0.02, 0.02, 0.01])[:, None, None]
            name = f"{zone}_{k:02d}.tif"
            for path, data, desc, dtype in ((folder / f"tile_{name}", (refl * 10000).round(), V2_NAMES, "uint16"),
                                            (folder / f"mask_{name}", mask[None], None, "uint8")):
                with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=len(data),
                                   dtype=dtype) as ds:
                    ds.write(data.astype(dtype))
                    if desc:
                        ds.descriptions = tuple(desc)
                        ds.update_tags(BOA_ADD_OFFSET="0")
    return folder


def test_source_spec_parses_and_refuses_unknown_keys():
    spec = training_data.SourceSpec.parse(r"/data/m:name=magset2,weight=0.5,edge_ignore=1,group=tile_(\d+)_")
    assert (spec.folder, spec.source, spec.weight, spec.edge_ignore, spec.group) == \
        ("/data/m", "magset2", 0.5, 1, r"tile_(\d+)_")
    assert training_data.SourceSpec.parse("C:/data/tiles:weight=2").folder == "C:/data/tiles"   # a drive letter
    assert training_data.SourceSpec.parse("/data/a:b").folder == "/data/a:b"                     # ':' in a name
    with pytest.raises(ValueError, match="use name="):
        training_data.SourceSpec.parse("/data/m:name=x,colour=red")
    with pytest.raises(ValueError, match="weight must be > 0"):
        training_data.SourceSpec.parse("/data/m:weight=0")
    assert training_data.SourceSpec.parse("/data/m:align=3").align == 3
    with pytest.raises(ValueError, match="align 0 to 8"):
        training_data.SourceSpec.parse("/data/m:align=20")


def test_ungeoreferenced_tiles_load_grouped_by_zone_with_label_edges_and_water_set_aside(tmp_path):
    folder = write_plain_tiles(tmp_path / "m", water_in_label=(1, 0))
    spec = training_data.SourceSpec.parse(f"{folder}:name=m,weight=0.5,edge_ignore=1,group=tile_(\\d+)_")
    messages = []
    tiles = training_data.load_tile_folder(folder, recipe=channels.RECIPE_V2, spec=spec, log=messages.append)
    assert tiles.images.shape == (9, 5, 32, 32) and tiles.bounds == [None] * 9 and tiles.crs is None
    assert sorted(set(tiles.groups)) == ["m:0", "m:1", "m:2"]
    # reflectance = DN / 10000 with offset 0, as at inference
    assert 0 < np.nanmax(tiles.images) < 1
    # 1 px either side of the label edge (columns 15, 16) is scored but left out of the loss
    assert tiles.valid[:, :, 15:17].all() and not tiles.loss_valid[:, :, 15:17].any()
    assert tiles.loss_valid[:, :, 14].all() and tiles.loss_valid[:, :, 17].all()
    # the water channel labelled mangrove is flagged: its pixels leave the loss, the window's weight halves
    i = tiles.names.index("tile_1_00.tif")
    assert [f["window"] for f in tiles.flags] == ["tile_1_00.tif"]
    assert not tiles.loss_valid[i, :, 2:10].any() and tiles.weights[i] == pytest.approx(0.25)
    assert any("tile_1_00.tif" in m and "left out of the loss" in m for m in messages)


def test_misregistered_labels_are_found_and_moved_back_onto_their_image():
    """A label drawn 2 px south and 1 px west of the mangrove in its image is put back where the
    image has it; the strip the move leaves without a label is no longer valid."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    mangrove = ((yy - 20) ** 2 / 150 + (xx - 26) ** 2 / 90 < 1) | (xx > 40)
    images = np.empty((1, 5, 48, 48), np.float32)                 # B2, B3, B4, B8, B11
    images[0] = np.where(mangrove, np.array([0.03, 0.05, 0.03, 0.30, 0.12])[:, None, None],
                         np.array([0.06, 0.08, 0.05, 0.04, 0.02])[:, None, None])   # vegetation vs water
    images += rng.normal(0, 0.005, images.shape).astype(np.float32)
    drawn = np.roll(mangrove, (2, -1), axis=(0, 1)).astype(np.float32)[None]
    valid = np.ones_like(drawn, bool)
    offsets = training_data.label_offsets(images, drawn, valid, channels.RECIPE_V2, 3)
    assert offsets.tolist() == [[2, -1]]
    labels, moved_valid = training_data.move_labels(drawn, valid, offsets)
    assert not moved_valid[0, -2:, :].any() and not moved_valid[0, :, :1].any()    # no label came from there
    assert moved_valid[0, :-2, 1:].all()
    assert np.array_equal(labels[0][moved_valid[0]] >= 0.5, mangrove[moved_valid[0]])
    assert training_data.label_offsets(images, mangrove.astype(np.float32)[None], valid, channels.RECIPE_V2,
                                       3).tolist() == [[0, 0]]  # a label in place stays


def test_duplicate_footprints_with_different_labels_keep_the_copy_the_image_supports(tmp_path):
    """Copies of one place whose labels disagree: the image (vegetated left half) decides when it clearly
    can, else every copy goes."""
    from rasterio.transform import from_origin
    # place 0: two plausible labels (16 vs 20 columns) -> both dropped;
    # place 4000: the first copy labels the water half, the later one the vegetation -> the later one kept
    for i, (shift, first_col, last_col) in enumerate([(0, 0, 16), (4000, 16, 32), (8000, 0, 16), (0, 0, 20),
                                                      (4000, 0, 16)]):
        tt = from_origin(600000 + shift, 9700000, 10, 10)
        write_raster(tmp_path / f"tile_{i:04d}.tif", s2_reflectance(32, 32, seed=i), S2_NAMES, transform=tt)
        mask = np.zeros((1, 32, 32), np.float32)
        mask[0, :, first_col:last_col] = 1
        write_raster(tmp_path / f"mask_{i:04d}.tif", mask, transform=tt)
    tiles = training_data.load_tile_folder(tmp_path)
    assert tiles.names == ["tile_0004.tif", "tile_0002.tif"] and tiles.duplicates_dropped == 2
    assert (tiles.labels[0][:, :16] == 1).all() and (tiles.labels[0][:, 16:] == 0).all()
    assert np.array_equal(tiles.images[0], training_data.load_tile_folder(tmp_path, "tile_0004.tif").images[0])
    decisions = {f["window"]: f["decision"] for f in tiles.flags if f["rule"].startswith("copies of one footprint")}
    assert decisions["tile_0004.tif"].startswith("kept tile_0004.tif") and "tile_0001.tif 0.00" in decisions["tile_0004.tif"]
    assert decisions["tile_0000.tif"].startswith("dropped, every copy")


def test_split_holds_out_whole_groups_and_validates_on_named_ones(tmp_path):
    spec = training_data.SourceSpec.parse(f"{tmp_path / 'm'}:name=m,group=tile_(\\d+)_")
    tiles = training_data.load_tile_folder(write_plain_tiles(tmp_path / "m", zones=(0, 1, 2, 3)),
                                           recipe=channels.RECIPE_V2, spec=spec)
    train_idx, val_idx, test_idx = training_data.split_windows(tiles, 0.2, 0, val_groups=["m:1"],
                                                               holdout_groups=["m:3"])
    group = lambda idx: {tiles.groups[i] for i in idx}  # noqa: E731
    assert group(test_idx) == {"m:3"} and group(val_idx) == {"m:1"} and group(train_idx) == {"m:0", "m:2"}
    # without named groups whole groups are drawn: no zone on both sides
    train_idx, val_idx, _ = training_data.split_windows(tiles, 0.3, 0)
    assert group(train_idx).isdisjoint(group(val_idx)) and val_idx


@pytest.mark.training
def test_sources_with_different_bands_and_scales_train_together(tmp_path):
    """Float reflectance with B12 (georeferenced) + uint16 DN without B12 (no CRS): recipe v2 reads both."""
    from test_training import make_tiles
    geo = training_data.load_tile_folder(make_tiles(tmp_path / "geo", n=4, size=32), recipe=channels.RECIPE_V2)
    spec = training_data.SourceSpec.parse(f"{tmp_path / 'm'}:name=m,weight=2,group=tile_(\\d+)_")
    plain = training_data.load_tile_folder(write_plain_tiles(tmp_path / "m", zones=(0, 1)), recipe=channels.RECIPE_V2,
                                           spec=spec)
    both = training_data.TileSet.concat([geo, plain])
    assert both.images.shape[1] == 5 and set(both.sources) == {"geo", "m"}
    assert both.weights.tolist() == [1.0] * 4 + [2.0] * 6
    options = training.TrainOptions(epochs=1, batch_size=2, seed=0, head_width=16, device="cpu", val_groups=["m:1"],
                                    boundary_weight=2.0)
    result = training.train(both, options)
    assert result.bundle.recipe is channels.RECIPE_V2 and len(result.bundle.pca.mean) == 5
    assert result.bundle.training["boundary_weight"] == 2.0  # the boundary-aware loss ran and is recorded
    assert result.bundle.training["sources"]["m"] == {"train_windows": 3, "val_windows": 3,  # no clouds there
                                                      "cloud_pixels_ignored": 0, "val_cloud_pixels_unscored": 0}
    with pytest.raises(ValueError, match="recipe menet-s2 v1 reads 6"):
        training.train(both, training.TrainOptions(epochs=1, batch_size=2, recipe=channels.RECIPE_V1))
    from menet_qgis import jobs
    with pytest.raises(ValueError, match="boundary_weight must be 0 or more, got -1"):
        jobs.train({"tiles": str(tmp_path / "m"), "output": str(tmp_path / "x.pt"), "boundary_weight": -1}, None)
    assert not (tmp_path / "x.pt").exists()


# --- the decision threshold -----------------------------------------------------------
def test_best_threshold_maximises_f1_and_prefers_the_middle_on_ties():
    counts = training.ProbabilityCounts()
    rng = np.random.default_rng(0)
    truth = rng.random(20000) < 0.4
    prob = np.where(truth, rng.uniform(0.3, 1.0, truth.size), rng.uniform(0.0, 0.42, truth.size))
    counts.add(prob.astype(np.float32), truth)
    threshold, f1 = counts.best_threshold()
    assert 0.36 <= threshold <= 0.43 and f1 > counts.confusion(0.5).scores()["f1"]
    assert counts.confusion(threshold).total == truth.size
    flat = training.ProbabilityCounts()
    flat.add(np.where(truth, 0.95, 0.05).astype(np.float32), truth)
    assert flat.best_threshold() == (0.5, 1.0)


@pytest.mark.integration
def test_threshold_travels_from_checkpoint_to_map_to_assessment(untrained_path, tmp_path):
    from helpers import write_s2
    from menet_qgis import jobs
    from menet_qgis.core.io.raster_io import RasterInput
    bundle = checkpoint.load(untrained_path)  # a copy: the session's bundle stays as it is
    bundle.training = {**bundle.training, "threshold": 0.37}
    path = tmp_path / "m.pt"
    checkpoint.save(bundle, path)
    loaded = checkpoint.load(path)
    assert loaded.threshold == pytest.approx(0.37)
    src = RasterInput(write_s2(tmp_path / "in.tif", 64, 64), recipe=loaded.recipe)
    out = engine.extract(loaded, src, tmp_path / "p.tif", engine.EngineOptions(window=64, overlap=0, device="cpu"))
    with rasterio.open(out.probability) as ds:
        assert ds.tags()[engine.THRESHOLD_TAG] == "0.37"
        prob = ds.read(1)
    ref = tmp_path / "ref.tif"
    with rasterio.open(out.probability) as ds:
        profile = ds.profile
    profile.update(dtype="float32")
    with rasterio.open(ref, "w", **profile) as ds:
        ds.write((prob >= 0.37).astype(np.float32)[None])   # a reference the model agrees with at its own threshold
    result = jobs.assess({"prediction": str(out.probability), "reference": str(ref)}, Reporter())
    assert result["results"][0]["threshold"] == pytest.approx(0.37) and result["results"][0]["f1"] == 1.0
    forced = jobs.assess({"prediction": str(out.probability), "reference": str(ref), "threshold": 0.99}, Reporter())
    assert forced["results"][0]["threshold"] == 0.99
    assert checkpoint.ModelBundle(bundle.model, [], [], bundle.pca).threshold == 0.5  # models from before: 0.5


# --- resumable training --------------------------------------------------------------
class StopAfterEpochs(Reporter):
    """Cancels the run during the epoch after ``epochs`` finished ones (as a user or a killed job would)."""

    def __init__(self, epochs):
        self.epochs, self.finished = epochs, 0

    def progress(self, percent):  # called once per finished epoch
        self.finished += 1

    def cancelled(self):
        return self.finished >= self.epochs


@pytest.mark.training
def test_a_stopped_run_resumes_where_it_was_and_ends_as_an_uninterrupted_one(tmp_path):
    from test_training import make_tiles
    tiles = training_data.load_tile_folder(make_tiles(tmp_path / "tiles", n=6, size=32))
    base = dict(epochs=3, batch_size=2, seed=1, head_width=16, device="cpu", val_fraction=0.34)
    straight = training.train(tiles, training.TrainOptions(**base))
    state = tmp_path / "run.resume"
    with pytest.raises(Cancelled):
        training.train(tiles, training.TrainOptions(**base, resume_state=str(state)), StopAfterEpochs(1))
    assert state.is_file()
    resumed = training.train(tiles, training.TrainOptions(**base, resume_state=str(state)))
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in straight.history], rel=1e-5)
    for key, value in straight.bundle.model.state_dict().items():
        torch.testing.assert_close(resumed.bundle.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="another run"):
        training.train(tiles.subset(range(5)), training.TrainOptions(**base, resume_state=str(state)))


@pytest.mark.training
def test_fine_tuning_adds_the_refinement_and_later_fine_tunes_keep_it(tmp_path):
    """--refine-width on a fine-tune of a plain model adds the refinement (saved as architecture v2);
    fine-tuning that model again keeps it unless asked otherwise, and dropping it is refused."""
    from menet_qgis.core.model import checkpoint
    from test_training import make_tiles
    tiles = training_data.load_tile_folder(make_tiles(tmp_path / "tiles", n=6, size=32))
    plain = tmp_path / "plain.pt"
    checkpoint.save(checkpoint.new_bundle(head_width=16, seed=0), plain)
    base = dict(epochs=1, batch_size=2, seed=1, head_width=16, device="cpu", val_fraction=0.34)
    refined = training.train(tiles, training.TrainOptions(**base, init_from=str(plain), refine_width=4))
    checkpoint.save(refined.bundle, tmp_path / "refined.pt")
    record = checkpoint.read_record(tmp_path / "refined.pt")["architecture"]
    assert (record["version"], record["refine_width"]) == (2, 4)
    again = training.train(tiles, training.TrainOptions(**base, init_from=str(tmp_path / "refined.pt")))
    assert again.bundle.model.refine_width == 4
    with pytest.raises(ValueError, match="refined.pt does not fit this model"):
        training.train(tiles, training.TrainOptions(**base, init_from=str(tmp_path / "refined.pt"), refine_width=0))


@pytest.mark.training
def test_fine_tuning_keeps_the_start_models_channel_statistics_unless_its_recipe_differs(tmp_path):
    """The start's first layer was trained on inputs normalised with its PCA, means and deviations;
    refitted on a few windows of one coast they would shift every channel. Another recipe has other
    channels, so a v1 start gets statistics fitted on the new data."""
    from menet_qgis.core.model import channels as ch, checkpoint
    from test_training import make_tiles
    tiles = training_data.load_tile_folder(make_tiles(tmp_path / "tiles", n=6, size=32))
    fitted = training.fit_statistics(tiles, recipe=ch.DEFAULT_RECIPE)
    base = dict(epochs=1, batch_size=2, seed=1, head_width=16, device="cpu", val_fraction=0.34)
    for recipe, name in ((ch.DEFAULT_RECIPE, "v2.pt"), (ch.RECIPE_V1, "v1.pt")):
        start = checkpoint.new_bundle(head_width=16, seed=0, recipe=recipe)
        start.norm_mean = [m + 0.25 for m in start.norm_mean]  # statistics no refit would give
        checkpoint.save(start, tmp_path / name)
        tuned = training.train(tiles, training.TrainOptions(**base, init_from=str(tmp_path / name))).bundle
        if recipe is ch.DEFAULT_RECIPE:
            assert tuned.norm_mean == pytest.approx(start.norm_mean)
            assert tuned.norm_std == pytest.approx(start.norm_std)
            assert (tuned.pca.mean, tuned.pca.component) == (pytest.approx(start.pca.mean),
                                                              pytest.approx(start.pca.component))
        else:
            assert tuned.norm_mean == pytest.approx(fitted[1], abs=0.02)  # fitted on the training part
            assert tuned.norm_mean != pytest.approx(start.norm_mean[:len(tuned.norm_mean)])


@pytest.mark.training
def test_a_second_label_style_trains_its_own_output_and_the_saved_model_keeps_style_0(tmp_path):
    """style=1 sources train an output of their own; the saved model has one output, style 0's,
    and maps exactly as the two-output network's channel 0 did (what validation scored)."""
    from menet_qgis.core.model import checkpoint
    from test_training import make_tiles
    geo = training_data.load_tile_folder(make_tiles(tmp_path / "geo", n=4, size=32), recipe=channels.RECIPE_V2)
    spec = training_data.SourceSpec.parse(f"{tmp_path / 'm'}:name=m,style=1,group=tile_(\\d+)_")
    plain = training_data.load_tile_folder(write_plain_tiles(tmp_path / "m", zones=(0, 1)), recipe=channels.RECIPE_V2,
                                           spec=spec)
    assert plain.styles.tolist() == [1] * 6
    target = torch.zeros(2, 8, 8)
    target[:, :, :4] = 1
    right, wrong = 20 * (2 * target - 1), -20 * (2 * target - 1)
    logits, valid = torch.stack([wrong, right], dim=1), torch.ones(2, 8, 8, dtype=torch.bool)
    # each window is scored on its own style's output: style 1 reads the right channel here
    assert training.masked_loss(logits, target, valid, 1.0, styles=torch.tensor([1, 1])) < 0.01
    assert training.masked_loss(logits, target, valid, 1.0) > 10
    both = training_data.TileSet.concat([geo, plain])
    options = dict(epochs=1, batch_size=2, seed=0, head_width=16, device="cpu", recipe=channels.RECIPE_V2)
    two = checkpoint.new_bundle(head_width=16, seed=3, recipe=channels.RECIPE_V2, label_styles=2)
    x = torch.randn(2, channels.N_CHANNELS, 32, 32)
    both_outputs = two.model.eval()(x)
    assert both_outputs.shape[1] == 2 and not torch.allclose(both_outputs[:, 0], both_outputs[:, 1])
    two.model.head.keep_label_style(0)
    torch.testing.assert_close(two.model(x), both_outputs[:, :1])
    result = training.train(both, training.TrainOptions(**options, val_groups=["m:1"],
                                                        save_best_to=str(tmp_path / "best.pt")))
    assert result.bundle.model.head.label_styles == 1
    assert result.bundle.training["sources"]["m"]["label_style"] == 1
    checkpoint.save(result.bundle, tmp_path / "styled.pt")
    for path in (tmp_path / "styled.pt", tmp_path / "best.pt"):
        loaded = checkpoint.load(path)
        assert loaded.model.head.classifier.out_channels == 1
        assert checkpoint.read_record(path)["architecture"]["version"] == 1  # readable by older plugins
    tuned = training.train(both, training.TrainOptions(**options, val_groups=["m:1"],
                                                      init_from=str(tmp_path / "styled.pt")))
    assert tuned.bundle.model.head.classifier.out_channels == 1   # fine-tuning with styles: each starts as the model
    with pytest.raises(ValueError, match="style 0 .* must have training windows"):
        training.train(plain, training.TrainOptions(**options, val_fraction=0.34))
    with pytest.raises(ValueError, match="style 0 to 7"):
        training_data.SourceSpec.parse("/data/m:style=9")
    with pytest.raises(ValueError, match="cannot be combined with the refinement"):
        checkpoint.new_bundle(head_width=16, refine_width=4, label_styles=2)


# --- the real data ---------------------------------------------------------------------
@pytest.mark.data
@pytest.mark.skipif(not MAGSET2.is_dir(), reason=f"MagSet-2 tiles not available at {MAGSET2}")
def test_real_magset2_tiles_load_with_zones_and_their_noisy_labels_flagged():
    spec = training_data.SourceSpec.parse(f"{MAGSET2}:name=magset2,edge_ignore=1,group=tile_(\\d+)_")
    tiles = training_data.load_tile_folder(MAGSET2, recipe=channels.RECIPE_V2, spec=spec)
    assert len(tiles) == 350 and tiles.images.shape[1:] == (5, 128, 128)
    assert sorted(set(tiles.groups)) == [f"magset2:{z}" for z in (0, 1, 2, 3, 5, 6, 8)]
    assert 0.6 < float(tiles.labels[tiles.valid].mean()) < 0.8            # README: mean share about 0.68
    assert 0.75 < tiles.loss_valid.sum() / tiles.valid.sum() < 0.9         # the 1 px label-edge band
    assert 3 <= len(tiles.flags) <= 15


@pytest.mark.data
@pytest.mark.skipif(not MAGSET2.is_dir(), reason=f"MagSet-2 tiles not available at {MAGSET2}")
def test_real_magset2_labels_are_found_where_its_readme_says_they_sit():
    """README: GMW masks sit about 0.6 px south and 1 px east of the imagery."""
    import re
    messages = []
    spec = training_data.SourceSpec.parse(f"{MAGSET2}:name=magset2,align=3,group=tile_(\\d+)_")
    tiles = training_data.load_tile_folder(MAGSET2, recipe=channels.RECIPE_V2, spec=spec, log=messages.append)
    line = next(m for m in messages if "labels moved onto their images" in m)
    south, east = map(float, re.search(r"sat ([-+.\d]+) px south and ([-+.\d]+) px east", line).groups())
    assert 0.4 < south < 1.0 and 0.8 < east < 1.6, line
    assert 0.01 < 1 - tiles.valid.sum() / tiles.valid.size < 0.03  # the 1-3 px strips the moves left unlabelled


@pytest.mark.integration
@pytest.mark.data
@pytest.mark.skipif(not MAGSET2.is_dir(), reason=f"MagSet-2 tiles not available at {MAGSET2}")
def test_cli_predict_default_model_maps_a_raster_without_b12(tmp_path):
    """Issue 10's must-show: `predict` with no --model on a 6-band B2,B3,B4,B8,B8A,B11 uint16 DN raster
    (no B12): real MagSet-2 pixels of a zone the default model never trained on, given a nominal grid."""
    import subprocess
    import sys
    from rasterio.transform import from_origin

    from helpers import ROOT
    from menet_qgis.core.evaluation.metrics import Confusion
    src = tmp_path / "zone3.tif"
    with rasterio.open(MAGSET2 / "tile_3_07.tif") as ds:
        dn, tags, desc = ds.read(), ds.tags(), ds.descriptions
    assert list(desc) == V2_NAMES
    transform = from_origin(500000, 1000000, 10, 10)
    with rasterio.open(src, "w", driver="GTiff", width=dn.shape[2], height=dn.shape[1], count=6, dtype="uint16",
                       crs="EPSG:32610", transform=transform) as ds:
        ds.write(dn)
        ds.descriptions = desc
        ds.update_tags(**tags)
    proc = subprocess.run([sys.executable, "-m", "menet_qgis", "predict", str(src), "--out-dir", str(tmp_path / "out"),
                           "--device", "cpu", "--runtime", "torch"], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "B12" not in proc.stderr   # no band, warning or error line asks for it
    with rasterio.open(tmp_path / "out" / "zone3_probability.tif") as ds:
        prob, threshold = ds.read(1), float(ds.tags()[engine.THRESHOLD_TAG])
        assert (ds.transform, ds.width, ds.height) == (transform, dn.shape[2], dn.shape[1])
    with rasterio.open(MAGSET2 / "mask_3_07.tif") as ds:
        truth = ds.read(1) >= 1
    scores = Confusion().add(prob >= threshold, truth).scores()
    assert 0 <= prob.min() and prob.max() <= 1 and scores["f1"] > 0.8, scores
