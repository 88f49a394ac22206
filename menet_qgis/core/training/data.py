"""Labelled windows for training: tile folders, labelled rasters, what real labels look like, and the splits.

What real labels look like is handled here: soft mask values (mangrove means
>= 0.5), NaN pixels (ignored by the loss and the scores), windows present more
than once (kept once; when their labels disagree, the copy the image agrees
with, or none), labels that contradict the image (mangrove on open water),
labels offset from their image (moved back), class imbalance left to the loss
(``train.masked_loss``).  A tile folder pairs each tile with its mask by name (any case of the extension) and
checks that a georeferenced mask lies on its tile's grid; unpaired files are refused by name.  Validation windows are chosen by *location*: windows
that overlap or touch go to the same side, so no place is seen in both training
and validation.
"""
from __future__ import annotations

import fnmatch
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import rasterio
import rasterio.errors

from ..compat import apply
from ..evaluation.metrics import Confusion
from ..io.raster_io import RasterInput
from ..model import channels as ch


@dataclass
class TileSet:
    """Labelled windows in memory: reflectance (N, B, H, W), labels and validity (N, H, W).

    ``valid`` marks pixels that are scored; ``loss_valid`` those the loss sees (validity minus
    label pixels a source's quality rules set aside, e.g. the edges of coarse labels).  Each
    window carries its source, its location group (``source:…``: the unit of every split), a
    sample weight and its label style (0 = the style a trained model outputs; see ``SourceSpec``).
    ``bounds`` is ``None`` for un-georeferenced windows.  ``cloud`` marks the valid pixels
    ``leave_out_clouds`` found under cloud, cloud shadow or cirrus (out of the loss and the scores)."""

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
    cloud: Optional[np.ndarray] = None

    def __post_init__(self):
        n = len(self.images)
        self.sources = self.sources or ["tiles"] * n
        self.groups = self.groups or [f"{self.sources[i]}:{self.names[i]}" for i in range(n)]
        self.weights = np.ones(n, np.float32) if self.weights is None else np.asarray(self.weights, np.float32)
        self.loss_valid = self.valid.copy() if self.loss_valid is None else self.loss_valid
        self.styles = np.zeros(n, np.int64) if self.styles is None else np.asarray(self.styles, np.int64)

    @property
    def scored(self) -> np.ndarray:
        """The pixels scores count: valid ones, less those ``leave_out_clouds`` found under clouds."""
        return self.valid if self.cloud is None else self.valid & ~self.cloud

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
                       styles=self.styles[idx], cloud=None if self.cloud is None else self.cloud[idx])

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
                   np.concatenate([t.styles for t in sets]),
                   None if all(t.cloud is None for t in sets) else
                   np.concatenate([np.zeros(t.valid.shape, bool) if t.cloud is None else t.cloud for t in sets]))


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


