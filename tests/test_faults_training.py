"""Fault cases, round two (issue 26 item 11): training tiles whose masks lie elsewhere, and files left unpaired.

A georeferenced mask must lie on its tile's grid (same CRS, corners within a tenth of a pixel): a mask shifted
by a tile, in another UTM zone or swapped with a neighbour's is refused naming both files, before any epoch.
Masks or tiles without georeferencing (MagSet-2 has none) are paired pixel for pixel as before.  Tiles and
masks pair by name whatever the case of the extension; tiles without masks and masks without tiles are
refused by name.  Each CLI case checks the one error line, the exit status, a previous model byte-identical
and no partial file.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio.errors
from affine import Affine
from rasterio.transform import from_origin

from helpers import S2_NAMES, s2_reflectance, write_raster
from menet_qgis.core.training import data as training_data

SIZE = 32


def error_line(proc) -> str:
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith("menet_qgis: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


def partials(folder) -> list:
    return sorted(p.name for p in Path(folder).glob(".*.partial*")) + \
        sorted(p.name for p in Path(folder).glob(".*.best-so-far"))


def half_mask(size=SIZE, flip=False):
    mask = np.zeros((size, size), np.float32)
    mask[:, : size // 2] = 1
    return mask[:, ::-1].copy() if flip else mask


def grid(i: int):
    """Tile i's 10 m grid: one tile per 4 km column in UTM 17S."""
    return from_origin(600000 + 4000 * i, 9700000, 10, 10)


