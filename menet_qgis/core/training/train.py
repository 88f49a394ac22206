"""Train ME-Net on labelled Sentinel-2 windows and keep the best checkpoint.

What real labels look like is handled here: soft mask values (mangrove means
>= 0.5), NaN pixels (ignored by the loss and the scores), windows present more
than once (kept once), class imbalance (positive-class weight + Dice loss).
Validation windows are chosen by *location*: windows that overlap or touch go
to the same side, so no place is seen in both training and validation.
"""
from __future__ import annotations

import glob
import io
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import rasterio
import rasterio.errors
import torch
import torch.nn.functional as F

from ..model import channels as ch
from ..compat import apply
from ..io.bands import InputPlan
from ..model.checkpoint import ModelBundle, new_bundle, save, saved_bytes
from ..inference.runtimes import prepare_batch
from ..reporting import Cancelled, Reporter
from ..model.flips import dihedral
from ..evaluation.metrics import Confusion, ProbabilityCounts
from ..model.checkpoint import load_imagenet_state
from ..files import atomic_write_bytes
from ..io.raster_io import RasterInput, require_free_space


@dataclass
class TileSet:
    """Labelled windows in memory: reflectance (N, B, H, W), labels and validity (N, H, W).

    ``valid`` marks pixels that are scored; ``loss_valid`` those the loss sees (validity minus
    label pixels a source's quality rules set aside, e.g. the edges of coarse labels).  Each
    window carries its source, its location group (``source:…``: the unit of every split), a
    sample weight and its label style (0 = the style a trained model outputs; see ``SourceSpec``).
    ``bounds`` is ``None`` for un-georeferenced windows."""

    images: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    bounds: List[Optional[Tuple[float, float, float, float]]]
    names: List[str]
    crs: Optional[str] = None
    duplicates_dropped: int = 0
    sources: List[str] = field(default_factory=list)
    groups: List[str] = field(default_factory=list)
    weights: Optional[np.ndarray] = None
    loss_valid: Optional[np.ndarray] = None
    flags: List[Dict] = field(default_factory=list)
    styles: Optional[np.ndarray] = None

    def __post_init__(self):
        n = len(self.images)
        self.sources = self.sources or ["tiles"] * n
        self.groups = self.groups or [f"{self.sources[i]}:{self.names[i]}" for i in range(n)]
        self.weights = np.ones(n, np.float32) if self.weights is None else np.asarray(self.weights, np.float32)
        self.loss_valid = self.valid.copy() if self.loss_valid is None else self.loss_valid
        self.styles = np.zeros(n, np.int64) if self.styles is None else np.asarray(self.styles, np.int64)

    def __len__(self):
        return len(self.images)

    def source_styles(self) -> Dict[str, int]:
        """Each source's label style (a source has one)."""
        return {src: int(style) for src, style in zip(self.sources, self.styles)}

    def subset(self, idx: Sequence[int]) -> "TileSet":
        idx = list(idx)
        return TileSet(self.images[idx], self.labels[idx], self.valid[idx], [self.bounds[i] for i in idx],
                       [self.names[i] for i in idx], self.crs, 0, [self.sources[i] for i in idx],
                       [self.groups[i] for i in idx], self.weights[idx], self.loss_valid[idx],
                       styles=self.styles[idx])

    @classmethod
    def concat(cls, sets: Sequence["TileSet"]) -> "TileSet":
        """Several sources in one set (windows must share band count and size)."""
        shapes = {t.images.shape[1:] for t in sets}
        if len(shapes) != 1:
            raise ValueError(f"the tile folders differ in bands or window size: {sorted(shapes)}")
        crss = {t.crs for t in sets if t.crs}
        return cls(np.concatenate([t.images for t in sets]), np.concatenate([t.labels for t in sets]),
                   np.concatenate([t.valid for t in sets]), [b for t in sets for b in t.bounds],
                   [n for t in sets for n in t.names], crss.pop() if len(crss) == 1 else None,
                   sum(t.duplicates_dropped for t in sets), [x for t in sets for x in t.sources],
                   [g for t in sets for g in t.groups], np.concatenate([t.weights for t in sets]),
                   np.concatenate([t.loss_valid for t in sets]), [f for t in sets for f in t.flags],
                   np.concatenate([t.styles for t in sets]))


def _read_reflectance(path: str, recipe: ch.Recipe = ch.DEFAULT_RECIPE,
                      georeferenced: bool = True) -> Tuple[np.ndarray, np.ndarray, Optional[Tuple], Optional[str]]:
    """The recipe's source bands as reflectance + validity, using the same band mapping as inference;
    bounds and CRS are ``None`` for an un-georeferenced tile when ``georeferenced`` is False."""
    src = RasterInput(path, recipe=recipe, georeferenced=georeferenced)
    if src.plan.kind != "sentinel2":
        raise ValueError(f"{Path(path).name}: training needs Sentinel-2 bands, not a ready-made 11-band stack")
    data, valid = src.read(0, 0, max(src.width, src.height))
    data = (data[:, :src.height, :src.width] + src.plan.offset) * src.plan.scale
    valid = valid[:src.height, :src.width]
    data[:, ~valid] = np.nan
    with rasterio.open(path) as ds:
        located = ds.crs is not None and not ds.transform.is_identity
        bounds, crs = (tuple(ds.bounds), ds.crs.to_string()) if located else (None, None)
    src.close()
    return data.astype(np.float32), valid, bounds, crs


