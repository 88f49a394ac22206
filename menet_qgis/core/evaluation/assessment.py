"""Accuracy of a mangrove map against a reference, and the two simple baselines.

A prediction (probability or 0/1 mask raster) is compared with a reference
(raster mask, or polygons already burnt into one) on the prediction's grid,
optionally only inside an area mask.  Baselines for the same pixels: the MVI
index with its published thresholds (Baloloy et al. 2020) and a per-pixel
random forest (scikit-learn), so every model report stands next to them.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import rasterio

from ..model import channels as ch
from ..io.polygons import burn_polygons, read_on_grid
from .metrics import LOCAL_THRESHOLD_RANGE, Confusion, ProbabilityCounts

MVI_RANGE = (4.5, 16.5)


@dataclass
class Assessment:
    name: str
    confusion: Confusion
    pixel_area_ha: float
    threshold: float = 0.5
    notes: List[str] = field(default_factory=list)
    #: (threshold, F1) with the best F1 on this very reference, for a probability map: the best
    #: threshold differs from coast to coast, and a user's own labels are the way to find theirs.
    best_threshold: Optional[Tuple[float, float]] = None

    @property
    def scores(self) -> Dict[str, float]:
        return self.confusion.scores()

    def area_ha(self) -> Dict[str, float]:
        c = self.confusion
        return {"predicted_mangrove_ha": (c.tp + c.fp) * self.pixel_area_ha,
                "reference_mangrove_ha": (c.tp + c.fn) * self.pixel_area_ha}

    def best_threshold_note(self) -> Optional[str]:
        """What the best threshold on this reference is worth, and how to use it (None for a mask)."""
        if not self.best_threshold:
            return None
        best, f1 = self.best_threshold
        return (f"on this reference the best threshold is {best:.2f} (F1 {f1:.4f}, against {self.scores['f1']:.4f} "
                f"at {self.threshold:.2f}): chosen on these same pixels, so that F1 is optimistic; choose it on "
                "part of your reference, assess the rest, and use it as the threshold for this coast")

    def to_dict(self) -> Dict:
        """One flat row: scores, areas and the confusion counts."""
        best = {"best_threshold": self.best_threshold[0], "f1_at_best_threshold": self.best_threshold[1]} \
            if self.best_threshold else {}
        return {"name": self.name, "threshold": self.threshold, **self.scores, **self.area_ha(),
                **self.confusion.to_dict(), "pixels": self.confusion.total, **best}


def mvi(green: np.ndarray, nir: np.ndarray, swir1: np.ndarray) -> np.ndarray:
    """Mangrove vegetation index |NIR - G| / |SWIR1 - G| (0 where the denominator is 0)."""
    den = np.abs(swir1 - green)
    return np.divide(np.abs(nir - green), den, out=np.zeros_like(den, dtype=np.float64), where=den > ch.EPS)


def mvi_mangrove(green, nir, swir1) -> np.ndarray:
    value = mvi(green, nir, swir1)
    return (value >= MVI_RANGE[0]) & (value <= MVI_RANGE[1])


def pixel_features(bands: np.ndarray) -> np.ndarray:
    """(B, N) reflectance (B2, B3, B4, B8, B11 and, with six bands, B12) -> (N, B + 3): the bands,
    NDVI, MNDWI, MVI (with B12 these are the forest's 9 features in ../shared/data/jambeli/README.md;
    without it 8, so the forest runs on every source a recipe v2 model does)."""
    x = bands.astype(np.float64)
    b3, b4, b8, b11 = x[1], x[2], x[3], x[4]
    ratio = lambda a, b: np.divide(a, b, out=np.zeros_like(a), where=np.abs(b) > ch.EPS)  # noqa: E731
    return np.concatenate([x.T, np.stack([ratio(b8 - b4, b8 + b4), ratio(b3 - b11, b3 + b11), mvi(b3, b8, b11)],
                                         axis=1)], axis=1)


def forest_label(bands: int, trees: int = 100) -> str:
    return f"random forest, {trees} trees, {bands + 3} per-pixel features"


def forest_from_tiles(folder, trees: int = 100, seed: int = 0):
    """Random-forest baseline trained on every valid pixel of a tile folder."""
    from ..training.data import load_tile_folder
    tiles = load_tile_folder(folder, recipe=ch.RECIPE_V2)
    return train_random_forest(tiles.images.transpose(1, 0, 2, 3)[:, tiles.valid], tiles.labels[tiles.valid],
                               trees, seed)


def train_random_forest(bands: np.ndarray, labels: np.ndarray, trees: int = 100, seed: int = 0,
                        max_samples: int = 200_000):
    """Per-pixel random forest on (B, N) reflectance and (N,) labels."""
    from sklearn.ensemble import RandomForestClassifier
    x, y = pixel_features(bands), labels.astype(bool)
    rng = np.random.default_rng(seed)
    if len(y) > max_samples:
        pick = rng.choice(len(y), max_samples, replace=False)
        x, y = x[pick], y[pick]
    forest = RandomForestClassifier(n_estimators=trees, n_jobs=-1, random_state=seed)
    return forest.fit(x, y)


def baseline_maps(image, like, forest=None) -> Dict[str, np.ndarray]:
    """MVI (and random-forest, if a fitted forest is given) mangrove masks of a
    Sentinel-2 raster on ``like``'s grid, for scoring on the same pixels."""
    from ..io.raster_io import RasterInput
    src = RasterInput(image, recipe=ch.RECIPE_V2)  # the forest of forest_from_tiles reads recipe v2's bands
    if src.plan.kind != "sentinel2":
        raise ValueError("baselines need a Sentinel-2 raster with B2, B3, B4, B8, B11")
    bands = np.stack([read_on_grid(image, like, b) for b in src.plan.band_indexes])
    bands = (bands + src.plan.offset) * src.plan.scale
    maps = {"mvi": mvi_mangrove(bands[1], bands[3], bands[4])}
    if forest is not None:
        flat = np.nan_to_num(bands.reshape(len(bands), -1))
        maps["random_forest"] = forest.predict(pixel_features(flat)).reshape(bands.shape[1:]).astype(bool)
    maps["_valid"] = np.isfinite(bands).all(axis=0)
    return maps


