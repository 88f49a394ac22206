"""The studies behind the model card (``python -m studies.NAME``) still run against the core they import."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import ROOT

SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "magset2").is_dir() or not (SHARED / "jambeli").is_dir(),
                    reason=f"shared Sentinel-2 tiles not available under {SHARED}")
def test_average_models_mixes_by_the_given_shares_and_chooses_the_threshold_again(tmp_path):
    """`--weights 3 1` stores 0.75 × A + 0.25 × B (fp16, as shipped), records the shares and a threshold
    chosen on the real validation windows; a model with other statistics is refused."""
    from menet_qgis.core.model import checkpoint
    a, b = (checkpoint.new_bundle(head_width=16, seed=s) for s in (0, 1))
    for name, bundle in (("a.pt", a), ("b.pt", b)):
        checkpoint.save(bundle, tmp_path / name)
    run = subprocess.run([sys.executable, "-m", "studies.average_models", str(tmp_path / "a.pt"),
                          str(tmp_path / "b.pt"), "--weights", "3", "1", "--out", str(tmp_path / "mix.pt")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    mix = checkpoint.load(tmp_path / "mix.pt")
    key = "encoder.conv1.weight"
    expected = 0.75 * a.model.state_dict()[key] + 0.25 * b.model.state_dict()[key]
    torch.testing.assert_close(mix.model.state_dict()[key], expected, rtol=2e-3, atol=2e-3)
    assert [s["share"] for s in mix.training["averaged_from"]] == [0.75, 0.25]
    assert 0.2 <= mix.threshold <= 0.8 and "validation F1" in run.stdout
    b.norm_mean = [m + 1.0 for m in b.norm_mean]
    checkpoint.save(b, tmp_path / "other.pt")
    refused = subprocess.run([sys.executable, "-m", "studies.average_models", str(tmp_path / "a.pt"),
                              str(tmp_path / "other.pt"), "--out", str(tmp_path / "no.pt")],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "differs" in refused.stderr and not (tmp_path / "no.pt").exists()


@pytest.mark.skipif(not (SHARED / "jambeli").is_dir(), reason=f"shared Jambelí tiles not available under {SHARED}")
def test_honest_site_folds_keep_every_training_window_a_window_away_from_the_held_out_site():
    """studies/honest_folds: each of the four Jambelí sites is held out whole; no window left for training or
    validation overlaps or touches it (the buffer), the northern cluster is a site of its own, and every
    window is held out exactly once over the four folds."""
    from menet_qgis.core.model import channels as ch
    from studies import honest_folds
    tiles = honest_folds.load(ch.RECIPE_V2, ("jambeli",))
    own_groups = list(tiles.groups)
    held_count = [0] * len(tiles)
    for site in range(honest_folds.SITES):
        tiles.groups = list(own_groups)
        honest_folds.label_sites(tiles, site)
        held = [i for i, g in enumerate(tiles.groups) if g == f"jambeli:site{site}"]
        kept = [i for i, g in enumerate(tiles.groups) if not g.startswith(("jambeli:site", "jambeli:buffer"))]
        assert len(held) >= 20 and len(kept) >= 120
        for i in held:
            held_count[i] += 1
        lo = min(tiles.bounds[i][1] for i in held) - honest_folds.WINDOW_M
        hi = max(tiles.bounds[i][3] for i in held) + honest_folds.WINDOW_M
        assert not [i for i in kept if tiles.bounds[i][3] > lo and tiles.bounds[i][1] < hi]
        if site == 3:
            assert min(tiles.bounds[i][1] for i in held) > honest_folds.NORTH_SITE_KM * 1000
    assert held_count == [1] * len(tiles)