def check_label_coding(mask: np.ndarray, name: str) -> None:
    """Labels must be mangrove = 1, other = 0 (soft values in between allowed), no-data as
    NaN or the raster's declared no-data.  Anything else (1/2, 0/255, 0..100) is refused with
    the values found, since guessing which value means mangrove silently trains nonsense."""
    values = mask[np.isfinite(mask)]
    if values.size == 0 or (values.min() >= 0 and values.max() <= 1):
        return
    distinct, counts = np.unique(values, return_counts=True)
    shown = ", ".join(f"{v:g}" for v in distinct[:8]) + (f" … ({len(distinct)} distinct)" if len(distinct) > 8 else "")
    if len(distinct) == 2 and distinct[0] >= 1:
        cause = f"no 0 in it: which of {distinct[0]:g} and {distinct[1]:g} is mangrove?"
    elif set(distinct.tolist()) <= {0.0, 255.0}:
        cause = "if 255 is mangrove recode it to 1; if 255 is no data, set it as the mask's no-data value"
    elif distinct.min() >= 0 and distinct.max() <= 100:
        cause = "it looks like percent cover: divide by 100"
    else:
        cause = "recode it"
    raise ValueError(f"mask {name} holds values {shown}; masks must be 1 = mangrove, 0 = other "
                     f"(soft values 0-1 allowed, mangrove >= 0.5), no-data as NaN or the declared no-data value: {cause}")


LABEL_HINT = "check the mask coding (1 = mangrove, 0 = other) or add labels of both classes"
SPLIT_HINT = ("the location split left one class out of validation: raise the validation fraction, "
              "try another seed, or add labelled windows of both classes in more places")


def check_both_classes(labels: np.ndarray, valid: np.ndarray, what: str, hint: str = LABEL_HINT) -> None:
    """Refuse labels with no mangrove or no other pixels: nothing to learn or to validate against."""
    lab = labels[valid]
    positives = int(np.count_nonzero(lab >= 0.5))
    if lab.size == 0:
        raise ValueError(f"{what} have no valid labelled pixels")
    if positives == 0 or positives == lab.size:
        cls = "mangrove" if positives == 0 else "non-mangrove"
        raise ValueError(f"{what} hold no {cls} pixels ({lab.size} valid labelled pixels, all "
                         f"{'other' if positives == 0 else 'mangrove'}): the scores would be degenerate "
                         f"and no model is saved; {hint}")


@dataclass
class SourceSpec:
    """One tile folder and how to treat it: ``weight`` scales its windows in the loss,
    ``edge_ignore`` px on both sides of every label edge are left out of the loss (coarse or
    misregistered labels), ``align`` moves each window's labels by up to this many px onto its
    image (``label_offsets``, ``move_labels``), ``group`` is a regex whose first group names a
    window's location (un-georeferenced tiles; georeferenced ones are grouped by their footprints).
    ``style`` > 0 marks labels drawn in another style than the ones the model should reproduce
    (e.g. a coarse global map next to hand-drawn polygons): such windows train an output of their
    own, which is dropped before the model is saved; style 0 is what the saved model outputs."""

    folder: str
    name: Optional[str] = None
    weight: float = 1.0
    edge_ignore: int = 0
    align: int = 0
    group: Optional[str] = None
    style: int = 0

    @classmethod
    def parse(cls, text: str) -> "SourceSpec":
        """``FOLDER[:key=value,...]`` with keys name, weight, edge_ignore, align, group, style.  Only a ':' followed
        by a known key starts the options, so ``C:/tiles`` and folders with ':' in their names work."""
        import re
        match = re.match(r"^(.*?):((?:name|weight|edge_ignore|align|group|style)=.*)$", str(text), re.S)
        folder, rest = match.groups() if match else (str(text), "")
        spec = cls(folder)
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or key not in ("name", "weight", "edge_ignore", "align", "group", "style"):
                raise ValueError(f"tile folder option '{item}' in '{text}': use name=, weight=, edge_ignore=, "
                                 "align=, group= or style=")
            setattr(spec, key, {"weight": float, "edge_ignore": int, "align": int, "style": int}.get(key, str)(value))
        if spec.weight <= 0 or spec.edge_ignore < 0 or not 0 <= spec.align <= 8 or not 0 <= spec.style <= 7:
            raise ValueError(f"'{text}': weight must be > 0, edge_ignore >= 0, align 0 to 8 and style 0 to 7")
        return spec

    @property
    def source(self) -> str:
        return self.name or Path(self.folder).name