def check_label_coding(mask: np.ndarray, name: str, what: str = "mask") -> None:
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
    raise ValueError(f"{what} {name} holds values {shown}; masks must be 1 = mangrove, 0 = other "
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


def cloud_quality(images: np.ndarray, recipe: ch.Recipe) -> np.ndarray:
    """(N, H, W) quality codes (``core.io.clouds``) of each window by the cloud detector the maps use
    (``cloud_detector.detect``), on its reflectance in ``recipe``'s band order (NaN = no data)."""
    from ..io.cloud_detector import detect
    if len(images) == 0:
        return np.zeros(images.shape[:1] + images.shape[2:], np.uint8)
    return np.stack([np.asarray(detect(img, list(recipe.source_bands)), np.uint8) for img in images])


def leave_out_clouds(tiles: TileSet, recipe: ch.Recipe, log: Callable[[str], None] = lambda message: None,
                     what: str = "", quality: Optional[np.ndarray] = None) -> Dict[str, Dict[str, int]]:
    """Leave the labels of pixels without ground evidence out of the loss and the scores: where the cloud
    detector of the maps finds cloud, cloud shadow or cirrus, a label (drawn from another date or a coarse
    map) says what lies under the cloud, and a model trained on it learns to paint mangrove on clouds.
    The pixels stay in the input (the model sees the cloud as context, as it does when it maps); they
    leave ``loss_valid`` and are marked in ``tiles.cloud`` (``scored`` leaves them out).  Returns, per
    source, the pixels set aside (``cloud_pixels``: valid labelled pixels under cloud; ``loss_pixels``:
    those the loss saw before), its valid pixels and its windows with any, each logged in one line.
    ``quality``: the windows' codes when already known (``cloud_quality``)."""
    from ..io import clouds
    quality = cloud_quality(tiles.images, recipe) if quality is None else quality
    cloud = (quality != clouds.CLEAR) & tiles.valid
    before = tiles.loss_valid
    tiles.cloud = cloud if tiles.cloud is None else tiles.cloud | cloud
    tiles.loss_valid = before & ~cloud
    report: Dict[str, Dict[str, int]] = {}
    for source in dict.fromkeys(tiles.sources):
        idx = [i for i, s in enumerate(tiles.sources) if s == source]
        under = cloud[idx]
        codes = quality[idx][under]
        report[source] = {"cloud_pixels": int(under.sum()), "loss_pixels": int((before[idx] & under).sum()),
                          "valid_pixels": int(tiles.valid[idx].sum()),
                          "windows": int(np.any(under, axis=(1, 2)).sum()), "of_windows": len(idx),
                          **{clouds.QUALITY_NAMES[c]: int((codes == c).sum()) for c in
                             (clouds.CLOUD, clouds.SHADOW, clouds.CIRRUS) if (codes == c).any()}}
        r = report[source]
        kinds = ", ".join(f"{k} {r[k]}" for k in ("cloud", "cloud shadow", "cirrus") if k in r)
        log(f"{source}{what}: {r['cloud_pixels']} labelled pixels under clouds ({r['cloud_pixels'] / max(r['valid_pixels'], 1):.2%} "
            f"of its valid pixels, in {r['windows']} of {r['of_windows']} windows{'; ' + kinds if kinds else ''}) "
            "carry no loss and no score")
    return report


def copy_agreement(image: np.ndarray, valid: np.ndarray, label: np.ndarray, recipe: ch.Recipe) -> float:
    """How far a mask agrees with its image: F1 of the label against the image's vegetation (NDVI > 0.3
    and MNDWI < 0).  Vegetation is not mangrove, so this only ranks copies of one footprint: a copy
    whose mangrove lies on water or bare ground, or misses the vegetated shore, scores far lower."""
    ndvi, mndwi = ndvi_mndwi(image, recipe)
    vegetation = (ndvi > 0.3) & (mndwi < 0.0)
    return Confusion().add(vegetation[valid], label[valid] >= 0.5).scores()["f1"]


def load_tile_folder(folder, image_glob: str = "tile_*.tif", mask_prefix: Tuple[str, str] = ("tile_", "mask_"),
                     recipe: ch.Recipe = ch.DEFAULT_RECIPE, spec: Optional[SourceSpec] = None,
                     log: Callable[[str], None] = lambda message: None, ignore_clouds: bool = False) -> TileSet:
    """Image/mask pairs such as ``tile_0001.tif`` + ``mask_0001.tif`` (paired by ``pair_tile_files``, each mask on
    its tile's grid by ``check_mask_grid``); copies of one footprint kept once (when their labels disagree, the
    one that agrees with the image, or none); label-noise rules applied and logged.  ``ignore_clouds``: pixels
    under clouds carry no loss and no score (``leave_out_clouds``), and the label-noise rules do not read them
    (an opaque cloud passes the water rule's index test)."""
    spec = spec or SourceSpec(str(folder))
    pairs = _read_pairs(pair_tile_files(folder, image_glob, mask_prefix), recipe)
    pairs.check_grids(folder)
    if pairs.one_sided:
        log(f"{spec.source}: {len(pairs.one_sided)} of {len(pairs.names) + pairs.dropped} pairs have georeferencing on "
            f"only one of tile and mask ({_listed(pairs.one_sided)}): paired pixel for pixel, right only if each "
            "mask was cut from its very tile")
    flags = pairs.resolve_copies(recipe, spec)
    images, labels, valid, bounds, names = pairs.kept()
    if spec.align:
        labels, valid = _align_labels(images, labels, valid, recipe, spec, log)
    check_both_classes(labels, valid, f"the training masks in {folder}")
    loss_valid = valid & ~label_edge_band(labels, spec.edge_ignore)
    weights = np.full(len(images), spec.weight, np.float32)
    quality = cloud_quality(images, recipe) if ignore_clouds else None
    seen = valid if quality is None else valid & (quality == 0)  # 0: clouds.CLEAR
    for flag in flag_label_noise(images, labels, seen, recipe):
        i = flag.pop("index")
        loss_valid[i] &= ~flag.pop("water")
        weights[i] *= 0.5
        flags.append({"window": names[i], "source": spec.source, **flag})
    crs = pairs.crss.pop()
    groups = _tile_groups(folder, spec, crs, bounds, names, images.shape[-1], log)
    for flag in flags:
        log(f"label noise, {flag['source']} {flag['window']}: {flag['rule']}"
            + (f" ({flag['share']:.0%} of its mangrove pixels)" if "share" in flag else "") + f" -> {flag['decision']}")
    tiles = TileSet(images, labels, valid, bounds, names, crs, pairs.dropped, [spec.source] * len(images), groups,
                    weights, loss_valid, flags, np.full(len(images), spec.style, np.int64))
    if quality is not None:
        leave_out_clouds(tiles, recipe, log, quality=quality)
    return tiles


@dataclass
class _TilePairs:
    """A tile folder's image/mask pairs as read: one per footprint, later copies of a footprint set aside."""

    images: List[np.ndarray] = field(default_factory=list)
    labels: List[np.ndarray] = field(default_factory=list)
    valid: List[np.ndarray] = field(default_factory=list)
    bounds: List[Optional[Tuple]] = field(default_factory=list)
    names: List[str] = field(default_factory=list)
    #: first index -> later copies (image, valid, label, name)
    copies: Dict[int, List[Tuple]] = field(default_factory=dict)
    conflicts: Set[int] = field(default_factory=set)     # first indexes whose copies' labels disagree
    unresolved: Set[int] = field(default_factory=set)    # ... and none of them agrees clearly with the image
    seen: Dict[Tuple, int] = field(default_factory=dict)  # footprint -> index of its first window
    crss: Set[Optional[str]] = field(default_factory=set)
    dropped: int = 0
    one_sided: List[str] = field(default_factory=list)  # masks paired pixel for pixel: only one side georeferenced

    def add(self, img: np.ndarray, ok: np.ndarray, lab: np.ndarray, b: Optional[Tuple], name: str) -> None:
        """A window, or a copy of one already read (same footprint, to 3 decimals)."""
        key = tuple(round(v, 3) for v in b) if b is not None else None
        first = self.seen.get(key) if key is not None else None
        if first is not None:
            self.dropped += 1
            self.copies.setdefault(first, []).append((img, ok, lab, name))
            both = ok & self.valid[first]
            if both.any() and float((lab[both] != self.labels[first][both]).mean()) > DUPLICATE_DISAGREEMENT:
                self.conflicts.add(first)
            return
        if key is not None:
            self.seen[key] = len(self.images)
        self.images.append(img)
        self.labels.append(lab)
        self.valid.append(ok)
        self.bounds.append(b)
        self.names.append(name)

    def check_grids(self, folder) -> None:
        """One CRS (the location split compares coordinates), one size, square windows."""
        if len(self.crss) != 1:
            shown = ", ".join(sorted(c or "none" for c in self.crss))
            raise ValueError(f"training tiles in {folder} are in several CRSs ({shown}); the location split "
                             "compares coordinates, so reproject them to one (or put un-georeferenced tiles in a "
                             "folder of their own)")
        shapes = {im.shape for im in self.images}
        if len(shapes) != 1:
            raise ValueError(f"training tiles differ in size: {sorted(shapes)}")
        if self.images[0].shape[1] != self.images[0].shape[2]:
            raise ValueError("training tiles must be square (90° rotations augment them), "
                             f"got {self.images[0].shape[1:]}")

    def resolve_copies(self, recipe: ch.Recipe, spec: "SourceSpec") -> List[Dict]:
        """Copies of one footprint whose labels disagree: the copy whose label agrees best with the image's
        vegetation is kept when it leads clearly, else every copy is dropped.  Returns the flags for the log."""
        flags = []
        for i in sorted(self.conflicts):
            candidates = [(self.images[i], self.valid[i], self.labels[i], self.names[i])] + self.copies[i]
            scores = [copy_agreement(img, ok, lab, recipe) for img, ok, lab, _ in candidates]
            order = np.argsort(scores)[::-1]
            told = ", ".join(f"{candidates[k][3]} {scores[k]:.2f}" for k in order)
            rule = "copies of one footprint with different labels"
            if scores[order[0]] - scores[order[1]] >= COPY_AGREEMENT_LEAD:
                self.images[i], self.valid[i], self.labels[i], self.names[i] = candidates[order[0]]
                flags.append({"window": self.names[i], "source": spec.source, "rule": rule,
                              "decision": f"kept {self.names[i]}, whose label agrees best with the image's vegetation "
                                          f"(F1 {told}); the other copies dropped"})
            else:
                self.unresolved.add(i)
                flags.append({"window": self.names[i], "source": spec.source, "rule": rule,
                              "decision": "dropped, every copy: none agrees clearly better with the image "
                                          f"(F1 {told})"})
        return flags

    def kept(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List, List[str]]:
        """(images, labels, valid) stacked, bounds and names: every window but the unresolved ones."""
        keep = [i for i in range(len(self.images)) if i not in self.unresolved]
        return (np.stack(self.images)[keep], np.stack(self.labels)[keep], np.stack(self.valid)[keep],
                [self.bounds[i] for i in keep], [self.names[i] for i in keep])


#: How far (in the tile's pixels) a georeferenced mask's corners may lie from its tile's: rounding, not a shift.
GRID_TOLERANCE_PX = 0.1
#: How many file names a message lists before the count.
NAMES_SHOWN = 5


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" … ({len(names)} in all)" if len(names) > NAMES_SHOWN else "")


