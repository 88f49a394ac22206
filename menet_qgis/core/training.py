"""Train ME-Net on labelled Sentinel-2 windows and keep the best checkpoint.

What real labels look like is handled here: soft mask values (mangrove means
>= 0.5), NaN pixels (ignored by the loss and the scores), windows present more
than once (kept once), class imbalance (positive-class weight + Dice loss).
Validation windows are chosen by *location*: windows that overlap or touch go
to the same side, so no place is seen in both training and validation.
"""
from __future__ import annotations

import glob
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

from . import channels as ch
from .compat import apply
from .bands import InputPlan
from .checkpoint import ModelBundle, new_bundle, save, saved_bytes
from .engine import Cancelled, Reporter, prepare_batch
from .metrics import Confusion
from .model import load_imagenet_state
from .raster_io import RasterInput, require_free_space


@dataclass
class TileSet:
    """Labelled windows in memory: reflectance (N, 6, H, W), labels and validity (N, H, W)."""

    images: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    bounds: List[Tuple[float, float, float, float]]
    names: List[str]
    crs: Optional[str] = None
    duplicates_dropped: int = 0

    def __len__(self):
        return len(self.images)

    def subset(self, idx: Sequence[int]) -> "TileSet":
        idx = list(idx)
        return TileSet(self.images[idx], self.labels[idx], self.valid[idx], [self.bounds[i] for i in idx],
                       [self.names[i] for i in idx], self.crs)


def _read_reflectance(path: str) -> Tuple[np.ndarray, np.ndarray, Tuple, str]:
    """Six source bands as reflectance + validity, using the same band mapping as inference."""
    src = RasterInput(path)
    if src.plan.kind != "sentinel2":
        raise ValueError(f"{Path(path).name}: training needs Sentinel-2 bands, not a ready-made 11-band stack")
    data, valid = src.read(0, 0, max(src.width, src.height))
    data = (data[:, :src.height, :src.width] + src.plan.offset) * src.plan.scale
    valid = valid[:src.height, :src.width]
    data[:, ~valid] = np.nan
    with rasterio.open(path) as ds:
        bounds, crs = tuple(ds.bounds), ds.crs.to_string()
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


def load_tile_folder(folder, image_glob: str = "tile_*.tif", mask_prefix: Tuple[str, str] = ("tile_", "mask_")) -> TileSet:
    """Image/mask pairs such as ``tile_0001.tif`` + ``mask_0001.tif``; duplicates kept once."""
    paths = sorted(glob.glob(str(Path(folder) / image_glob)))
    if not paths:
        raise ValueError(f"no training tiles matching {image_glob} in {folder}")
    images, labels, valid, bounds, names = [], [], [], [], []
    seen, dropped, crs, crss = set(), 0, None, set()
    for path in paths:
        mask_path = str(Path(path).parent / Path(path).name.replace(*mask_prefix, 1))
        if not Path(mask_path).is_file():
            raise ValueError(f"no mask {Path(mask_path).name} for {Path(path).name}")
        img, ok, b, crs = _read_reflectance(path)
        crss.add(crs)
        key = tuple(round(v, 3) for v in b)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        with rasterio.open(mask_path) as ds:
            mask = ds.read(1, out_dtype="float32", masked=True).filled(np.nan)  # declared no-data -> NaN
        check_label_coding(mask, Path(mask_path).name)
        if mask.shape != ok.shape:
            raise ValueError(f"{Path(mask_path).name} is {mask.shape}, its image {ok.shape}")
        ok &= np.isfinite(mask)
        images.append(img)
        labels.append((np.nan_to_num(mask, nan=0.0) >= 0.5).astype(np.float32))
        valid.append(ok)
        bounds.append(b)
        names.append(Path(path).name)
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"training tiles differ in size: {sorted(shapes)}")
    if images[0].shape[1] != images[0].shape[2]:
        raise ValueError(f"training tiles must be square (90° rotations augment them), got {images[0].shape[1:]}")
    if len(crss) != 1:
        raise ValueError(f"training tiles are in several CRSs ({', '.join(sorted(crss))}); the location split "
                         "compares coordinates, so reproject them to one")
    check_both_classes(np.stack(labels), np.stack(valid), f"the training masks in {folder}")
    return TileSet(np.stack(images), np.stack(labels), np.stack(valid), bounds, names, crs, dropped)


