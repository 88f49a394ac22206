"""Train ME-Net on labelled windows (``data.py``) and keep the best checkpoint.

Class imbalance is met by the loss (positive-class weight + soft Dice over the
valid pixels; optionally boundary-aware); each epoch sees every training window
once under one of its 8 flips; the checkpoint kept is the epoch with the best
validation F1, with the decision threshold chosen on validation stored in it.
A stopped run continues from its resume state.
"""
from __future__ import annotations

import io
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluation.metrics import Confusion, ProbabilityCounts
from ..files import JSON_HISTORY, atomic_write_bytes, atomic_write_text, json_text
from ..inference.runtimes import prepare_batch
from ..io.bands import InputPlan
from ..io.raster_io import require_free_space
from ..model import channels as ch
from ..model.checkpoint import ModelBundle, load_imagenet_state, new_bundle, save, saved_bytes
from ..model.flips import dihedral
from ..reporting import Cancelled, Reporter
from .data import SPLIT_HINT, TileSet, check_both_classes, label_edge_band, leave_out_clouds, split_windows
from ...options import TRAIN, default_of

#: Width (px) of the band a boundary-aware loss weights up: 83 % of the Jambelí model's errors
#: lay within 2 px of a mangrove boundary (issue 10).
BOUNDARY_PX = 2


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
    """The training loop's options; the user-facing ones start from their declaration in options.TRAIN."""
    epochs: int = default_of(TRAIN, "epochs")
    batch_size: int = default_of(TRAIN, "batch_size")
    lr: float = default_of(TRAIN, "lr")
    weight_decay: float = 1e-4
    val_fraction: float = default_of(TRAIN, "val_fraction")
    seed: int = default_of(TRAIN, "seed")
    device: str = default_of(TRAIN, "device")
    head_width: int = 64
    imagenet_weights: Optional[str] = None
    threads: int = default_of(TRAIN, "threads")
    save_best_to: Optional[str] = None   # write the best checkpoint as soon as it improves
    recipe: ch.Recipe = ch.DEFAULT_RECIPE
    init_from: Optional[str] = None      # start from this checkpoint's weights (fine-tuning)
    resume_state: Optional[str] = None   # written after every epoch; continued from when it exists
    val_groups: Sequence[str] = ()
    holdout_groups: Sequence[str] = ()
    val_names: Sequence[str] = ()
    boundary_weight: float = default_of(TRAIN, "boundary_weight")  # > 0: boundary-aware loss (see masked_loss)
    refine_width: Optional[int] = None   # image-guided refinement width; None = as init_from, else 0 (none)
    train_on_clouds: bool = default_of(TRAIN, "train_on_clouds")  # False: cloudy pixels carry no loss (ignore_clouds)


@dataclass
class TrainResult:
    bundle: ModelBundle
    history: List[Dict] = field(default_factory=list)
    best: Dict = field(default_factory=dict)
    train_windows: int = 0
    val_windows: int = 0
    holdout: Optional[TileSet] = None
    validation: Optional[TileSet] = None
    training: Optional[TileSet] = None   # the windows trained on (after the split): baselines train on the same


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
    scored = tiles.scored
    return Confusion().add(prob[scored] >= threshold, tiles.labels[scored] >= 0.5)