def pair_tile_files(folder, image_glob: str = "tile_*.tif",
                    mask_prefix: Tuple[str, str] = ("tile_", "mask_")) -> List[Tuple[Path, Path]]:
    """(tile, mask) paths of a tile folder: the tiles ``image_glob`` matches and the mask named like each (the
    first ``mask_prefix[0]`` replaced by ``mask_prefix[1]``), both matched whatever the case (``tile_7.TIF`` +
    ``mask_7.tif``).  Tiles without a mask, masks without a tile and a tile with two masks differing only
    in case are refused, naming them: a file left out of training silently is a label set quietly shrunk."""
    folder = Path(folder)
    try:
        names = sorted(n for n in os.listdir(folder) if (folder / n).is_file())
    except OSError as exc:
        raise ValueError(f"cannot read the tile folder {folder}: {exc.strerror or exc}") from None
    old, new = mask_prefix

    def as_mask(name: str) -> str:
        return re.sub(re.escape(old), lambda _: new, name, count=1, flags=re.IGNORECASE)

    by_lower: Dict[str, List[str]] = {}
    for name in names:
        by_lower.setdefault(name.lower(), []).append(name)
    tiles = [n for n in names if fnmatch.fnmatchcase(n.lower(), image_glob.lower())]
    if not tiles:
        raise ValueError(f"no training tiles matching {image_glob} in {folder}")
    mask_glob = as_mask(image_glob).lower()
    unpaired = {n for n in names if mask_glob != image_glob.lower() and fnmatch.fnmatchcase(n.lower(), mask_glob)}
    pairs, missing, doubled = [], [], []
    for tile in tiles:
        found = by_lower.get(as_mask(tile).lower(), [])
        if len(found) == 1:
            pairs.append((folder / tile, folder / found[0]))
            unpaired.discard(found[0])
        elif found:
            doubled.append(" and ".join(found))
        else:
            missing.append(tile)
    if missing:
        raise ValueError(f"{len(missing)} tile{'s' if len(missing) > 1 else ''} in {folder} without a mask: "
                         f"{_listed(missing)}; each {old}NAME needs its {new}NAME beside it (add the masks or move "
                         "those tiles out of the folder)")
    if doubled:
        raise ValueError(f"tiles in {folder} with two masks that differ only in case: {_listed(doubled)}; keep one")
    if unpaired:
        orphans = sorted(unpaired)
        raise ValueError(f"{len(orphans)} mask{'s' if len(orphans) > 1 else ''} in {folder} without a tile: "
                         f"{_listed(orphans)}; each {new}NAME belongs to a {old}NAME beside it (add the tiles or move "
                         "those masks out of the folder)")
    return pairs


