"""Evidence for the default window overlap: speed, class flips and validation F1 at 0/32/64 px.

    .venv/bin/python -m studies.overlap_study [--raster scene.tif] [--tiles train/] [--runtime openvino]
        [--overlaps 0,32,64] [--rounds 1] [--json out.json]

Maps the raster with the shipped model at each overlap (interleaved rounds,
one engine in this process), then compares every map with the one at the
reference overlap (64, the old default): windows run, engine seconds, max
|Δp| and % of pixels that change class at 0.5; and scores each map against the
hand-drawn masks of the model's own held-out validation tiles that lie inside
the raster (F1 at 0.5 over their valid pixels).
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import from_bounds

from menet_qgis.core.inference import engine, runtimes
from menet_qgis.core.io import raster_io
from menet_qgis.model_store import default_model_path

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data" / "jambeli"


def validation_pixels(prob_path, tiles: Path, names):
    """(prediction, reference) pixel vectors over the validation tiles inside the map."""
    preds, refs, used = [], [], 0
    with rasterio.open(prob_path) as ds:
        for name in names:
            mask_path = tiles / name.replace("tile_", "mask_")
            with rasterio.open(tiles / name) as tile, rasterio.open(mask_path) as mask:
                b = tile.bounds
                if b.left < ds.bounds.left or b.right > ds.bounds.right or b.bottom < ds.bounds.bottom \
                        or b.top > ds.bounds.top:
                    continue
                win = from_bounds(*b, transform=ds.transform).round_offsets().round_lengths()
                p = ds.read(1, window=win)
                ref = mask.read(1)
            if p.shape != ref.shape:
                continue
            ok = np.isfinite(p) & np.isfinite(ref)
            if ok.sum() == 0:
                continue
            used += 1
            preds.append(p[ok] >= 0.5)
            refs.append(ref[ok] >= 0.5)
    if not preds:
        return None, None, 0
    return np.concatenate(preds), np.concatenate(refs), used


def f1(pred, ref):
    tp = np.sum(pred & ref)
    fp = np.sum(pred & ~ref)
    fn = np.sum(~pred & ref)
    return float(2 * tp / max(2 * tp + fp + fn, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.overlap_study",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raster", default=str(SHARED / "scene_2020.tif"))
    p.add_argument("--tiles", default=str(SHARED / "train"))
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--runtime", default="auto")
    p.add_argument("--overlaps", default="0,32,64", type=lambda t: [int(v) for v in t.split(",")])
    p.add_argument("--reference-overlap", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args(argv)

    raster_io.limit_gdal_cache()
    work = Path(tempfile.mkdtemp(prefix="menet-overlap-"))
    model = runtimes.load_model(a.model, a.runtime, "cpu")
    names = list(getattr(model, "training", {}).get("val_names") or [])
    if not names:
        from menet_qgis.core.model.checkpoint import read_record
        names = list(read_record(Path(a.model))["training"].get("val_names", []))
    seconds = {o: [] for o in a.overlaps}
    results = {}
    for r in range(a.rounds):
        for o in a.overlaps:
            opts = engine.EngineOptions(overlap=o, device="cpu", runtime=a.runtime)
            res = engine.extract(model, raster_io.RasterInput(a.raster), work / f"p{o}_{r}.tif", opts)
            seconds[o].append(res.seconds)
            results[o] = res
            print(f"round {r + 1} overlap {o}: {res.windows_run} windows in {res.seconds:.1f} s", file=sys.stderr)
    with rasterio.open(results[a.reference_overlap].probability) as ds:
        ref_map = ds.read(1)
    rows = []
    for o in a.overlaps:
        with rasterio.open(results[o].probability) as ds:
            m = ds.read(1)
        both = np.isfinite(m) & np.isfinite(ref_map)
        pred, ref, used = validation_pixels(results[o].probability, Path(a.tiles), names)
        rows.append({
            "overlap": o, "windows_run": results[o].windows_run, "engine_s_median": round(statistics.median(seconds[o]), 2),
            "time_vs_reference_per_round": [round(s / r, 3) for s, r in zip(seconds[o], seconds[a.reference_overlap])],
            "max_abs_diff_vs_reference": float(np.abs(m[both] - ref_map[both]).max()),
            "class_flips_pct_vs_reference": round(float(100 * ((m[both] >= 0.5) != (ref_map[both] >= 0.5)).mean()), 4),
            "mangrove_pct": round(float(100 * (m[both] >= 0.5).mean()), 3),
            "validation_f1": None if pred is None else round(f1(pred, ref), 4),
            "validation_tiles_used": used, "validation_pixels": 0 if pred is None else int(pred.size),
        })
    report = {"raster": a.raster, "model": a.model, "runtime": a.runtime, "rounds": a.rounds,
              "reference_overlap": a.reference_overlap, "rows": rows}
    print(json.dumps(report, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