def load_raster_labels(images: Sequence[str], mask: Optional[str] = None, polygons_by_image=None,
                       tile: int = 128) -> TileSet:
    """Training windows cut from whole rasters: labels from a mask raster (mangrove >= 0.5,
    resampled nearest onto each image's grid) or from polygons (GeoJSON-like dicts in each
    image's CRS, ``polygons_by_image[i]``).  Windows without valid labelled pixels are dropped."""
    from .assessment import burn_polygons, read_on_grid
    if (mask is None) == (polygons_by_image is None):
        raise ValueError("give the labels either as a mask raster or as polygons")
    images_out, labels, valid, bounds, names = [], [], [], [], []
    crs = None
    for k, path in enumerate(images):
        data, ok, _b, crs = _read_reflectance(path)
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


def fit_statistics(tiles: TileSet, max_pixels: int = 500_000, seed: int = 0):
    """PCA basis and per-channel mean/std from valid training pixels (fitted once, stored)."""
    pixels = tiles.images.transpose(0, 2, 3, 1)[tiles.valid]
    rng = np.random.default_rng(seed)
    if len(pixels) > max_pixels:
        pixels = pixels[rng.choice(len(pixels), max_pixels, replace=False)]
    pca = ch.PCABasis.fit(pixels)
    chans = ch.compute_channels(torch.from_numpy(pixels.T.copy()).view(1, 6, -1, 1), pca)[0, :, :, 0].numpy()
    mean, std = chans.mean(axis=1), chans.std(axis=1)
    return pca, mean.tolist(), np.maximum(std, 1e-6).tolist()


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of overhead imagery (k in 0..7), on the last two axes."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


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


@dataclass
class TrainResult:
    bundle: ModelBundle
    history: List[Dict] = field(default_factory=list)
    best: Dict = field(default_factory=dict)
    train_windows: int = 0
    val_windows: int = 0


def masked_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """BCE (positives weighted) + soft Dice, both over valid pixels only."""
    logits, v = logits[:, 0].float(), valid.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none",
                                             pos_weight=torch.tensor(pos_weight, device=logits.device))
    bce = (bce * v).sum() / v.sum().clamp(min=1)
    prob = torch.sigmoid(logits) * v
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + (target * v).sum() + 1)
    return bce + dice


#: Training windows are held as reflectance already: channels are built with no further scaling.
_REFLECTANCE_PLAN = InputPlan("sentinel2", list(range(1, 7)))


def evaluate(bundle: ModelBundle, tiles: TileSet, device, batch_size: int = 16, threshold: float = 0.5) -> Confusion:
    model = bundle.model.eval()
    conf = Confusion()
    with torch.inference_mode():
        for i in range(0, len(tiles), batch_size):
            raw = torch.from_numpy(np.nan_to_num(tiles.images[i:i + batch_size])).to(device)
            valid = torch.from_numpy(tiles.valid[i:i + batch_size]).to(device)
            prob = torch.sigmoid(model(prepare_batch(raw, valid, bundle, _REFLECTANCE_PLAN)).float())[:, 0].cpu().numpy()
            ok = tiles.valid[i:i + batch_size]
            conf.add(prob[ok] >= threshold, tiles.labels[i:i + batch_size][ok] >= 0.5)
    return conf


