"""Cloud-free composites from several dates (issue 27, item 3)."""
from __future__ import annotations

import numpy as np
import pytest

from menet_qgis.core.io.composite import clear_composite

CLEAR, CLOUD, SHADOW = 0, 4, 3   # clouds.py's agreed quality codes
BANDS = ("B2", "B3", "B4", "B8", "B11", "B12")


def _dates(n=4, h=6, w=5, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.01, 0.5, (6, h, w)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("method", ["median", "medoid", "ndvi_max"])
def test_only_clear_observations_count_and_enter(method):
    dates = _dates()
    quality = [np.full((6, 5), CLEAR, np.uint8) for _ in dates]
    # pixel (0, 0): only date 2 clear; (1, 1): no date clear; (2, 2): date 0 NaN in one band, the rest cloud/shadow
    for i, q in enumerate(quality):
        q[0, 0] = CLEAR if i == 2 else CLOUD
        q[1, 1] = SHADOW
        q[2, 2] = CLEAR if i == 0 else CLOUD
    dates[0][4, 2, 2] = np.nan
    composite, count = clear_composite(list(zip(dates, quality)), method=method, bands=BANDS)
    assert composite.dtype == np.float32 and count.dtype == np.uint8
    assert count[0, 0] == 1 and count[1, 1] == 0 and count[2, 2] == 0 and count[3, 3] == 4
    np.testing.assert_array_equal(composite[:, 0, 0], dates[2][:, 0, 0])
    assert np.isnan(composite[:, 1, 1]).all() and np.isnan(composite[:, 2, 2]).all()
    assert np.isfinite(composite[:, count > 0]).all()


def test_median_of_clear_values_only():
    dates = [np.full((6, 2, 2), v, np.float32) for v in (0.1, 0.2, 0.9, 0.3)]
    quality = [np.full((2, 2), q, np.uint8) for q in (CLEAR, CLEAR, CLOUD, CLEAR)]
    composite, count = clear_composite(list(zip(dates, quality)))
    np.testing.assert_allclose(composite, 0.2)   # the cloud's 0.9 never enters
    assert (count == 3).all()


def test_medoid_keeps_one_dates_spectrum():
    dates = _dates(n=5, seed=1)
    quality = [np.zeros((6, 5), np.uint8) for _ in dates]
    composite, _ = clear_composite(list(zip(dates, quality)), method="medoid")
    stack = np.stack(dates)
    same = (stack == composite[None]).all(axis=1)   # (n, h, w): whole spectrum from that date
    assert same.any(axis=0).all()


def test_bad_observations_refused_in_one_line():
    with pytest.raises(ValueError, match="at least one"):
        clear_composite([])
    a = np.zeros((6, 4, 4), np.float32)
    with pytest.raises(ValueError, match="one grid"):
        clear_composite([(a, np.zeros((4, 4), np.uint8)), (np.zeros((6, 4, 5), np.float32), np.zeros((4, 5), np.uint8))])
    with pytest.raises(ValueError, match="unknown composite method"):
        clear_composite([(a, np.zeros((4, 4), np.uint8))], method="mean")
    with pytest.raises(ValueError, match="B4 and B8"):
        clear_composite([(a, np.zeros((4, 4), np.uint8))], method="ndvi_max")