def check_threshold(threshold) -> float:
    """The mangrove threshold as a float in 0..1; NaN, infinities and anything else refused (a NaN threshold
    would call nothing mangrove and write NaN into the results)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN too
        raise ValueError(f"the mangrove threshold must be a number from 0 to 1, got {threshold}")
    return value


def check_prediction(ds, values: np.ndarray, name: str) -> None:
    """A prediction is one band holding a mangrove probability (0-1) or a 0/1 mask: a multi-band raster (the
    Sentinel-2 image given by mistake) or values outside 0-1 (a 1/2 or 0/255 coded mask, reflectance in DN)
    are refused, since thresholding them would score nonsense."""
    if ds.count != 1:
        described = ", ".join(d for d in ds.descriptions if d)
        raise ValueError(f"{name} has {ds.count} bands{f' ({described})' if described else ''}: the prediction must "
                         "be one band, a mangrove probability 0-1 or a 0/1 mask such as predict writes; the "
                         "Sentinel-2 image goes in as the image (for the MVI baseline), not as the prediction")
    finite = values[np.isfinite(values)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        raise ValueError(f"{name} holds values from {finite.min():g} to {finite.max():g}: the prediction must be a "
                         "mangrove probability 0-1 or a 0/1 mask; recode a mask to 1 = mangrove, 0 = other and "
                         "declare its no-data value if it has one")


def pixel_area_ha(ds, name: str) -> Tuple[float, Optional[str]]:
    """One pixel's area in hectares in the raster's own linear unit (metres, US survey feet, ...), and a note
    when that unit is not the metre; geographic coordinates and CRSs without a linear unit are refused."""
    from rasterio.errors import CRSError
    if ds.crs.is_geographic:
        raise ValueError(f"{name} is in geographic coordinates ({ds.crs}); areas need metres: reproject it to a "
                         "projected CRS (e.g. its UTM zone) first")
    try:
        unit, metres = ds.crs.linear_units_factor
    except CRSError:
        raise ValueError(f"the CRS of {name} ({ds.crs}) names no linear unit, so its areas are unknown: reproject "
                         "it to a projected CRS in metres (e.g. its UTM zone) first") from None
    area = abs(ds.transform.determinant) * metres * metres / 10000.0
    note = None if metres == 1.0 else f"{name}'s CRS is in {unit} ({metres:.6g} m): areas converted to hectares"
    return area, note


def assess_rasters(prediction, reference: Optional[str] = None, reference_polygons: Optional[Sequence[Dict]] = None,
                   area_polygons: Optional[Sequence[Dict]] = None, threshold: float = 0.5,
                   name: str = "prediction", image: Optional[str] = None, forest=None) -> List[Assessment]:
    """Score ``prediction`` (probability or 0/1 mask, one band) against a reference mask raster
    (1 = mangrove, 0 = other, soft values: mangrove >= 0.5) or reference polygons, inside ``area_polygons``
    if given.  With ``image`` (the Sentinel-2 raster), the MVI baseline (and the random forest, when one is
    given) are scored on exactly the same pixels.  Inputs that cannot be what they claim (a multi-band
    prediction, a 1/2-coded reference, a threshold outside 0-1) are refused before anything is scored."""
    from ..training.data import check_label_coding
    if (reference is None) == (reference_polygons is None):
        raise ValueError("give exactly one reference: a mask raster or polygons")
    threshold = check_threshold(threshold)
    pred_name = Path(prediction).name
    with rasterio.open(prediction) as pred:
        if pred.crs is None:
            raise ValueError(f"{pred_name} has no coordinate reference system")
        values = pred.read(1, out_dtype="float32", masked=True).filled(np.nan)
        check_prediction(pred, values, pred_name)
        pixel_ha, unit_note = pixel_area_ha(pred, pred_name)
        if reference is not None:
            ref_values = read_on_grid(reference, pred)
            check_label_coding(ref_values, Path(reference).name, "reference")
            ref_valid = np.isfinite(ref_values)
            ref = np.nan_to_num(ref_values) >= 0.5
        else:
            ref = burn_polygons(reference_polygons, pred)
            ref_valid = np.ones_like(ref)
        inside = burn_polygons(area_polygons, pred) if area_polygons else np.ones_like(ref)
        baselines = baseline_maps(image, pred, forest) if image else {}
    counted = np.isfinite(values) & ref_valid & inside & baselines.pop("_valid", True)
    if not counted.any():
        raise ValueError("prediction and reference share no valid pixels (inside the area, if one was given)")
    note = f"{int(counted.sum())} pixels compared" + (f"; {unit_note}" if unit_note else "")
    results = [Assessment(name, Confusion().add(values[counted] >= threshold, ref[counted]), pixel_ha, threshold,
                          [note + f"; mangrove = prediction >= {threshold}"])]
    results[0].best_threshold = best_threshold_here(values[counted], ref[counted])
    if results[0].best_threshold:
        results[0].notes.append(results[0].best_threshold_note())
    labels = {"mvi": f"MVI {MVI_RANGE[0]} <= MVI <= {MVI_RANGE[1]} (Baloloy et al. 2020)",
              "random_forest": forest_label(len(ch.RECIPE_V2.source_bands))}
    for key, mask in baselines.items():
        results.append(Assessment(labels[key], Confusion().add(mask[counted], ref[counted]), pixel_ha, threshold, [note]))
    return results


def best_threshold_here(probability: np.ndarray, reference: np.ndarray) -> Optional[Tuple[float, float]]:
    """(threshold, F1) with the best F1 against ``reference``, or None for a 0/1 mask (no probabilities)."""
    if not np.any((probability > 0) & (probability < 1)):
        return None
    counts = ProbabilityCounts()
    counts.add(probability, reference)
    return counts.best_threshold(*LOCAL_THRESHOLD_RANGE)


def write_table(assessments: Sequence[Assessment], path) -> None:
    """CSV, one row per method: the scores, areas and confusion counts.  Written atomically:
    a full disk raises WriteError and leaves any previous table as it was; an existing file that is not
    a previous table is refused (``files.refuse_replacing``)."""
    import csv
    import io

    from ..files import CSV_TABLE, atomic_write_text
    rows = [a.to_dict() for a in assessments]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue(), kind=CSV_TABLE)


def write_html(assessments: Sequence[Assessment], path, title: str = "ME-Net accuracy assessment") -> None:
    """The HTML report (``html_report``) written atomically, like ``write_table``."""
    from ..files import HTML_REPORT, atomic_write_text
    atomic_write_text(path, html_report(assessments, title), kind=HTML_REPORT)


def html_report(assessments: Sequence[Assessment], title: str = "ME-Net accuracy assessment") -> str:
    """A small self-contained HTML page: scores table, confusion matrices, areas."""
    keys = ["overall_accuracy", "precision", "recall", "f1", "iou", "kappa"]
    rows = []
    for a in assessments:
        s, area = a.scores, a.area_ha()
        rows.append("<tr><th>" + html.escape(a.name) + "</th>" + "".join(f"<td>{s[k]:.4f}</td>" for k in keys) +
                    f"<td>{area['predicted_mangrove_ha']:.1f}</td><td>{area['reference_mangrove_ha']:.1f}</td></tr>")
    confusions = []
    for a in assessments:
        c = a.confusion
        confusions.append(
            f"<h3>{html.escape(a.name)}</h3><table border=1 cellpadding=4><tr><th></th><th>reference mangrove</th>"
            f"<th>reference other</th></tr><tr><th>predicted mangrove</th><td>{c.tp}</td><td>{c.fp}</td></tr>"
            f"<tr><th>predicted other</th><td>{c.fn}</td><td>{c.tn}</td></tr></table>"
            + "".join(f"<p>{html.escape(n)}</p>" for n in a.notes))
    head = "".join(f"<th>{k.replace('_', ' ')}</th>" for k in keys)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h1>{html.escape(title)}</h1><table border=1 cellpadding=4><tr><th>method</th>{head}"
            f"<th>predicted mangrove (ha)</th><th>reference mangrove (ha)</th></tr>{''.join(rows)}</table>"
            f"{''.join(confusions)}<pre>{html.escape(json.dumps([a.to_dict() for a in assessments], indent=1, allow_nan=False))}</pre>"
            "</body></html>")


def compare_on_tiles(bundle, tiles, val_names: Sequence[str], device="cpu", trees: int = 100,
                     seed: int = 0) -> List[Assessment]:
    """ME-Net, MVI and a per-pixel random forest on the same validation windows.

    The forest is trained on the other windows (those the model trained on);
    every method is scored on the valid pixels of the validation windows.
    """
    import torch

    from ..training.train import evaluate
    names = set(val_names)
    val_idx = [i for i, n in enumerate(tiles.names) if n in names]
    train_idx = [i for i, n in enumerate(tiles.names) if n not in names]
    if not val_idx:
        raise ValueError("none of the validation windows recorded in the model are in this tile folder")
    val, train = tiles.subset(val_idx), tiles.subset(train_idx)
    pixel_ha = 0.01  # 10 m Sentinel-2 pixels
    split_note = f"{len(val_idx)} validation windows, {len(train_idx)} training windows (split stored in the model)"
    model_conf = evaluate(bundle, val, torch.device(device))  # at the model's own threshold
    val_bands = val.images.transpose(1, 0, 2, 3)[:, val.valid]
    truth = val.labels[val.valid] >= 0.5
    mvi_conf = Confusion().add(mvi_mangrove(val_bands[1], val_bands[3], val_bands[4]), truth)
    forest = train_random_forest(train.images.transpose(1, 0, 2, 3)[:, train.valid], train.labels[train.valid],
                                 trees, seed)
    rf_conf = Confusion().add(forest.predict(pixel_features(val_bands)), truth)
    return [Assessment("ME-Net", model_conf, pixel_ha, bundle.threshold, notes=[split_note]),
            Assessment(f"MVI {MVI_RANGE[0]} <= MVI <= {MVI_RANGE[1]} (Baloloy et al. 2020)", mvi_conf, pixel_ha),
            Assessment(forest_label(len(val_bands), trees), rf_conf, pixel_ha)]