def make_tiles(folder, n=4, mask_grid=None, mask_crs="EPSG:32717", names=None, georeferenced=True) -> Path:
    """n tile/mask pairs; ``mask_grid(i)`` the mask's transform (default: its tile's), ``names(i)`` the
    (tile, mask) file names (default tile_i.tif, mask_i.tif)."""
    folder = Path(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        for i in range(n):
            tile_name, mask_name = names(i) if names else (f"tile_{i}.tif", f"mask_{i}.tif")
            crs = "EPSG:32717" if georeferenced else None
            transform = grid(i) if georeferenced else Affine.identity()
            write_raster(folder / tile_name, s2_reflectance(SIZE, SIZE, seed=i), S2_NAMES, crs=crs,
                         transform=transform)
            write_raster(folder / mask_name, half_mask(flip=i % 2 == 1)[None],
                         crs=mask_crs if georeferenced else None,
                         transform=(mask_grid(i) if mask_grid else grid(i)) if georeferenced else Affine.identity())
    return folder


def train(cli, tiles, out):
    return cli("train", "--tiles", tiles, "--out", out, "--epochs", 1, "--batch-size", 2, "--device", "cpu")


def refused(cli, tmp_path, tiles, expected: str) -> None:
    """Train on ``tiles`` into a folder that holds a previous model: refused with ``expected``, before training."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pt").write_bytes(b"previous model, must survive\n")
    proc = train(cli, tiles, out / "model.pt")
    assert proc.returncode == 2
    assert error_line(proc) == f"menet_qgis: error: {expected}"
    assert not any(line.startswith("epoch ") for line in proc.stderr.splitlines())
    assert (out / "model.pt").read_bytes() == b"previous model, must survive\n" and partials(out) == []


def test_masks_shifted_off_their_tiles_are_refused(cli, tmp_path):
    """Every mask 1.28 km (128 px) east of its tile: the labels of another place."""
    tiles = make_tiles(tmp_path / "tiles", mask_grid=lambda i: from_origin(600000 + 4000 * i + 1280, 9700000, 10, 10))
    refused(cli, tmp_path, tiles, "mask mask_0.tif does not lie on its tile tile_0.tif: it lies 128.0 px east of it; "
                                  "a mask must share its tile's grid (same CRS, origin and pixel size): pair it with "
                                  "the right tile or cut it to this one")


def test_masks_in_another_utm_zone_are_refused(cli, tmp_path):
    tiles = make_tiles(tmp_path / "tiles", mask_crs="EPSG:32718")
    refused(cli, tmp_path, tiles, "mask mask_0.tif is in EPSG:32718, its tile tile_0.tif in EPSG:32717: a mask must "
                                  "lie on its tile's grid (same CRS, origin and pixel size); reproject the mask onto "
                                  "its tile")


def test_masks_swapped_between_georeferenced_tiles_are_refused(cli, tmp_path):
    tiles = make_tiles(tmp_path / "tiles")
    a, b = (tiles / "mask_1.tif").read_bytes(), (tiles / "mask_2.tif").read_bytes()
    (tiles / "mask_1.tif").write_bytes(b)
    (tiles / "mask_2.tif").write_bytes(a)
    refused(cli, tmp_path, tiles, "mask mask_1.tif does not lie on its tile tile_1.tif: it lies 400.0 px east of it; "
                                  "a mask must share its tile's grid (same CRS, origin and pixel size): pair it with "
                                  "the right tile or cut it to this one")


def test_masks_of_another_pixel_size_are_refused(tmp_path):
    tiles = make_tiles(tmp_path / "tiles", mask_grid=lambda i: from_origin(600000 + 4000 * i, 9700000, 20, 20))
    with pytest.raises(ValueError, match=r"^mask mask_0.tif does not lie on its tile tile_0.tif: its pixels are "
                                         r"20 x 20, the tile's 10 x 10; "):
        training_data.load_tile_folder(tiles)


def test_rounding_in_the_mask_transform_is_not_a_shift(tmp_path):
    tiles = make_tiles(tmp_path / "tiles", mask_grid=lambda i: from_origin(600000 + 4000 * i + 1e-6, 9700000, 10, 10))
    assert len(training_data.load_tile_folder(tiles)) == 4


def test_masks_without_georeferencing_still_pair_pixel_for_pixel(tmp_path):
    """MagSet-2's tiles and masks carry no georeferencing; a georeferenced tile with a plain mask is paired too,
    and the log says so."""
    plain = training_data.load_tile_folder(make_tiles(tmp_path / "plain", georeferenced=False))
    assert len(plain) == 4 and plain.crs is None
    mixed = make_tiles(tmp_path / "mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        write_raster(mixed / "mask_3.tif", half_mask(flip=True)[None], crs=None, transform=Affine.identity())
    log = []
    tiles = training_data.load_tile_folder(mixed, log=log.append)
    assert len(tiles) == 4
    assert "mixed: 1 of 4 pairs have georeferencing on only one of tile and mask (mask_3.tif): paired pixel for " \
           "pixel, right only if each mask was cut from its very tile" in log


def test_upper_case_extensions_are_tiles_too(tmp_path):
    names = lambda i: (f"tile_{i}.TIF", f"mask_{i}.TIF") if i == 1 else \
        (f"tile_{i}.TIF", f"mask_{i}.tif") if i == 2 else (f"tile_{i}.tif", f"mask_{i}.tif")  # noqa: E731
    tiles = training_data.load_tile_folder(make_tiles(tmp_path / "tiles", names=names))
    assert sorted(tiles.names) == ["tile_0.tif", "tile_1.TIF", "tile_2.TIF", "tile_3.tif"]
    assert tiles.labels[tiles.names.index("tile_1.TIF")][:, -1].all()   # its own (flipped) mask, not another's


def test_masks_without_tiles_are_refused_by_name(cli, tmp_path):
    tiles = make_tiles(tmp_path / "tiles")
    for k in range(10, 17):
        write_raster(tiles / f"mask_{k}.tif", half_mask()[None], transform=grid(k))
    refused(cli, tmp_path, tiles, f"7 masks in {tiles} without a tile: mask_10.tif, mask_11.tif, mask_12.tif, "
                                  "mask_13.tif, mask_14.tif … (7 in all); each mask_NAME belongs to a tile_NAME beside "
                                  "it (add the tiles or move those masks out of the folder)")


def test_tiles_without_masks_are_refused_by_name(cli, tmp_path):
    tiles = make_tiles(tmp_path / "tiles")
    (tiles / "mask_1.tif").unlink()
    (tiles / "mask_3.tif").unlink()
    refused(cli, tmp_path, tiles, f"2 tiles in {tiles} without a mask: tile_1.tif, tile_3.tif; each tile_NAME needs "
                                  "its mask_NAME beside it (add the masks or move those tiles out of the folder)")


def test_two_masks_differing_only_in_case_are_refused(tmp_path):
    tiles = make_tiles(tmp_path / "tiles")
    (tiles / "mask_2.TIF").write_bytes((tiles / "mask_2.tif").read_bytes())
    with pytest.raises(ValueError, match=r"^tiles in .* with two masks that differ only in case: mask_2.TIF and "
                                         r"mask_2.tif; keep one$"):
        training_data.load_tile_folder(tiles)