def probability_counts(bundle: ModelBundle, tiles: TileSet, device, batch_size: int = 16) -> Dict[str, ProbabilityCounts]:
    """Probability histograms per location group and per source, plus ``"all"``."""
    prob = predict_windows(bundle, tiles, device, batch_size)
    counts: Dict[str, ProbabilityCounts] = {}
    scored = tiles.scored
    for i in range(len(tiles)):
        ok = scored[i]
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
    from ..inference.device import choose_device
    _set_seeds(options.seed)
    if options.threads:
        torch.set_num_threads(options.threads)
    device, device_text = choose_device(options.device)
    _check_options(tiles, options)
    if not options.train_on_clouds:  # unless the loader has done it (load_tile_folder's ignore_clouds)
        tiles, val_tiles = _without_clouds(tiles, val_tiles, options.recipe, reporter)
    train_set, val_set, holdout, label_styles = _training_split(tiles, options, val_tiles)
    _log_split(reporter, device_text, options, tiles, train_set, val_set, holdout)
    bundle, imagenet = _initial_model(options, train_set, label_styles, reporter)
    pos_weight = _positive_weight(train_set, reporter)
    model = bundle.model.to(device)
    opt, sched, gen = _optimiser(model, options, len(train_set))
    tensors = _training_tensors(train_set)
    best_state, best, history, first_epoch = None, {"f1": -1.0}, [], 1
    resume = Path(options.resume_state) if options.resume_state else None
    if resume is not None and resume.is_file():
        best_state, best, history, first_epoch = _resume(resume, options, train_set, val_set, model, opt, sched,
                                                         gen, bundle, reporter)
    t0 = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    for epoch in range(first_epoch, options.epochs + 1):
        loss, train_seconds = _train_epoch(model, bundle, tensors, opt, sched, gen, device, options, pos_weight,
                                           reporter)
        row, scores = _validate(bundle, val_set, device, epoch, loss, train_seconds, t0, options, reporter)
        history.append(row)
        if scores["f1"] > best["f1"]:
            best = dict(scores, epoch=epoch, threshold=row["threshold"])
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if options.save_best_to:
                _describe(bundle, options, train_set, val_set, best, imagenet, device_text, t0, holdout)
                save(_one_style(bundle), options.save_best_to, half=True)
        if resume is not None:
            _save_resume_state(resume, epoch, model, opt, sched, gen, best, best_state, history, bundle.training)
        reporter.progress(100.0 * epoch / options.epochs)
    _check_best(best_state, best, reporter)
    model.load_state_dict(best_state)
    model.cpu().eval()
    model.head.keep_label_style(0)
    _describe(bundle, options, train_set, val_set, best, imagenet, device_text, t0, holdout)
    bundle.training["history"] = history
    reporter.info(f"decision threshold {best['threshold']:.2f} (chosen on validation, stored in the model)")
    return TrainResult(bundle, history, best, len(train_set), len(val_set), holdout, val_set, train_set)


def _check_options(tiles: TileSet, options: TrainOptions) -> None:
    if options.batch_size < 2:
        raise ValueError(f"batch size must be at least 2 (batch normalisation), got {options.batch_size}")
    if tiles.images.shape[1] != len(options.recipe.source_bands):
        raise ValueError(f"the windows hold {tiles.images.shape[1]} bands, recipe {options.recipe.label} reads "
                         f"{len(options.recipe.source_bands)} ({', '.join(options.recipe.source_bands)})")


def _without_clouds(tiles: TileSet, val_tiles: Optional[TileSet], recipe: ch.Recipe,
                    reporter: Reporter) -> Tuple[TileSet, Optional[TileSet]]:
    """The windows with their pixels under clouds (the maps' cloud detector) out of the loss and the scores, as
    copies (the caller's windows are left as they were); windows whose clouds were looked for already as they are.
    The loaders do this better (``ignore_clouds``): their label-noise rules then leave the clouds out too."""
    if tiles.cloud is None:
        tiles = replace(tiles)
        leave_out_clouds(tiles, recipe, reporter.info)
    if val_tiles is not None and val_tiles.cloud is None:
        val_tiles = replace(val_tiles)
        leave_out_clouds(val_tiles, recipe, reporter.info, " (validation)")
    return tiles, val_tiles


def _training_split(tiles: TileSet, options: TrainOptions,
                    val_tiles: Optional[TileSet]) -> Tuple[TileSet, TileSet, Optional[TileSet], int]:
    """(training, validation, held-out windows, label styles): split by location unless ``val_tiles`` is given;
    both sides must hold both classes, and the styles must be 0, 1, … with style 0 among the training windows."""
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
    return train_set, val_set, holdout, label_styles


