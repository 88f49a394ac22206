"""No silent guesses under clouds (issue 27, item 2): pixels without ground evidence become no-data in the
probability, a quality layer says why, and the masked share is reported."""
from __future__ import annotations

import numpy as np
import pytest

from menet_qgis.core.io import clouds


# --- the quality codes ----------------------------------------------------------------------------
def test_scl_classes_map_to_quality_codes():
    scl = np.arange(12, dtype=np.uint8).reshape(3, 4)
    expected = np.array([[clouds.NO_DATA, clouds.DEFECTIVE, clouds.CLEAR, clouds.SHADOW],
                         [clouds.CLEAR] * 4,
                         [clouds.CLOUD, clouds.CLOUD, clouds.CIRRUS, clouds.CLEAR]], dtype=np.uint8)
    quality = clouds.scl_quality(scl)
    assert quality.dtype == np.uint8
    np.testing.assert_array_equal(quality, expected)
    # out-of-range classes (a corrupt or foreign band) are not invented into clouds
    np.testing.assert_array_equal(clouds.scl_quality(np.array([-1, 300, 255])), [0, 0, 0])


def test_codes_have_names_and_combine_by_precedence():
    assert set(clouds.QUALITY_NAMES) == set(range(7))
    scl = clouds.scl_quality(np.array([[4, 3, 8]]))
    user = clouds.user_mask_quality(np.array([[0.0, np.nan, 2.0]]))
    np.testing.assert_array_equal(user, [[0, 0, clouds.USER_MASK]])
    np.testing.assert_array_equal(clouds.combine(scl, None, user), [[0, clouds.SHADOW, clouds.USER_MASK]])
    with pytest.raises(ValueError):
        clouds.combine(scl, np.zeros((2, 2), np.uint8))


def test_masked_share_and_summary_line():
    quality = np.zeros((10, 10), np.uint8)
    quality[:2] = clouds.CLOUD
    quality[2, :3] = clouds.SHADOW
    assert clouds.masked_share(quality) == pytest.approx(0.23)
    assert clouds.masked_summary(quality).startswith("23 % cloud or shadow: left as no-data")
    assert clouds.masked_summary(np.zeros((4, 4), np.uint8)).startswith("0 % masked")
    total = clouds.add_counts(clouds.code_counts(quality), clouds.code_counts(np.zeros((10, 10), np.uint8)))
    assert clouds.masked_share(total) == pytest.approx(0.115)
    probability = np.full((10, 10), 0.5, np.float32)
    clouds.apply_mask(probability, quality)
    assert np.isnan(probability).sum() == 23 and np.all(probability[3:] == 0.5)