def check_mask_grid(tile, mask, tile_name: str, mask_name: str) -> bool:
    """Refuse a mask whose georeferencing puts it elsewhere than its tile: another CRS, or corners more than
    ``GRID_TOLERANCE_PX`` from the tile's (shifted, another pixel size).  A pair where only one of the two is
    georeferenced (MagSet-2 has neither) is paired pixel for pixel: returns True then, for the log.  Masks
    swapped between two tiles are caught this way when both carry their own georeferencing; between copies
    of one footprint, or without georeferencing, nothing in the files can tell."""
    if tile.transform.is_identity or mask.transform.is_identity:
        return tile.transform.is_identity != mask.transform.is_identity
    if tile.crs and mask.crs and tile.crs != mask.crs:
        raise ValueError(f"mask {mask_name} is in {mask.crs}, its tile {tile_name} in {tile.crs}: a mask must lie "
                         "on its tile's grid (same CRS, origin and pixel size); reproject the mask onto its tile")
    to_tile_px = ~tile.transform * mask.transform
    corners = [(0, 0), (mask.width, 0), (0, mask.height), (mask.width, mask.height)]
    off = max(max(abs(x - cx), abs(y - cy)) for (cx, cy), (x, y) in zip(corners, (to_tile_px * c for c in corners)))
    if off <= GRID_TOLERANCE_PX:
        return False
    if not np.allclose(mask.res, tile.res, rtol=1e-6):
        how = f"its pixels are {mask.res[0]:g} x {mask.res[1]:g}, the tile's {tile.res[0]:g} x {tile.res[1]:g}"
    else:
        col, row = to_tile_px * (0, 0)
        parts = [f"{abs(col):.1f} px {'east' if col > 0 else 'west'}" if abs(col) > GRID_TOLERANCE_PX else "",
                 f"{abs(row):.1f} px {'south' if row > 0 else 'north'}" if abs(row) > GRID_TOLERANCE_PX else ""]
        how = f"it lies {' and '.join(p for p in parts if p)} of it"
    raise ValueError(f"mask {mask_name} does not lie on its tile {tile_name}: {how}; a mask must share its tile's "
                     "grid (same CRS, origin and pixel size): pair it with the right tile or cut it to this one")