def label_edge_band(labels: np.ndarray, width: int, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """Pixels within ``width`` px of a mangrove/other boundary in (N, H, W) binary labels.  With
    ``valid``, only boundaries between valid pixels count (not the edge of the no-data)."""
    from scipy import ndimage
    if width <= 0:
        return np.zeros(labels.shape, bool)
    structure = np.zeros((1, 2 * width + 1, 2 * width + 1), bool)
    structure[0] = True
    lab = labels >= 0.5
    inside = np.ones(labels.shape, bool) if valid is None else valid.astype(bool)
    band = ndimage.binary_dilation(lab & inside, structure) & ndimage.binary_dilation(~lab & inside, structure)
    return band if valid is None else band & inside


def ndvi_mndwi(images: np.ndarray, recipe: ch.Recipe) -> Tuple[np.ndarray, np.ndarray]:
    """NDVI and MNDWI of reflectance in ``recipe``'s band order, channels on axis -3 (one window or
    a stack); NaN where a ratio is undefined.  The label rules below read the image through these."""
    idx = {b: i for i, b in enumerate(recipe.source_bands)}
    b3, b4, b8, b11 = (images[..., idx[b], :, :] for b in ("B3", "B4", "B8", "B11"))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (b8 - b4) / (b8 + b4), (b3 - b11) / (b3 + b11)


def label_offsets(images: np.ndarray, labels: np.ndarray, valid: np.ndarray, recipe: ch.Recipe,
                  max_shift: int) -> np.ndarray:
    """Where each window's label sits relative to its image, as whole pixels (dy, dx) per window
    (+ = south/east), for labels from another product (Global Mangrove Watch's sit about 1 px east
    and 0.6 px south of MagSet-2's imagery, per tile up to 3 px).  The offset is the one of
    |dy|, |dx| <= ``max_shift`` at which the label correlates best with a vegetation-not-water index
    of the image (NDVI - max(MNDWI, 0) / 2), over the window's valid pixels away from its border
    (so every shift compares the same pixels)."""
    ndvi, mndwi = ndvi_mndwi(np.nan_to_num(images.astype(np.float64)), recipe)
    index = np.nan_to_num(ndvi - 0.5 * np.clip(mndwi, 0, None))
    offsets = np.zeros((len(images), 2), int)
    if max_shift < 1:
        return offsets
    core = (slice(max_shift, -max_shift),) * 2
    for i in range(len(images)):
        best = -np.inf
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                seen = _shifted(index[i], dy, dx, 0.0)[core]  # the image at p - offset, under the label at p
                inside = (valid[i] & _shifted(valid[i], dy, dx, False))[core]
                a, b = labels[i][core][inside], seen[inside]
                if a.size < 100 or a.std() == 0 or b.std() == 0:
                    continue
                r = float(np.corrcoef(a, b)[0, 1]) - 1e-6 * (abs(dy) + abs(dx))  # ties: the smaller move
                if r > best:
                    best, offsets[i] = r, (dy, dx)
    return offsets


def _shifted(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``a`` moved by (dy, dx) px (out[p] = a[p - (dy, dx)]), ``fill`` where nothing moved in (no wrapping)."""
    out = np.full_like(a, fill)
    h, w = a.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = a[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def move_labels(labels: np.ndarray, valid: np.ndarray, offsets: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Labels moved by -offset (onto their image); pixels the move leaves without a label become invalid."""
    labels, valid = labels.copy(), valid.copy()
    for i, (dy, dx) in enumerate(offsets):
        labels[i] = _shifted(labels[i], -dy, -dx, 0.0)
        valid[i] &= _shifted(valid[i], -dy, -dx, False)
    return labels, valid


#: Width (px) of the band a boundary-aware loss weights up: 83 % of the Jambelí model's errors
#: lay within 2 px of a mangrove boundary (issue 10).
BOUNDARY_PX = 2


#: Label-noise rules (``flag_label_noise``): copies of one footprint whose masks disagree on more
#: than this share of pixels are in conflict ...
DUPLICATE_DISAGREEMENT = 0.02
#: ... and the image decides between them (``copy_agreement``: F1 of each copy's mask against the image's
#: vegetation, NDVI > 0.3 and MNDWI < 0): the copy that agrees best is kept when it leads every other by
#: this much, else every copy is dropped.  On Jambelí's 6 conflicts the leads are 0.36-0.88.
COPY_AGREEMENT_LEAD = 0.2
#: ... and a window whose mangrove label covers water or bare ground (MNDWI > 0 and NDVI < 0.1: channels
#: and ponds inside coarse polygons) on more than this share of its mangrove pixels loses those pixels
#: from the loss and half its weight (on MagSet-2 this flags 9 of 350 windows, on Jambelí none).
WATER_AS_MANGROVE = 0.10


def flag_label_noise(images: np.ndarray, labels: np.ndarray, valid: np.ndarray, recipe: ch.Recipe) -> List[Dict]:
    """Windows whose label contradicts the image: mangrove labelled on open water (channels and
    ponds inside coarse polygons).  Returns one record per flagged window (index, share, decision)."""
    ndvi, mndwi = ndvi_mndwi(images, recipe)
    water = (mndwi > 0.0) & (ndvi < 0.1)
    flags = []
    for i in range(len(images)):
        mangrove = (labels[i] >= 0.5) & valid[i]
        if mangrove.sum() < 100:
            continue
        share = float((water[i] & mangrove).sum() / mangrove.sum())
        if share > WATER_AS_MANGROVE:
            flags.append({"index": i, "rule": "mangrove label on water or bare ground", "share": round(share, 3),
                          "decision": "water pixels labelled mangrove left out of the loss; window weight halved",
                          "water": water[i] & mangrove})
    return flags


def copy_agreement(image: np.ndarray, valid: np.ndarray, label: np.ndarray, recipe: ch.Recipe) -> float:
    """How far a mask agrees with its image: F1 of the label against the image's vegetation (NDVI > 0.3
    and MNDWI < 0).  Vegetation is not mangrove, so this only ranks copies of one footprint: a copy
    whose mangrove lies on water or bare ground, or misses the vegetated shore, scores far lower."""
    ndvi, mndwi = ndvi_mndwi(image, recipe)
    vegetation = (ndvi > 0.3) & (mndwi < 0.0)
    return Confusion().add(vegetation[valid], label[valid] >= 0.5).scores()["f1"]


def load_tile_folder(folder, image_glob: str = "tile_*.tif", mask_prefix: Tuple[str, str] = ("tile_", "mask_"),
                     recipe: ch.Recipe = ch.DEFAULT_RECIPE, spec: Optional[SourceSpec] = None,
                     log=lambda message: None) -> TileSet:
    """Image/mask pairs such as ``tile_0001.tif`` + ``mask_0001.tif``; copies of one footprint kept
    once (when their labels disagree, the one that agrees with the image, or none); label-noise rules
    applied and logged."""
    import re
    spec = spec or SourceSpec(str(folder))
    paths = sorted(glob.glob(str(Path(folder) / image_glob)))
    if not paths:
        raise ValueError(f"no training tiles matching {image_glob} in {folder}")
    images, labels, valid, bounds, names = [], [], [], [], []
    seen: Dict[Tuple, int] = {}
    copies: Dict[int, List[Tuple]] = {}     # first index -> later copies (image, valid, label, name)
    dropped, crss, conflicts = 0, set(), set()
    with warnings.catch_warnings():  # un-georeferenced tiles are expected here (maps refuse them elsewhere)
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        for path in paths:
            mask_path = str(Path(path).parent / Path(path).name.replace(*mask_prefix, 1))
            if not Path(mask_path).is_file():
                raise ValueError(f"no mask {Path(mask_path).name} for {Path(path).name}")
            img, ok, b, crs = _read_reflectance(path, recipe, georeferenced=False)
            crss.add(crs)
            with rasterio.open(mask_path) as ds:
                mask = ds.read(1, out_dtype="float32", masked=True).filled(np.nan)  # declared no-data -> NaN
            check_label_coding(mask, Path(mask_path).name)
            if mask.shape != ok.shape:
                raise ValueError(f"{Path(mask_path).name} is {mask.shape}, its image {ok.shape}")
            ok &= np.isfinite(mask)
            lab = (np.nan_to_num(mask, nan=0.0) >= 0.5).astype(np.float32)
            key = tuple(round(v, 3) for v in b) if b is not None else None
            if key is not None and key in seen:
                dropped += 1
                first = seen[key]
                copies.setdefault(first, []).append((img, ok, lab, Path(path).name))
                both = ok & valid[first]
                if both.any() and float((lab[both] != labels[first][both]).mean()) > DUPLICATE_DISAGREEMENT:
                    conflicts.add(first)
                continue
            if key is not None:
                seen[key] = len(images)
            images.append(img)
            labels.append(lab)
            valid.append(ok)
            bounds.append(b)
            names.append(Path(path).name)
    if len(crss) != 1:
        shown = ", ".join(sorted(c or "none" for c in crss))
        raise ValueError(f"training tiles in {folder} are in several CRSs ({shown}); the location split "
                         "compares coordinates, so reproject them to one (or put un-georeferenced tiles in a folder of their own)")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"training tiles differ in size: {sorted(shapes)}")
    if images[0].shape[1] != images[0].shape[2]:
        raise ValueError(f"training tiles must be square (90° rotations augment them), got {images[0].shape[1:]}")
    flags, unresolved = [], set()
    for i in sorted(conflicts):
        candidates = [(images[i], valid[i], labels[i], names[i])] + copies[i]
        scores = [copy_agreement(img, ok, lab, recipe) for img, ok, lab, _ in candidates]
        order = np.argsort(scores)[::-1]
        told = ", ".join(f"{candidates[k][3]} {scores[k]:.2f}" for k in order)
        rule = "copies of one footprint with different labels"
        if scores[order[0]] - scores[order[1]] >= COPY_AGREEMENT_LEAD:
            images[i], valid[i], labels[i], names[i] = candidates[order[0]]
            flags.append({"window": names[i], "source": spec.source, "rule": rule,
                          "decision": f"kept {names[i]}, whose label agrees best with the image's vegetation "
                                      f"(F1 {told}); the other copies dropped"})
        else:
            unresolved.add(i)
            flags.append({"window": names[i], "source": spec.source, "rule": rule,
                          "decision": f"dropped, every copy: none agrees clearly better with the image (F1 {told})"})
    keep = [i for i in range(len(images)) if i not in unresolved]
    images, labels, valid = np.stack(images)[keep], np.stack(labels)[keep], np.stack(valid)[keep]
    bounds, names = [bounds[i] for i in keep], [names[i] for i in keep]
    if spec.align:
        offsets = label_offsets(images, labels, valid, recipe, spec.align)
        labels, valid = move_labels(labels, valid, offsets)
        moved = int(np.any(offsets != 0, axis=1).sum())
        log(f"{spec.source}: labels moved onto their images in {moved} of {len(offsets)} windows; labels sat "
            f"{offsets[:, 0].mean():+.2f} px south and {offsets[:, 1].mean():+.2f} px east on average "
            f"(at most {spec.align} px searched)")
    check_both_classes(labels, valid, f"the training masks in {folder}")
    loss_valid = valid & ~label_edge_band(labels, spec.edge_ignore)
    weights = np.full(len(images), spec.weight, np.float32)
    for flag in flag_label_noise(images, labels, valid, recipe):
        i = flag.pop("index")
        loss_valid[i] &= ~flag.pop("water")
        weights[i] *= 0.5
        flags.append({"window": names[i], "source": spec.source, **flag})
    crs = crss.pop()
    if crs is not None:
        b = bounds[0]
        block = BLOCK_PX * (b[2] - b[0]) / images.shape[-1]  # pixels -> map units of these tiles
        groups = [f"{spec.source}:block{g}" for g in location_groups(bounds, block)]
    elif spec.group:
        pattern = re.compile(spec.group)
        groups = []
        for n in names:
            m = pattern.search(n)
            if not m:
                raise ValueError(f"{n} does not match the group pattern {spec.group!r} of {folder}")
            groups.append(f"{spec.source}:{m.group(1) if m.groups() else m.group(0)}")
    else:
        groups = [f"{spec.source}:{n}" for n in names]
        log(f"{spec.source}: tiles have no georeferencing and no group pattern: each is its own location, "
            "so neighbouring tiles may land on both sides of the validation split")
    for flag in flags:
        log(f"label noise, {flag['source']} {flag['window']}: {flag['rule']}"
            + (f" ({flag['share']:.0%} of its mangrove pixels)" if "share" in flag else "") + f" -> {flag['decision']}")
    return TileSet(images, labels, valid, bounds, names, crs, dropped, [spec.source] * len(images), groups,
                   weights, loss_valid, flags, np.full(len(images), spec.style, np.int64))


def load_raster_labels(images: Sequence[str], mask: Optional[str] = None, polygons_by_image=None,
                       tile: int = 128, recipe: ch.Recipe = ch.DEFAULT_RECIPE) -> TileSet:
    """Training windows cut from whole rasters: labels from a mask raster (mangrove >= 0.5,
    resampled nearest onto each image's grid) or from polygons (GeoJSON-like dicts in each
    image's CRS, ``polygons_by_image[i]``).  Windows without valid labelled pixels are dropped."""
    from ..io.polygons import burn_polygons, read_on_grid
    if (mask is None) == (polygons_by_image is None):
        raise ValueError("give the labels either as a mask raster or as polygons")
    images_out, labels, valid, bounds, names = [], [], [], [], []
    crs = None
    for k, path in enumerate(images):
        data, ok, _b, crs = _read_reflectance(path, recipe)
        with rasterio.open(path) as ds:
            if mask is not None:
                ref = read_on_grid(mask, ds)
                check_label_coding(ref, Path(mask).name)
                ok &= np.isfinite(ref)
                lab = np.nan_to_num(ref) >= 0.5
            else:
                lab = burn_polygons(polygons_by_image[k], ds)
            transform = ds.transform
        h, w = ok.shape
        for y0 in range(0, h - tile + 1, tile):
            for x0 in range(0, w - tile + 1, tile):
                v = ok[y0:y0 + tile, x0:x0 + tile]
                if v.mean() < 0.5:
                    continue
                images_out.append(data[:, y0:y0 + tile, x0:x0 + tile])
                labels.append(lab[y0:y0 + tile, x0:x0 + tile].astype(np.float32))
                valid.append(v)
                x_min, y_max = apply(transform, x0, y0)
                x_max, y_min = apply(transform, x0 + tile, y0 + tile)
                bounds.append((x_min, y_min, x_max, y_max))
                names.append(f"{Path(path).stem}@{y0},{x0}")
    if not images_out:
        raise ValueError(f"no {tile} x {tile} px window with valid pixels and labels in the given rasters")
    check_both_classes(np.stack(labels), np.stack(valid), "the training labels")
    return TileSet(np.stack(images_out), np.stack(labels), np.stack(valid), bounds, names, crs)


#: Side of the spatial blocks of the validation split, in pixels (3 windows of 128 px).
BLOCK_PX = 384


def location_groups(bounds: Sequence[Tuple[float, float, float, float]], block: float) -> List[int]:
    """Group windows that share a place: footprints that overlap (share area), or
    centres in the same ``block`` x ``block`` square of map units (spatial blocking,
    so neighbouring windows do not land on both sides of the split)."""
    n = len(bounds)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    b = np.asarray(bounds, dtype=np.float64).reshape(-1, 4)
    for i in range(n):
        overlap = (b[:, 0] < b[i, 2]) & (b[:, 2] > b[i, 0]) & (b[:, 1] < b[i, 3]) & (b[:, 3] > b[i, 1])
        for j in np.nonzero(overlap)[0]:
            parent[find(int(j))] = find(i)
    if block > 0:
        cells: Dict[Tuple[int, int], int] = {}
        for i in range(n):
            cell = (int((b[i, 0] + b[i, 2]) / 2 // block), int((b[i, 1] + b[i, 3]) / 2 // block))
            if cell in cells:
                parent[find(i)] = find(cells[cell])
            else:
                cells[cell] = i
    return [find(i) for i in range(n)]


def spatial_split(bounds, val_fraction: float = 0.2, seed: int = 0, block: float = 3840.0) -> Tuple[List[int], List[int]]:
    """Whole location groups go to validation until ``val_fraction`` of windows is
    reached; a group that would overshoot by more than 20 % is passed over."""
    groups = location_groups(bounds, block)
    members: Dict[int, List[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keys = sorted(members)
    random.Random(seed).shuffle(keys)
    target = max(1, int(round(val_fraction * len(bounds))))
    val: List[int] = []
    for k in keys:
        if len(val) >= target:
            break
        if len(val) + len(members[k]) <= target * 1.2:
            val.extend(members[k])
    if not val:  # every group is larger than the target: take the smallest
        val = list(min(members.values(), key=len))
    val_set = set(val)
    return [i for i in range(len(bounds)) if i not in val_set], sorted(val)


def split_windows(tiles: TileSet, val_fraction: float = 0.2, seed: int = 0, val_groups: Sequence[str] = (),
                  holdout_groups: Sequence[str] = (), val_names: Sequence[str] = ()) -> Tuple[List[int], List[int], List[int]]:
    """(train, validation, held-out) window indexes, whole location groups at a time.

    ``holdout_groups`` (group names such as ``magset2:3``, or whole sources) are never trained on
    nor used to choose anything: they are the honest "new coast" test.  Validation is, per source:
    the windows named in ``val_names`` (e.g. an earlier model's validation windows, to compare on
    the same pixels), else the groups in ``val_groups``, else a draw of whole groups (georeferenced
    tiles: footprints and 3.84 km blocks, as ``spatial_split``) until ``val_fraction`` is reached."""
    def named(i, names):
        return tiles.groups[i] in names or tiles.sources[i] in names
    test = [i for i in range(len(tiles)) if named(i, holdout_groups)]
    rest = [i for i in range(len(tiles)) if not named(i, holdout_groups)]
    val: List[int] = []
    names, wanted = set(val_names), set(val_groups)
    for source in dict.fromkeys(tiles.sources[i] for i in rest):
        members = [i for i in rest if tiles.sources[i] == source]
        chosen = [i for i in members if tiles.names[i] in names] or [i for i in members if named(i, wanted)]
        if not chosen and val_fraction > 0:
            if all(tiles.bounds[i] is not None for i in members):
                b = tiles.bounds[members[0]]
                block = BLOCK_PX * (b[2] - b[0]) / tiles.images.shape[-1]
                _, picked = spatial_split([tiles.bounds[i] for i in members], val_fraction, seed, block)
            else:
                by_group: Dict[str, List[int]] = {}
                for k, i in enumerate(members):
                    by_group.setdefault(tiles.groups[i], []).append(k)
                keys = sorted(by_group)
                random.Random(seed).shuffle(keys)
                picked, target = [], max(1, round(val_fraction * len(members)))
                for key in keys:
                    if len(picked) >= target:
                        break
                    picked.extend(by_group[key])
            chosen = [members[k] for k in picked]
        val.extend(chosen)
    val_set = set(val)
    return [i for i in rest if i not in val_set], sorted(val), test


def fit_statistics(tiles: TileSet, max_pixels: int = 500_000, seed: int = 0, recipe: ch.Recipe = ch.DEFAULT_RECIPE):
    """PCA basis and per-channel mean/std from valid training pixels (fitted once, stored)."""
    pixels = tiles.images.transpose(0, 2, 3, 1)[tiles.valid]
    rng = np.random.default_rng(seed)
    if len(pixels) > max_pixels:
        pixels = pixels[rng.choice(len(pixels), max_pixels, replace=False)]
    pca = ch.PCABasis.fit(pixels)
    n = pixels.shape[1]
    chans = ch.compute_channels(torch.from_numpy(pixels.T.copy()).view(1, n, -1, 1), pca, recipe)[0, :, :, 0].numpy()
    mean, std = chans.mean(axis=1), chans.std(axis=1)
    return pca, mean.tolist(), np.maximum(std, 1e-6).tolist()


@dataclass
class TrainOptions:
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    head_width: int = 64
    imagenet_weights: Optional[str] = None
    threads: int = 0
    save_best_to: Optional[str] = None   # write the best checkpoint as soon as it improves
    recipe: ch.Recipe = ch.DEFAULT_RECIPE
    init_from: Optional[str] = None      # start from this checkpoint's weights (fine-tuning)
    resume_state: Optional[str] = None   # written after every epoch; continued from when it exists
    val_groups: Sequence[str] = ()
    holdout_groups: Sequence[str] = ()
    val_names: Sequence[str] = ()
    boundary_weight: float = 0.0         # > 0: boundary-aware loss (see masked_loss)
    refine_width: Optional[int] = None   # image-guided refinement width; None = as init_from, else 0 (none)


@dataclass
class TrainResult:
    bundle: ModelBundle
    history: List[Dict] = field(default_factory=list)
    best: Dict = field(default_factory=dict)
    train_windows: int = 0
    val_windows: int = 0
    holdout: Optional[TileSet] = None
    validation: Optional[TileSet] = None


def masked_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, pos_weight: float,
                weights: Optional[torch.Tensor] = None, boundary_weight: float = 0.0,
                styles: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BCE (positives weighted) + soft Dice, both over valid pixels only; ``weights`` (N,) scale
    each window's pixels (per-source weights, down-weighted noisy windows); ``boundary_weight`` > 0
    makes pixels within BOUNDARY_PX of a label boundary count 1 + that much (boundary-aware loss);
    ``styles`` (N,) picks each window's output channel (its label style), else channel 0."""
    rows = torch.arange(len(logits), device=logits.device)
    picked = logits[:, 0] if styles is None else logits[rows, styles.to(logits.device)]
    logits, v = picked.float(), valid.float()
    if weights is not None:
        v = v * weights.view(-1, 1, 1).to(v)
    if boundary_weight > 0:
        band = label_edge_band(target.detach().cpu().numpy(), BOUNDARY_PX, valid.detach().cpu().numpy())
        v = v * (1.0 + boundary_weight * torch.from_numpy(band).to(v))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none",
                                             pos_weight=torch.tensor(pos_weight, device=logits.device))
    bce = (bce * v).sum() / v.sum().clamp(min=1)
    prob = torch.sigmoid(logits) * v
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + (target * v).sum() + 1)
    return bce + dice


#: Training windows are held as reflectance already: channels are built with no further scaling.
def _reflectance_plan(bands: int) -> InputPlan:
    return InputPlan("sentinel2", list(range(1, bands + 1)))


def predict_windows(bundle: ModelBundle, tiles: TileSet, device, batch_size: int = 16) -> np.ndarray:
    """(N, H, W) mangrove probability of every window (no-data pixels included, to be masked)."""
    model = bundle.model.eval()
    plan = _reflectance_plan(tiles.images.shape[1])
    out = np.empty(tiles.labels.shape, np.float32)
    with torch.inference_mode():
        for i in range(0, len(tiles), batch_size):
            raw = torch.from_numpy(np.nan_to_num(tiles.images[i:i + batch_size])).to(device)
            valid = torch.from_numpy(tiles.valid[i:i + batch_size]).to(device)
            out[i:i + batch_size] = torch.sigmoid(model(prepare_batch(raw, valid, bundle, plan)).float())[:, 0].cpu().numpy()
    return out


def evaluate(bundle: ModelBundle, tiles: TileSet, device, batch_size: int = 16,
             threshold: Optional[float] = None) -> Confusion:
    """Confusion on the valid pixels of ``tiles`` at ``threshold`` (default: the model's own)."""
    threshold = bundle.threshold if threshold is None else threshold
    prob = predict_windows(bundle, tiles, device, batch_size)
    return Confusion().add(prob[tiles.valid] >= threshold, tiles.labels[tiles.valid] >= 0.5)


def probability_counts(bundle: ModelBundle, tiles: TileSet, device, batch_size: int = 16) -> Dict[str, ProbabilityCounts]:
    """Probability histograms per location group and per source, plus ``"all"``."""
    prob = predict_windows(bundle, tiles, device, batch_size)
    counts: Dict[str, ProbabilityCounts] = {}
    for i in range(len(tiles)):
        ok = tiles.valid[i]
        for key in ("all", tiles.sources[i], tiles.groups[i]):
            counts.setdefault(key, ProbabilityCounts()).add(prob[i][ok], tiles.labels[i][ok] >= 0.5)
    return counts


def _set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_weights_from(model: torch.nn.Module, start: torch.nn.Module, name: str) -> None:
    """Copy a checkpoint's weights for fine-tuning.  The one part allowed to be missing is the
    image-guided refinement (its zero-started output leaves the model's maps as they were); with
    several label styles every style's output starts as the checkpoint's one output."""
    ours, theirs = model.state_dict(), dict(start.state_dict())
    styles = model.head.label_styles
    if styles > 1:
        for key in [k for k in theirs if k.startswith(("head.classifier.", "head.boundary."))]:
            theirs[key] = theirs[key].repeat(styles, *[1] * (theirs[key].ndim - 1))
    missing = [k for k in ours if k not in theirs]
    if set(theirs) - set(ours) or any(not k.startswith("head.refinement.") for k in missing) or \
            any(theirs[k].shape != ours[k].shape for k in theirs):
        raise ValueError(f"{name} does not fit this model (head width or refinement width differ); "
                         "start from a model of the same architecture")
    model.load_state_dict(theirs, strict=False)


def train(tiles: TileSet, options: TrainOptions = TrainOptions(), reporter: Reporter = Reporter(),
          val_tiles: Optional[TileSet] = None) -> TrainResult:
    """Train from scratch, ImageNet or another checkpoint; returns the best-on-validation bundle,
    with the decision threshold chosen on validation stored in it."""
    from ..model.checkpoint import load as load_checkpoint
    from ..inference.device import choose_device
    _set_seeds(options.seed)
    if options.threads:
        torch.set_num_threads(options.threads)
    device, device_text = choose_device(options.device)
    if options.batch_size < 2:
        raise ValueError(f"batch size must be at least 2 (batch normalisation), got {options.batch_size}")
    if tiles.images.shape[1] != len(options.recipe.source_bands):
        raise ValueError(f"the windows hold {tiles.images.shape[1]} bands, recipe {options.recipe.label} reads "
                         f"{len(options.recipe.source_bands)} ({', '.join(options.recipe.source_bands)})")
    holdout = None
    if val_tiles is None:
        train_idx, val_idx, test_idx = split_windows(tiles, options.val_fraction, options.seed, options.val_groups,
                                                     options.holdout_groups, options.val_names)
        train_set, val_set = tiles.subset(train_idx), tiles.subset(val_idx)
        holdout = tiles.subset(test_idx) if test_idx else None
    else:
        train_set, val_set = tiles, val_tiles
    if len(train_set) < 2 or len(val_set) == 0:
        raise ValueError(f"need at least two training windows and one validation window "
                         f"(have {len(train_set)} and {len(val_set)})")
    check_both_classes(train_set.labels, train_set.valid, "the training windows", SPLIT_HINT)
    check_both_classes(val_set.labels, val_set.valid, "the validation windows", SPLIT_HINT)
    label_styles = int(train_set.styles.max()) + 1
    if set(train_set.styles.tolist()) != set(range(label_styles)):
        raise ValueError(f"label styles of the training windows are {sorted(set(train_set.styles.tolist()))}: "
                         "number them 0, 1, … without gaps; style 0 (what the saved model outputs) must have training windows")
    reporter.info(f"device: {device_text}")
    reporter.info(f"channel recipe: {options.recipe.label} ({', '.join(options.recipe.source_bands)})")
    reporter.info(f"windows: {len(train_set)} train, {len(val_set)} validation (split by location)"
                  + (f", {len(holdout)} held out ({', '.join(sorted(set(holdout.groups)))})" if holdout else "")
                  + f"; {tiles.duplicates_dropped} duplicated windows dropped")
    for source in dict.fromkeys(tiles.sources):
        n_train = sum(1 for x in train_set.sources if x == source)
        n_val = sum(1 for x in val_set.sources if x == source)
        reporter.info(f"  {source}: {n_train} train, {n_val} validation")
    imagenet = None if options.init_from else load_imagenet_state(options.imagenet_weights, reporter.info)
    start = load_checkpoint(options.init_from) if options.init_from else None
    refine_width = options.refine_width if options.refine_width is not None else \
        (start.model.refine_width if start is not None else 0)
    bundle = new_bundle(options.head_width, imagenet, seed=options.seed, recipe=options.recipe,
                        refine_width=refine_width, label_styles=label_styles)
    keep_statistics = start is not None and start.recipe is options.recipe
    if start is not None:
        init_weights_from(bundle.model, start.model, Path(options.init_from).name)
        reporter.info(f"weights initialised from {Path(options.init_from).name} (recipe {start.recipe.label}); "
                      + ("its channel statistics kept, so its first layer sees the inputs it was trained on"
                         if keep_statistics else "channel statistics refitted on this data (another recipe)"))
    if label_styles > 1:
        reporter.info(f"{label_styles} label styles, one output each: "
                      + ", ".join(f"{src} style {style}" for src, style in train_set.source_styles().items())
                      + "; validation scores and the saved model use style 0's output")
    if refine_width:
        reporter.info(f"image-guided refinement at full resolution, width {refine_width}"
                      + ("; it starts at zero" if start is not None and not start.model.refine_width else ""))
    if options.save_best_to:  # the best-so-far copy and the final model side by side, before hours of training
        require_free_space(Path(options.save_best_to).parent, 2 * saved_bytes(bundle, half=True),
                           "the model (best-so-far copy and final file)")
    if keep_statistics:  # refitted on a few windows of one coast they would shift every input channel
        bundle.pca, bundle.norm_mean, bundle.norm_std = start.pca, list(start.norm_mean), list(start.norm_std)
    else:
        bundle.pca, bundle.norm_mean, bundle.norm_std = fit_statistics(train_set, seed=options.seed,
                                                                       recipe=options.recipe)
    bundle.window_size = 256
    pos = float(train_set.labels[train_set.loss_valid].mean())
    pos_weight = float(min(10.0, (1 - pos) / max(pos, 1e-6)))
    reporter.info(f"mangrove share of valid training pixels {pos:.3f}; positive-class weight {pos_weight:.2f}")
    model = bundle.model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / options.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=options.lr, total_steps=options.epochs * steps_per_epoch,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(options.seed)
    images = torch.from_numpy(np.nan_to_num(train_set.images))
    labels, valid = torch.from_numpy(train_set.labels), torch.from_numpy(train_set.loss_valid)
    weights, styles = torch.from_numpy(train_set.weights), torch.from_numpy(train_set.styles)
    best_state, best, history, first_epoch = None, {"f1": -1.0}, [], 1
    resume = Path(options.resume_state) if options.resume_state else None
    if resume is not None and resume.is_file():
        state = _load_resume_state(resume, options, train_set, val_set)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        best, history, first_epoch = state["best"], state["history"], state["epoch"] + 1
        best_state = state.get("best_model")
        bundle.training = state["training"]
        reporter.info(f"resumed from {resume.name} after epoch {state['epoch']} of {options.epochs}")
    t0 = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    for epoch in range(first_epoch, options.epochs + 1):
        model.train()
        order = torch.randperm(len(train_set), generator=gen)
        total, count, epoch_start = 0.0, 0, time.perf_counter()
        for start in range(0, len(order), options.batch_size):
            idx = order[start:start + options.batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            ks = torch.randint(0, 8, (len(idx),), generator=gen).tolist()
            xb = torch.stack([dihedral(images[i], k) for i, k in zip(idx.tolist(), ks)]).to(device)
            yb = torch.stack([dihedral(labels[i], k) for i, k in zip(idx.tolist(), ks)]).to(device)
            vb = torch.stack([dihedral(valid[i], k) for i, k in zip(idx.tolist(), ks)]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(prepare_batch(xb, vb, bundle, _reflectance_plan(xb.shape[1])))
            loss = masked_loss(logits, yb, vb, pos_weight, weights[idx].to(device), options.boundary_weight,
                               styles[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            if reporter.cancelled():
                raise Cancelled("training cancelled")
        train_seconds = time.perf_counter() - epoch_start
        counts = probability_counts(bundle, val_set, device)
        threshold, f1_at = counts["all"].best_threshold()
        scores = counts["all"].confusion(threshold).scores()
        at_half = counts["all"].confusion(0.5).scores()
        row = {"epoch": epoch, "loss": total / max(count, 1), "val_f1": scores["f1"], "val_iou": scores["iou"],
               "val_kappa": scores["kappa"], "threshold": threshold, "val_f1_at_0.5": at_half["f1"],
               "per_source_f1": {k: counts[k].confusion(threshold).scores()["f1"]
                                 for k in dict.fromkeys(val_set.sources)},
               "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - t0, 1)}
        history.append(row)
        reporter.info(f"epoch {epoch}/{options.epochs}: loss {row['loss']:.4f}, validation F1 {scores['f1']:.4f} "
                      f"at threshold {threshold:.2f} ({at_half['f1']:.4f} at 0.5), IoU {scores['iou']:.4f}, "
                      f"kappa {scores['kappa']:.4f}; "
                      + ", ".join(f"{k} {v:.4f}" for k, v in row["per_source_f1"].items())
                      + f" ({train_seconds:.0f} s training, {row['seconds']:.0f} s in all)")
        if scores["f1"] > best["f1"]:
            best = dict(scores, epoch=epoch, threshold=threshold)
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if options.save_best_to:
                _describe(bundle, options, train_set, val_set, best, imagenet is not None, device_text, t0, holdout)
                save(_one_style(bundle), options.save_best_to, half=True)
        if resume is not None:
            _save_resume_state(resume, epoch, model, opt, sched, gen, best, best_state, history, bundle.training)
        reporter.progress(100.0 * epoch / options.epochs)
    if best_state is None or not all(math.isfinite(best[k]) for k in ("f1", "iou", "kappa")):
        raise ValueError("validation gave no usable score (loss or scores not finite): no model was saved")
    if best["kappa"] <= 0:
        reporter.warn(f"the best model is no better than chance on the validation windows (kappa "
                      f"{best['kappa']:.3f}): more epochs or more labels are needed before using it")
    model.load_state_dict(best_state)
    model.cpu().eval()
    model.head.keep_label_style(0)
    _describe(bundle, options, train_set, val_set, best, imagenet is not None, device_text, t0, holdout)
    bundle.training["history"] = history
    reporter.info(f"decision threshold {best['threshold']:.2f} (chosen on validation, stored in the model)")
    return TrainResult(bundle, history, best, len(train_set), len(val_set), holdout, val_set)


def _one_style(bundle: ModelBundle) -> ModelBundle:
    """The bundle as it will be saved: a copy cut to style 0's output when the head has several."""
    if bundle.model.head.label_styles == 1:
        return bundle
    import copy
    kept = copy.deepcopy(bundle)
    kept.model.head.keep_label_style(0)
    return kept


def _save_resume_state(path: Path, epoch, model, opt, sched, gen, best, best_state, history, training) -> None:
    """Everything to continue after ``epoch``: weights, optimiser, schedule, random state (weights-only pickle)."""
    record = {"format": "menet_qgis.resume", "epoch": epoch, "model": model.state_dict(),
              "optimizer": opt.state_dict(), "scheduler": _plain(sched.state_dict()), "generator": gen.get_state(),
              "torch_rng": torch.get_rng_state(), "best": best, "best_model": best_state, "history": history,
              "training": training}
    buffer = io.BytesIO()
    torch.save(record, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def _plain(value):
    """A scheduler's state with anything but plain data dropped (so it loads weights-only)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _load_resume_state(path: Path, options: TrainOptions, train_set: TileSet, val_set: TileSet) -> Dict:
    from ..model.checkpoint import load_weights_only
    state = load_weights_only(path, "resume state", "training resume state")
    if not isinstance(state, dict) or state.get("format") != "menet_qgis.resume":
        raise ValueError(f"{path.name} is not a training resume state")
    done = state["training"]
    if (done.get("train_windows"), done.get("val_windows")) not in ((len(train_set), len(val_set)), (None, None)) \
            or state["epoch"] >= options.epochs:
        raise ValueError(f"{path.name} belongs to another run (different windows or epochs); delete it to start over")
    return state


def _describe(bundle, options, train_set, val_set, best, imagenet: bool, device_text: str, t0: float,
              holdout: Optional[TileSet] = None) -> None:
    """Training metadata the checkpoint carries (plain types only)."""
    sources, styles = {}, train_set.source_styles()
    for name in dict.fromkeys(train_set.sources + val_set.sources):
        sources[name] = {"train_windows": train_set.sources.count(name), "val_windows": val_set.sources.count(name)}
        if max(styles.values()) > 0 and name in styles:
            sources[name]["label_style"] = styles[name]
    bundle.training = {
        "trained": True,
        "note": (f"trained {time.strftime('%Y-%m-%d')} on {len(train_set)} windows, "
                 f"best validation F1 {best['f1']:.4f} (epoch {best['epoch']}, threshold {best['threshold']:.2f})"),
        "epochs": options.epochs, "best_epoch": best["epoch"], "seed": options.seed, "device": device_text,
        "lr": options.lr, "batch_size": options.batch_size, "boundary_weight": options.boundary_weight,
        "train_windows": len(train_set), "val_windows": len(val_set), "val_names": list(val_set.names),
        "sources": sources, "holdout_groups": sorted(set(holdout.groups)) if holdout is not None else [],
        "threshold": float(best["threshold"]),
        "validation": {k: float(v) for k, v in best.items() if k != "epoch"},
        "initialisation": (f"checkpoint {Path(options.init_from).name}" if options.init_from else
                           "ImageNet (conv1 = RGB mean)" if imagenet else "random (no ImageNet weights)"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
