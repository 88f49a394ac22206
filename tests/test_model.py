"""Encoder stages, conv1 mean initialisation, checkpoints that load or refuse clearly."""
import copy

import numpy as np
import pytest
import torch
from torchvision.models import resnet101

from menet_qgis.core.model import channels, checkpoint, menet as model_mod
from menet_qgis.core.model.stages import STAGES, stage_table
from helpers import refined_bundle


def test_stage_maps_have_table_shapes_for_256_window(bundle):
    x = torch.randn(1, 11, 256, 256)
    with torch.inference_mode():
        logits, feats = bundle.model.forward_with_stages(x)
    assert logits.shape == (1, 1, 256, 256)
    got = {name: tuple(t.shape[1:]) for name, t in feats.items()}
    assert got == {
        "stage0": (64, 128, 128), "stage1": (64, 64, 64), "stage2": (256, 64, 64),
        "stage3": (512, 32, 32), "stage4": (1024, 16, 16), "stage5": (2048, 8, 8),
    }
    for s in STAGES:
        assert got[s.name] == (s.channels, 256 // s.stride, 256 // s.stride)


def test_stage_table_names_nodes_and_stock_sizes():
    table = stage_table(256)
    assert "stage4  layer3" in table and "16×16×1024" in table
    assert "stage5  layer4" in table and "8×8×2048" in table
    assert "stage0  relu" in table and "stage1  maxpool" in table


def known_imagenet_state():
    """A ResNet-101 state dict with recognisable conv1 kernels (stands in for ImageNet weights)."""
    torch.manual_seed(1)
    state = resnet101(weights=None).state_dict()
    w = torch.zeros(64, 3, 7, 7)
    w[:, 0], w[:, 1], w[:, 2] = 1.0, 2.0, 6.0          # R, G, B kernels: mean 3
    w[5, 2, 3, 3] = 9.0                                 # one odd tap: mean of (1, 2, 9) = 4
    state["conv1.weight"] = w
    return state


def test_conv1_is_rgb_mean_scaled_and_rest_of_backbone_loads():
    state = known_imagenet_state()
    net = model_mod.MENet(imagenet_state=state)
    conv1 = net.encoder.conv1.weight.detach()
    assert conv1.shape == (64, 11, 7, 7)
    scale = 3.0 / 11
    assert torch.allclose(conv1[0, :, 0, 0], torch.full((11,), 3.0 * scale))
    assert torch.allclose(conv1[5, :, 3, 3], torch.full((11,), 4.0 * scale))
    assert torch.equal(net.encoder.state_dict()["layer3.7.conv2.weight"], state["layer3.7.conv2.weight"])
    assert torch.equal(net.encoder.bn1.running_mean, state["bn1.running_mean"])


def test_grey_input_gives_same_conv1_response_as_pretrained_rgb():
    state = known_imagenet_state()
    new = model_mod.mean_rgb_conv1(state["conv1.weight"], 11)
    grey = torch.rand(1, 1, 16, 16)
    rgb_out = torch.nn.functional.conv2d(grey.expand(1, 3, 16, 16), state["conv1.weight"], padding=3)
    new_out = torch.nn.functional.conv2d(grey.expand(1, 11, 16, 16), new, padding=3)
    assert torch.allclose(rgb_out, new_out, atol=1e-4)


def test_imagenet_file_found_in_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    logs = []
    assert checkpoint.load_imagenet_state(log=logs.append) is None
    assert "random init" in logs[-1]
    target = model_mod.imagenet_weight_candidates()[0]
    target.parent.mkdir(parents=True)
    torch.save(known_imagenet_state(), target)
    state = checkpoint.load_imagenet_state(log=logs.append)
    assert state is not None and str(target) in logs[-1]
    with pytest.raises(FileNotFoundError):
        checkpoint.load_imagenet_state(str(tmp_path / "nope.pth"))


def test_checkpoint_round_trip_in_half_precision(bundle, tmp_path):
    bundle = copy.deepcopy(bundle)  # the fixture is shared by the session: other tests map with it
    bundle.norm_mean = list(np.linspace(-1, 1, 11))
    path = tmp_path / "m.pt"
    checkpoint.save(bundle, path, half=True)
    again = checkpoint.load(path)
    assert again.norm_mean == pytest.approx(bundle.norm_mean)
    assert again.pca.component == pytest.approx(bundle.pca.component)
    x = torch.randn(1, 11, 64, 64)
    with torch.inference_mode():
        a, b = bundle.model.eval()(x), again.model(x)
    assert torch.allclose(torch.sigmoid(a), torch.sigmoid(b), atol=1e-2)


def edited(src, dst, **changes):
    record = torch.load(src, weights_only=True)
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    torch.save(record, dst)
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"recipe": {"name": "other-recipe", "version": 3, "channels": ["a"]}}, "channel recipe other-recipe v3"),
    ({"architecture": {"name": "menet-resnet101", "version": 99, "in_channels": 11}}, "architecture menet-resnet101 v99"),
    ({"format": None}, "not an ME-Net checkpoint"),
    ({"pca": {"mean": [0.1] * 4, "component": [0.4] * 4}}, "PCA basis does not hold 5"),
    ({"normalisation": {"mean": [0.0] * 11, "std": [0.0] * 11}}, "not finite and positive"),
    ({"architecture": {"name": "menet-resnet101", "version": 1, "in_channels": 11, "refine_width": 16}},
     "v1 has no refinement"),
    ({"state_dict": None}, "holds no weights"),
    ({"state_dict": {"head.classifier.weight": torch.zeros(1, 64, 1, 1)}}, "weights do not fit"),
])
def test_mismatched_checkpoint_names_the_mismatch(untrained_path, tmp_path, changes, message):
    bad = edited(untrained_path, tmp_path / "bad.pt", **changes)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(bad)