def train(tiles: TileSet, options: TrainOptions = TrainOptions(), reporter: Reporter = Reporter(),
          val_tiles: Optional[TileSet] = None) -> TrainResult:
    """Train from scratch (or ImageNet init); returns the best-on-validation bundle."""
    from .device import choose_device
    random.seed(options.seed)
    np.random.seed(options.seed)
    torch.manual_seed(options.seed)
    if options.threads:
        torch.set_num_threads(options.threads)
    device, device_text = choose_device(options.device)
    if options.batch_size < 2:
        raise ValueError(f"batch size must be at least 2 (batch normalisation), got {options.batch_size}")
    if val_tiles is None:
        b = tiles.bounds[0]
        block = BLOCK_PX * (b[2] - b[0]) / tiles.images.shape[-1]  # pixels -> map units of these tiles
        train_idx, val_idx = spatial_split(tiles.bounds, options.val_fraction, options.seed, block)
        train_set, val_set = tiles.subset(train_idx), tiles.subset(val_idx)
    else:
        train_set, val_set = tiles, val_tiles
    if len(train_set) < 2 or len(val_set) == 0:
        raise ValueError(f"need at least two training windows and one validation window "
                         f"(have {len(train_set)} and {len(val_set)})")
    check_both_classes(train_set.labels, train_set.valid, "the training windows", SPLIT_HINT)
    check_both_classes(val_set.labels, val_set.valid, "the validation windows", SPLIT_HINT)
    reporter.info(f"device: {device_text}")
    reporter.info(f"windows: {len(train_set)} train, {len(val_set)} validation (split by location); "
                  f"{tiles.duplicates_dropped} duplicated windows dropped")
    imagenet = load_imagenet_state(options.imagenet_weights, reporter.info)
    bundle = new_bundle(options.head_width, imagenet, seed=options.seed)
    if options.save_best_to:  # the best-so-far copy and the final model side by side, before hours of training
        require_free_space(Path(options.save_best_to).parent, 2 * saved_bytes(bundle, half=True),
                           "the model (best-so-far copy and final file)")
    bundle.pca, bundle.norm_mean, bundle.norm_std = fit_statistics(train_set, seed=options.seed)
    bundle.window_size = 256
    pos = float(train_set.labels[train_set.valid].mean())
    pos_weight = float(min(10.0, (1 - pos) / max(pos, 1e-6)))
    reporter.info(f"mangrove share of valid training pixels {pos:.3f}; positive-class weight {pos_weight:.2f}")
    model = bundle.model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / options.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=options.lr, total_steps=options.epochs * steps_per_epoch,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(options.seed)
    images = torch.from_numpy(np.nan_to_num(train_set.images))
    labels, valid = torch.from_numpy(train_set.labels), torch.from_numpy(train_set.valid)
    best_state, best, history = None, {"f1": -1.0}, []
    t0 = time.perf_counter()
    for epoch in range(1, options.epochs + 1):
        model.train()
        order = torch.randperm(len(train_set), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(order), options.batch_size):
            idx = order[start:start + options.batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            ks = torch.randint(0, 8, (len(idx),), generator=gen).tolist()
            xb = torch.stack([dihedral(images[i], k) for i, k in zip(idx.tolist(), ks)]).to(device)
            yb = torch.stack([dihedral(labels[i], k) for i, k in zip(idx.tolist(), ks)]).to(device)
            vb = torch.stack([dihedral(valid[i], k) for i, k in zip(idx.tolist(), ks)]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(prepare_batch(xb, vb, bundle, _REFLECTANCE_PLAN))
            loss = masked_loss(logits, yb, vb, pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            if reporter.cancelled():
                raise Cancelled("training cancelled")
        scores = evaluate(bundle, val_set, device).scores()
        row = {"epoch": epoch, "loss": total / max(count, 1), "val_f1": scores["f1"], "val_iou": scores["iou"],
               "val_kappa": scores["kappa"], "seconds": round(time.perf_counter() - t0, 1)}
        history.append(row)
        reporter.info(f"epoch {epoch}/{options.epochs}: loss {row['loss']:.4f}, validation F1 {scores['f1']:.4f}, "
                      f"IoU {scores['iou']:.4f}, kappa {scores['kappa']:.4f} ({row['seconds']:.0f} s)")
        if scores["f1"] > best["f1"]:
            best = dict(scores, epoch=epoch)
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if options.save_best_to:
                _describe(bundle, options, train_set, val_set, best, imagenet is not None, device_text, t0)
                save(bundle, options.save_best_to, half=True)
        reporter.progress(100.0 * epoch / options.epochs)
    if best_state is None or not all(math.isfinite(best[k]) for k in ("f1", "iou", "kappa")):
        raise ValueError("validation gave no usable score (loss or scores not finite): no model was saved")
    if best["kappa"] <= 0:
        reporter.warn(f"the best model is no better than chance on the validation windows (kappa "
                      f"{best['kappa']:.3f}): more epochs or more labels are needed before using it")
    model.load_state_dict(best_state)
    model.cpu().eval()
    _describe(bundle, options, train_set, val_set, best, imagenet is not None, device_text, t0)
    bundle.training["history"] = history
    return TrainResult(bundle, history, best, len(train_set), len(val_set))


def _describe(bundle, options, train_set, val_set, best, imagenet: bool, device_text: str, t0: float) -> None:
    """Training metadata the checkpoint carries (plain types only)."""
    bundle.training = {
        "trained": True,
        "note": (f"trained {time.strftime('%Y-%m-%d')} on {len(train_set)} windows, "
                 f"best validation F1 {best['f1']:.4f} (epoch {best['epoch']})"),
        "epochs": options.epochs, "best_epoch": best["epoch"], "seed": options.seed, "device": device_text,
        "lr": options.lr, "batch_size": options.batch_size,
        "train_windows": len(train_set), "val_windows": len(val_set), "val_names": list(val_set.names),
        "validation": {k: float(v) for k, v in best.items() if k != "epoch"},
        "initialisation": "ImageNet (conv1 = RGB mean)" if imagenet else "random (no ImageNet weights)",
        "seconds": round(time.perf_counter() - t0, 1),
    }