def _read_pairs(pairs_of_files: Sequence[Tuple[Path, Path]], recipe: ch.Recipe) -> _TilePairs:
    """Each image with its mask (mask on the tile's grid, labels checked and binarised, the mask's no-data
    made invalid)."""
    pairs = _TilePairs()
    with warnings.catch_warnings():  # un-georeferenced tiles are expected here (maps refuse them elsewhere)
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        for path, mask_path in pairs_of_files:
            with rasterio.open(path) as tile, rasterio.open(mask_path) as ds:
                if check_mask_grid(tile, ds, path.name, mask_path.name):
                    pairs.one_sided.append(mask_path.name)
                mask = ds.read(1, out_dtype="float32", masked=True).filled(np.nan)  # declared no-data -> NaN
            img, ok, b, crs = _read_reflectance(str(path), recipe, georeferenced=False)
            pairs.crss.add(crs)
            check_label_coding(mask, mask_path.name)
            if mask.shape != ok.shape:
                raise ValueError(f"{mask_path.name} is {mask.shape}, its image {ok.shape}")
            ok &= np.isfinite(mask)
            lab = (np.nan_to_num(mask, nan=0.0) >= 0.5).astype(np.float32)
            pairs.add(img, ok, lab, b, path.name)
    return pairs


def _align_labels(images, labels, valid, recipe: ch.Recipe, spec: "SourceSpec", log) -> Tuple[np.ndarray, np.ndarray]:
    """Each window's labels moved onto its image (``spec.align``: the largest move searched)."""
    offsets = label_offsets(images, labels, valid, recipe, spec.align)
    labels, valid = move_labels(labels, valid, offsets)
    moved = int(np.any(offsets != 0, axis=1).sum())
    log(f"{spec.source}: labels moved onto their images in {moved} of {len(offsets)} windows; labels sat "
        f"{offsets[:, 0].mean():+.2f} px south and {offsets[:, 1].mean():+.2f} px east on average "
        f"(at most {spec.align} px searched)")
    return labels, valid


