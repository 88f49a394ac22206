"""The 11-channel recipe against plain numpy, band identification, and DN scaling end to end."""
import numpy as np
import pytest
import torch

from helpers import S2_NAMES, write_raster
from menet_qgis.core import files
from menet_qgis.core.model import channels
from menet_qgis.core.inference import runtimes
from menet_qgis.core.io.bands import BandError, plan_input
from menet_qgis.core.model.channels import CHANNEL_NAMES, PCABasis, compute_channels
from menet_qgis.core.io.raster_io import RasterInput

B2, B3, B4, B8, B11, B12 = range(6)
PCA = PCABasis([0.05, 0.06, 0.04, 0.25, 0.12, 0.06], [0.1, 0.2, 0.15, 0.8, 0.45, 0.3])


# --- the recipe ----------------------------------------------------------------
def numpy_ratio(num, den):
    out = np.zeros_like(num)
    ok = np.abs(den) >= 1e-6
    out[ok] = num[ok] / den[ok]
    return out


def numpy_channels(x: np.ndarray, pca: PCABasis) -> np.ndarray:
    """(6, H, W) reflectance -> (11, H, W), written from the published formulas."""
    b = x.astype(np.float64)
    pc1 = np.tensordot(np.asarray(pca.component), b - np.asarray(pca.mean)[:, None, None], axes=1)
    return np.stack([
        b[B4], b[B3], b[B2], b[B8], b[B11],
        numpy_ratio(b[B8] - b[B4], b[B8] + b[B4]),
        numpy_ratio(b[B3] - b[B11], b[B3] + b[B11]),
        b[B8] - b[B4] - b[B2],
        np.clip(numpy_ratio(b[B8] - b[B4], b[B12]), -50, 50),
        np.clip(numpy_ratio(b[B8] - b[B12], b[B12]), -50, 50),
        pc1,
    ])


def torch_channels(x: np.ndarray, pca: PCABasis = PCA) -> np.ndarray:
    return compute_channels(torch.from_numpy(x[None]), pca)[0].numpy()


@pytest.fixture
def edge_cases() -> np.ndarray:
    """Random reflectance with one zero-denominator or clipping case per row of pixels."""
    x = np.random.default_rng(1).uniform(0.01, 0.6, (6, 6, 5))
    x[[B8, B4], 0, 0] = 0.0                       # NIR + Red = 0, NIR - Red = 0
    x[B8, 0, 1], x[B4, 0, 1] = 0.05, -0.05        # NIR + Red = 0 with NIR - Red != 0 (negative DN + offset)
    x[[B3, B11], 1, 0] = 0.0                      # G + SWIR1 = 0
    x[B3, 1, 1], x[B11, 1, 1] = 0.02, -0.02
    x[B12, 2, :2] = 0.0                           # SWIR2 = 0
    x[B12, 3, :2] = 1e-4                          # tiny SWIR2: ratios clipped
    x[B8, 3, 0], x[B4, 3, 0] = 0.5, 0.01          # -> +50
    x[B8, 3, 1], x[B4, 3, 1] = 0.001, 0.5         # -> -50
    x[B12, 4, 0] = 5e-7                           # |SWIR2| below EPS counts as zero
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_channel_matches_numpy(edge_cases, dtype):
    got = torch_channels(edge_cases.astype(dtype))
    want = numpy_channels(edge_cases, PCA)
    assert got.shape == (11, 6, 5) and len(CHANNEL_NAMES) == 11
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for i, name in enumerate(CHANNEL_NAMES):
        np.testing.assert_allclose(got[i], want[i], err_msg=name, **tol)


def test_zero_denominators_give_zero_and_ratios_are_clipped(edge_cases):
    ndvi, mndwi, wfi, mdi = (torch_channels(edge_cases)[CHANNEL_NAMES.index(n)] for n in ("ndvi", "mndwi", "wfi", "mdi"))
    assert ndvi[0, 0] == 0 and ndvi[0, 1] == 0
    assert mndwi[1, 0] == 0 and mndwi[1, 1] == 0
    assert (wfi[2, :2] == 0).all() and (mdi[2, :2] == 0).all()
    assert wfi[3, 0] == 50 and mdi[3, 0] == 50 and wfi[3, 1] == -50
    assert wfi[4, 0] == 0 and mdi[4, 0] == 0
    assert np.isfinite(torch_channels(edge_cases)).all()


def test_nan_pixels_make_no_new_nan_elsewhere(edge_cases):
    edge_cases[B8, 5, 2] = np.nan
    out = torch_channels(edge_cases)
    finite = np.isfinite(out)
    assert finite[:, np.arange(6) != 5].all() and finite[:, 5, np.arange(5) != 2].all()
    for name in ("nir", "fdi", "pc1"):
        assert np.isnan(out[CHANNEL_NAMES.index(name), 5, 2]), name