def test_missing_and_corrupt_checkpoints(untrained_path, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(untrained_path.read_bytes()[:5000])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable ME-Net checkpoint"):
        checkpoint.load(corrupt)


def test_checkpoint_never_unpickles_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "payload": Evil()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="refused: the file contains Python objects that could run code"):
        checkpoint.load(path)


def test_recipe_record_is_what_checkpoints_store(untrained_path):
    record = torch.load(untrained_path, weights_only=True)
    assert record["recipe"] == channels.DEFAULT_RECIPE.record()
    assert record["recipe"]["channels"] == ["red", "green", "blue", "nir", "swir1", "ndvi", "mndwi",
                                            "fdi", "mvi", "mdi11", "pc1"]


def test_refined_models_are_architecture_v2_and_round_trip(bundle, tmp_path):
    refined = refined_bundle()
    path = tmp_path / "refined.pt"
    checkpoint.save(refined, path)
    record = torch.load(path, weights_only=True)
    assert record["architecture"]["version"] == 2 and record["architecture"]["refine_width"] == 8
    assert bundle.model.architecture_record()["version"] == 1  # plain models stay readable by v1-only plugins
    again = checkpoint.load(path)
    x = torch.randn(1, 11, 64, 64)
    with torch.inference_mode():
        assert torch.equal(refined.model.eval()(x), again.model(x))


def test_fine_tuning_into_a_refined_model_starts_from_the_same_map(bundle):
    from menet_qgis.core.training.train import init_weights_from
    target = checkpoint.new_bundle(seed=1, refine_width=8).model.eval()
    x = torch.randn(1, 11, 64, 64)
    with torch.inference_mode():
        before = target(x)
        init_weights_from(target, bundle.model, "untrained.pt")
        assert (before - target(x)).abs().max() > 0.1
        # the refinement's correction starts at zero: the same map, to float rounding (the shared
        # fixture may run in another memory layout after the engine's tests)
        torch.testing.assert_close(target(x), bundle.model(x), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="refined.pt does not fit this model"):
        init_weights_from(copy.deepcopy(bundle.model), refined_bundle().model, "refined.pt")