def _log_split(reporter: Reporter, device_text: str, options: TrainOptions, tiles: TileSet, train_set: TileSet,
               val_set: TileSet, holdout: Optional[TileSet]) -> None:
    reporter.info(f"device: {device_text}")
    reporter.info(f"channel recipe: {options.recipe.label} ({', '.join(options.recipe.source_bands)})")
    reporter.info(f"windows: {len(train_set)} train, {len(val_set)} validation (split by location)"
                  + (f", {len(holdout)} held out ({', '.join(sorted(set(holdout.groups)))})" if holdout else "")
                  + f"; {tiles.duplicates_dropped} duplicated windows dropped")
    for source in dict.fromkeys(tiles.sources):
        n_train = sum(1 for x in train_set.sources if x == source)
        n_val = sum(1 for x in val_set.sources if x == source)
        reporter.info(f"  {source}: {n_train} train, {n_val} validation")


def _initial_model(options: TrainOptions, train_set: TileSet, label_styles: int,
                   reporter: Reporter) -> Tuple[ModelBundle, bool]:
    """(the model training starts from, whether its encoder starts from ImageNet): ImageNet's weights or
    random, or another checkpoint's (fine-tuning: its channel statistics kept when the recipe is the same),
    with one output per label style; the channel statistics refitted on the training windows otherwise."""
    from ..model.checkpoint import load as load_checkpoint
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
    return bundle, imagenet is not None


def _positive_weight(train_set: TileSet, reporter: Reporter) -> float:
    """The loss weight of mangrove pixels: the other class's share over theirs, at most 10."""
    pos = float(train_set.labels[train_set.loss_valid].mean())
    pos_weight = float(min(10.0, (1 - pos) / max(pos, 1e-6)))
    reporter.info(f"mangrove share of valid training pixels {pos:.3f}; positive-class weight {pos_weight:.2f}")
    return pos_weight