def test_nan_pixels_stay_nan_in_every_channel(edge_cases):
    edge_cases[:, 5, 2] = np.nan
    assert np.isnan(torch_channels(edge_cases)[:, 5, 2]).all()


def test_pca_fit_matches_numpy_eigendecomposition():
    rng = np.random.default_rng(3)
    pixels = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) * 0.05 + 0.2
    basis = PCABasis.fit(pixels)
    centred = pixels - pixels.mean(axis=0)
    values, vectors = np.linalg.eig(centred.T @ centred / (len(pixels) - 1))
    first = np.real(vectors[:, np.argmax(np.real(values))])
    first *= np.sign(first[np.argmax(np.abs(first))])        # sign: largest weight positive
    np.testing.assert_allclose(basis.mean, pixels.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(basis.component, first, atol=1e-9)
    comp = np.asarray(basis.component)
    assert comp[np.argmax(np.abs(comp))] > 0
    scores = torch_channels(pixels.T.reshape(6, 1, -1), basis)[CHANNEL_NAMES.index("pc1"), 0]
    np.testing.assert_allclose(scores.var(ddof=1), np.max(np.real(values)), rtol=1e-9)
    np.testing.assert_allclose(PCABasis.fit(-pixels).component, basis.component, atol=1e-9)  # same sign rule


def test_pca_record_round_trip():
    assert PCABasis.from_record(PCA.to_record()) == PCA
    with pytest.raises(ValueError, match="expects 6 bands"):
        compute_channels(torch.zeros(1, 5, 2, 2), PCA)


# --- band identification ------------------------------------------------------------
def plan(descriptions, tags=None, dataset_tags=None, dtype="float32", recipe=channels.RECIPE_V1, **kw):
    tags = tags or [{} for _ in descriptions]
    return plan_input(descriptions, tags, dataset_tags or {}, dtype, recipe=recipe, **kw)


@pytest.mark.parametrize("descriptions, indexes", [
    (S2_NAMES, [1, 2, 3, 4, 5, 6]),                                                   # Earth Engine
    (["SWIR2", "swir_1", "N-I-R", "red", "GREEN", "blue"], [6, 5, 4, 3, 2, 1]),
    (["B12", "B11", "B8", "B4", "B3", "B2"], [6, 5, 4, 3, 2, 1]),
    (["B02", "B03", "B04", "B08", "B11", "B12"], [1, 2, 3, 4, 5, 6]),
    (["B4, central wavelength 665 nm", "B3, central wavelength 560 nm", "B2, central wavelength 490 nm",
      "B8, central wavelength 842 nm", "B11, central wavelength 1610 nm", "B12, central wavelength 2190 nm"],
     [3, 2, 1, 4, 5, 6]),                                                             # GDAL SENTINEL2 driver
    (["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"],
     [2, 3, 4, 8, 12, 13]),                                                           # L1C band order
])
def test_bands_identified_from_descriptions(descriptions, indexes):
    result = plan(descriptions)
    assert result.kind == "sentinel2" and result.band_indexes == indexes
    assert "from band descriptions" in result.describe()


def test_bandname_tags_identify_bands_without_descriptions():
    tags = [{"BANDNAME": b} for b in ("B8", "B2", "B3", "B4", "B12", "B11")]
    assert plan([""] * 6, tags).band_indexes == [2, 3, 4, 1, 6, 5]


def test_driver_style_raster_identified_through_raster_input(tmp_path):
    names = ["B4", "B3", "B2", "B8", "B11", "B12"]
    src = write_raster(tmp_path / "s2.tif", np.full((6, 4, 4), 0.1, np.float32),
                       [f"{b}, central wavelength {w} nm" for b, w in zip(names, (665, 560, 490, 842, 1610, 2190))])
    assert RasterInput(src, recipe=channels.RECIPE_V1).plan.band_indexes == [3, 2, 1, 4, 5, 6]


def test_explicit_band_numbers_override_descriptions():
    result = plan(S2_NAMES, band_numbers=[6, 5, 4, 3, 2, 1])
    assert result.band_indexes == [6, 5, 4, 3, 2, 1] and "given band numbers" in result.describe()
    assert plan(["x"] * 8, band_numbers=[8, 7, 6, 5, 4, 3]).band_indexes == [8, 7, 6, 5, 4, 3]
    with pytest.raises(BandError, match="give 6 band numbers"):
        plan(S2_NAMES, band_numbers=[1, 2, 3])
    with pytest.raises(BandError, match=r"band numbers \[7\] are outside 1..6"):
        plan(S2_NAMES, band_numbers=[1, 2, 3, 4, 5, 7])


def test_unidentifiable_bands_error_lists_found_and_needed():
    with pytest.raises(BandError) as err:
        plan(["Blue", "Green", "Red", "NIR", "band5", ""])
    text = str(err.value)
    assert "cannot identify Sentinel-2 bands B11, B12 in this 6-band raster" in text
    assert "1:Blue=B2" in text and "5:band5" in text and "6:(no description)" in text
    assert "needs B2, B3, B4, B8, B11, B12" in text and "band numbers explicitly" in text


def test_eleven_bands_pass_through_as_a_menet_stack():
    for descriptions in (CHANNEL_NAMES, [""] * 11):
        result = plan(descriptions)
        assert result.kind == "stack11" and result.band_indexes == list(range(1, 12))
        assert result.scale == 1.0 and result.offset == 0.0
    with pytest.raises(BandError, match="B12"):  # 11 named Sentinel-2 bands are not a stack
        plan(["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11"])


@pytest.mark.parametrize("dataset_tags, dn_offset, offset, source", [
    ({"BOA_ADD_OFFSET": "-1000"}, None, -1000.0, "offset from product metadata"),
    ({"RADIO_ADD_OFFSET": "-1000"}, None, -1000.0, "offset from product metadata"),
    ({"BOA_ADD_OFFSET": "-1000"}, 0.0, -1000.0, "offset from product metadata"),  # metadata wins
    ({}, -1000.0, -1000.0, "offset from the parameter"),
    ({}, None, 0.0, "need offset -1000"),
])
def test_integer_dn_offset_sources(dataset_tags, dn_offset, offset, source):
    result = plan(S2_NAMES, dataset_tags=dataset_tags, dtype="uint16", dn_offset=dn_offset)
    assert (result.kind, result.offset, result.scale, result.zero_is_nodata) == ("sentinel2", offset, 1e-4, True)
    assert source in result.describe() and "DN 0 is no data" in result.describe()


def test_float_input_is_reflectance_as_it_is():
    result = plan(S2_NAMES, dataset_tags={"BOA_ADD_OFFSET": "-1000"}, dtype="float32", dn_offset=-1000)
    assert (result.scale, result.offset, result.zero_is_nodata) == (1.0, 0.0, False)
    assert "float32 values read as surface reflectance" in result.describe()


# --- DN end to end --------------------------------------------------------------------
def test_dn_with_offset_tag_gives_the_same_model_input_as_reflectance(bundle, tmp_path):
    dn = np.random.default_rng(5).integers(1001, 6000, (6, 20, 24)).astype(np.uint16)
    dn[:, 3, 4] = 0                                    # DN 0: no data
    reflectance = (dn.astype(np.float32) - 1000) / 10000
    reflectance[:, 3, 4] = np.nan
    src_dn = write_raster(tmp_path / "dn.tif", dn, channels.SOURCE_BANDS, tags={"BOA_ADD_OFFSET": "-1000"})
    src_refl = write_raster(tmp_path / "refl.tif", reflectance, S2_NAMES)
    batches = []
    for path in (src_dn, src_refl):
        source = RasterInput(path, recipe=bundle.recipe)
        data, valid = source.read(0, 0, 32)
        batches.append((runtimes.prepare_batch(torch.from_numpy(data[None]), torch.from_numpy(valid[None]),
                                               bundle, source.plan).numpy(), valid))
        source.close()
    (x_dn, valid_dn), (x_refl, valid_refl) = batches
    np.testing.assert_array_equal(valid_dn, valid_refl)
    assert not valid_dn[3, 4] and valid_dn[:20, :24].sum() == 20 * 24 - 1
    np.testing.assert_allclose(x_dn, x_refl, rtol=1e-5, atol=1e-5)
    assert (x_dn[0, :, 3, 4] == 0).all()


def test_gdal_sentinel2_driver_subdataset_names_are_opened(tmp_path):
    """A name like SENTINEL2_L2A:...:10m:EPSG_32717 is GDAL's, not a file path: it is read as the product it
    names (tests/test_products.py maps real ones), and a missing product says so in one line."""
    from menet_qgis.core.io import raster_io
    with pytest.raises(files.InputError) as err:
        raster_io.RasterInput(f"SENTINEL2_L2A:{tmp_path}/MTD_MSIL2A.xml:10m:EPSG_32717")
    assert str(err.value) == f"Sentinel-2 product not found: {tmp_path}/MTD_MSIL2A.xml"