def _tile_groups(folder, spec: "SourceSpec", crs: Optional[str], bounds, names: List[str], size_px: int,
                 log) -> List[str]:
    """Each window's location group: spatial blocks of its footprint when the tiles are georeferenced, else
    the source's group pattern on its name, else the window alone."""
    if crs is not None:
        b = bounds[0]
        block = BLOCK_PX * (b[2] - b[0]) / size_px  # pixels -> map units of these tiles
        return [f"{spec.source}:block{g}" for g in location_groups(bounds, block)]
    if spec.group:
        pattern = re.compile(spec.group)
        groups = []
        for n in names:
            m = pattern.search(n)
            if not m:
                raise ValueError(f"{n} does not match the group pattern {spec.group!r} of {folder}")
            groups.append(f"{spec.source}:{m.group(1) if m.groups() else m.group(0)}")
        return groups
    log(f"{spec.source}: tiles have no georeferencing and no group pattern: each is its own location, "
        "so neighbouring tiles may land on both sides of the validation split")
    return [f"{spec.source}:{n}" for n in names]


def load_raster_labels(images: Sequence[str], mask: Optional[str] = None, polygons_by_image=None,
                       tile: int = 128, recipe: ch.Recipe = ch.DEFAULT_RECIPE, ignore_clouds: bool = False,
                       log: Callable[[str], None] = lambda message: None) -> TileSet:
    """Training windows cut from whole rasters: labels from a mask raster (mangrove >= 0.5,
    resampled nearest onto each image's grid) or from polygons (GeoJSON-like dicts in each
    image's CRS, ``polygons_by_image[i]``).  Windows without valid labelled pixels are dropped.
    ``ignore_clouds``: pixels under clouds carry no loss and no score (``leave_out_clouds``)."""
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
    tiles = TileSet(np.stack(images_out), np.stack(labels), np.stack(valid), bounds, names, crs)
    if ignore_clouds:
        leave_out_clouds(tiles, recipe, log)
    return tiles


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