def _optimiser(model: torch.nn.Module, options: TrainOptions, windows: int):
    """AdamW under a one-cycle schedule over every step of the run, and the run's random stream."""
    opt = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    steps_per_epoch = math.ceil(windows / options.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=options.lr, total_steps=options.epochs * steps_per_epoch,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(options.seed)
    return opt, sched, gen


def _training_tensors(train_set: TileSet) -> Tuple[torch.Tensor, ...]:
    """(images with no-data as 0, labels, the pixels the loss sees, window weights, label styles)."""
    images = torch.from_numpy(np.nan_to_num(train_set.images))
    labels, valid = torch.from_numpy(train_set.labels), torch.from_numpy(train_set.loss_valid)
    weights, styles = torch.from_numpy(train_set.weights), torch.from_numpy(train_set.styles)
    return images, labels, valid, weights, styles


def _resume(path: Path, options: TrainOptions, train_set: TileSet, val_set: TileSet, model, opt, sched, gen,
            bundle: ModelBundle, reporter: Reporter) -> Tuple[Optional[Dict], Dict, List[Dict], int]:
    """Continue a stopped run from its state: (best weights, best scores, history, the next epoch)."""
    state = _load_resume_state(path, options, train_set, val_set)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    bundle.training = state["training"]
    reporter.info(f"resumed from {path.name} after epoch {state['epoch']} of {options.epochs}")
    return state.get("best_model"), state["best"], state["history"], state["epoch"] + 1


def _train_epoch(model, bundle: ModelBundle, tensors, opt, sched, gen, device, options: TrainOptions,
                 pos_weight: float, reporter: Reporter) -> Tuple[float, float]:
    """Every training window once, in a random order, each under a random one of its 8 flips:
    (mean loss, seconds)."""
    images, labels, valid, weights, styles = tensors
    model.train()
    order = torch.randperm(len(images), generator=gen)
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
    return total / max(count, 1), time.perf_counter() - epoch_start


def _validate(bundle: ModelBundle, val_set: TileSet, device, epoch: int, loss: float, train_seconds: float,
              t0: float, options: TrainOptions, reporter: Reporter) -> Tuple[Dict, Dict]:
    """Scores on the validation windows at the threshold best for them, logged: (the history row, the scores)."""
    counts = probability_counts(bundle, val_set, device)
    threshold, _f1_at = counts["all"].best_threshold()
    scores = counts["all"].confusion(threshold).scores()
    at_half = counts["all"].confusion(0.5).scores()
    row = {"epoch": epoch, "loss": loss, "val_f1": scores["f1"], "val_iou": scores["iou"],
           "val_kappa": scores["kappa"], "threshold": threshold, "val_f1_at_0.5": at_half["f1"],
           "per_source_f1": {k: counts[k].confusion(threshold).scores()["f1"]
                             for k in dict.fromkeys(val_set.sources)},
           "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - t0, 1)}
    reporter.info(f"epoch {epoch}/{options.epochs}: loss {row['loss']:.4f}, validation F1 {scores['f1']:.4f} "
                  f"at threshold {threshold:.2f} ({at_half['f1']:.4f} at 0.5), IoU {scores['iou']:.4f}, "
                  f"kappa {scores['kappa']:.4f}; "
                  + ", ".join(f"{k} {v:.4f}" for k, v in row["per_source_f1"].items())
                  + f" ({train_seconds:.0f} s training, {row['seconds']:.0f} s in all)")
    return row, scores


def _check_best(best_state: Optional[Dict], best: Dict, reporter: Reporter) -> None:
    """A usable best epoch, or no model at all; a warning when it is no better than chance."""
    if best_state is None or not all(math.isfinite(best[k]) for k in ("f1", "iou", "kappa")):
        raise ValueError("validation gave no usable score (loss or scores not finite): no model was saved")
    if best["kappa"] <= 0:
        reporter.warn(f"the best model is no better than chance on the validation windows (kappa "
                      f"{best['kappa']:.3f}): more epochs or more labels are needed before using it")


def write_history(history: Sequence[Dict], path) -> None:
    """The per-epoch log as strict JSON (an epoch whose loss diverged to NaN shows ``null``), written atomically
    and replacing only an earlier history (``files.refuse_replacing``)."""
    atomic_write_text(path, json_text(list(history)), kind=JSON_HISTORY)


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
        for key, part in (("cloud_pixels_ignored", train_set), ("val_cloud_pixels_unscored", val_set)):
            if part.cloud is not None:  # valid labelled pixels under clouds: out of the loss / the scores
                sources[name][key] = int(sum(part.cloud[i].sum() for i, s in enumerate(part.sources) if s == name))
    bundle.training = {
        "trained": True,
        "note": (f"trained {time.strftime('%Y-%m-%d')} on {len(train_set)} windows, "
                 f"best validation F1 {best['f1']:.4f} (epoch {best['epoch']}, threshold {best['threshold']:.2f})"),
        "epochs": options.epochs, "best_epoch": best["epoch"], "seed": options.seed, "device": device_text,
        "lr": options.lr, "batch_size": options.batch_size, "boundary_weight": options.boundary_weight,
        "clouds_ignored": train_set.cloud is not None,
        "train_windows": len(train_set), "val_windows": len(val_set), "val_names": list(val_set.names),
        "sources": sources, "holdout_groups": sorted(set(holdout.groups)) if holdout is not None else [],
        "threshold": float(best["threshold"]),
        "validation": {k: float(v) for k, v in best.items() if k != "epoch"},
        "initialisation": (f"checkpoint {Path(options.init_from).name}" if options.init_from else
                           "ImageNet (conv1 = RGB mean)" if imagenet else "random (no ImageNet weights)"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
