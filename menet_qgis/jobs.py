"""The five ME-Net jobs as plain functions: a JSON-able dict of parameters in, a JSON-able dict out.

The CLI, the worker process the QGIS algorithms start (``engine_process.py``) and
batch runners all call these, so a job behaves the same wherever it runs.
QGIS-free; the heavy core modules (torch, rasterio) are imported inside each
job, so a missing library surfaces as an ImportError the worker can explain.
Errors are the core's one-line ``ValueError``/``OSError``; a cancelled job
raises ``core.reporting.Cancelled`` and leaves no output.

Parameters (``None`` or absent = default):

* ``extract``: input, output, model, bands (six band numbers), dn_offset,
  bounds [xmin, ymin, xmax, ymax] in the input's CRS, stage_dir, options
  (``EngineOptions`` fields by name: window, overlap, batch_size, device,
  stages, stage_mode, ... — passed through, so new engine options need no
  change here).
* ``prepare``: folder, output, bounds + bounds_crs (WKT), polygon (GeoJSON
  geometry) + polygon_crs (WKT), resampling.
* ``export_channels``: input, output, model, bands, dn_offset.
* ``train``: tiles (folder) or images (paths) with label_raster or
  label_polygons (one list of GeoJSON geometries per image, in its CRS);
  output (.pt), epochs, batch_size, lr, val_fraction, seed, device,
  imagenet_weights, history (JSON path).
* ``assess``: prediction with reference (raster path) / reference_file
  (polygon file) / reference_polygons (GeoJSON list in the prediction's CRS),
  area_file / area_polygons, threshold, name, image, tiles; or tiles + model
  without a prediction (the model on its own validation windows); report
  (HTML path), table (CSV path).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from . import model_store

#: The last checkpoint loaded: (path, mtime, size) -> bundle, so several inputs share one load.
_MODEL_CACHE: Dict[Tuple[str, int, int], object] = {}


def resolve_model(path: Optional[str], runtime: str = "auto", device: str = "auto", reporter=None) -> Path:
    """The given model, else the default one: THE function every front end (Extract and the example
    graphical model through the worker, Export channels, Assess, the CLI's predict/export/batch) resolves
    MODEL through.  The default comes from the model store the process was pointed at (MENET_HOME, which
    the QGIS side sets for its engine) by the rule in ``model_store.find_default_model``."""
    if path:
        return Path(path)
    found = model_store.find_default_model(runtime, device)
    if found is None:
        raise ValueError(model_store.no_default_model_message())
    if reporter is not None:
        reporter.info(f"default model: {found.why}")
    return found.path


def load_model(path: Path, reporter=None, runtime: str = "torch", device: str = "auto", stages=()):
    """The model for ``runtime`` (a torch checkpoint, or an exported ONNX model: see core/inference/runtimes.py),
    loaded once per file version and runtime (the worker may run several jobs on one model)."""
    import time

    from .core.inference import runtimes
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"model file not found: {path}") from None
    key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, runtime, device, tuple(stages))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        started = time.perf_counter()
        model = runtimes.load_model(path, runtime, device, stages)
        runtimes.check_model_fits(model, runtime, device, stages)
        _MODEL_CACHE[key] = model
        if reporter is not None:
            reporter.info(f"model {Path(path).name} loaded in {time.perf_counter() - started:.1f} s")
    return _MODEL_CACHE[key]


def extract(params: Dict, reporter) -> Dict:
    """Mangrove probability (and stage layers) for one raster."""
    from .core.inference import engine
    from .core.io import raster_io
    options = engine.EngineOptions(**(params.get("options") or {}))
    bounds = params.get("bounds")
    raster_io.check_input_exists(str(params["input"]))
    model_path = resolve_model(params.get("model"), options.runtime, options.device, reporter)
    bundle = load_model(model_path, reporter, options.runtime, options.device, options.stages)
    # The model's channel recipe says which bands to look for in the input.
    source = raster_io.RasterInput(params["input"], band_numbers=params.get("bands"), dn_offset=params.get("dn_offset"),
                                   bounds=tuple(bounds) if bounds else None, recipe=bundle.recipe)
    outdated = model_store.outdated_copy_note(model_path)
    if outdated:
        reporter.warn(outdated)
    if not bundle.trained:
        reporter.warn(f"model {model_path.name} is UNTRAINED (random weights): the probability is meaningless; "
                      "use it only to test the pipeline")
    result = engine.extract(bundle, source, params["output"], options, reporter, params.get("stage_dir"))
    return {"probability": str(result.probability), "stages": {k: str(v) for k, v in result.stages.items()},
            "device": result.device, "windows": result.windows, "windows_run": result.windows_run,
            "batch_size": result.batch_size, "seconds": round(result.seconds, 2), "trained": bundle.trained,
            "threshold": bundle.threshold}


def prepare(params: Dict, reporter) -> Dict:
    """The 6-band 10 m stack of an unzipped Sentinel-2 product."""
    from rasterio.warp import transform_bounds, transform_geom

    from .core.io import sentinel2_product
    product = sentinel2_product.find_product(params["folder"])
    bounds, polygon = params.get("bounds"), params.get("polygon")
    if bounds and params.get("bounds_crs"):
        bounds = transform_bounds(params["bounds_crs"], product.crs, *bounds)
    if polygon and params.get("polygon_crs"):
        polygon = transform_geom(params["polygon_crs"], product.crs, polygon)
    result = sentinel2_product.build_stack(params["folder"], params["output"], bounds=bounds, polygon_geojson=polygon,
                                           resampling=params.get("resampling") or "bilinear", reporter=reporter)
    reporter.info(f"wrote {result.width} x {result.height} px, bands B2, B3, B4, B8, B11, B12 to {result.path}")
    return {"stack": str(result.path), "width": result.width, "height": result.height,
            "product": result.product.describe()}


def export_channels(params: Dict, reporter) -> Dict:
    """The 11 input channels as the model sees them (before normalisation)."""
    from .core.io import sentinel2_product
    # Only the model's PCA basis and recipe are read: the .onnx first (no torch needed).
    model_path = resolve_model(params.get("model"), device="cpu", reporter=reporter)
    if not model_path.is_file():
        raise ValueError(f"model file not found: {model_path}")
    if model_path.suffix.lower() == ".onnx":
        from .core.inference.runtimes import read_onnx_model
        model = read_onnx_model(model_path)
        pca, recipe = model.pca, model.recipe
    else:
        from .core.model import checkpoint
        pca, recipe = checkpoint.read_pca(model_path), checkpoint.read_recipe(model_path)
    path = sentinel2_product.export_channels(params["input"], params["output"], pca, params.get("bands"),
                                             params.get("dn_offset"), reporter, recipe)
    return {"output": str(path)}


def train(params: Dict, reporter) -> Dict:
    """Train ME-Net; the checkpoint appears at ``output`` only when training has finished."""
    from .core.io import raster_io
    from .core.training import train as training
    from .core.model.checkpoint import save
    out = Path(params["output"])
    if out.suffix != ".pt":
        raise ValueError(f"the model file {out.name} must end in .pt")
    from .core.model import channels
    tiles_arg, images = params.get("tiles"), params.get("images")
    if tiles_arg and images:
        raise ValueError("give either tile folders or rasters with labels, not both")
    specs = [training.SourceSpec.parse(t) for t in ([tiles_arg] if isinstance(tiles_arg, str) else tiles_arg or [])]
    for spec in specs:
        if not Path(spec.folder).is_dir():
            raise ValueError(f"tile folder not found: {spec.folder}")
    boundary_weight = float(params.get("boundary_weight") or 0.0)
    if not boundary_weight >= 0:  # NaN too
        raise ValueError(f"boundary weight must be 0 (off) or positive, got {boundary_weight:g}")
    refine_width = params.get("refine_width")
    if refine_width is not None and not 0 <= int(refine_width) <= 256:
        raise ValueError(f"refinement width must be 0 (none) to 256, got {refine_width}")
    version = int(params.get("recipe") or channels.DEFAULT_RECIPE.version)
    if version not in channels.RECIPES:
        raise ValueError(f"unknown channel recipe version {version}; known: {', '.join(map(str, channels.RECIPES))}")
    recipe = channels.RECIPES[version]
    inputs = ([p for spec in specs for p in Path(spec.folder).glob("*") if p.is_file()] + list(images or []))
    raster_io.refuse_overwriting_inputs([out, params.get("history")],
                                        inputs + [params.get("label_raster"), params.get("imagenet_weights"),
                                                  params.get("init_from")])
    if specs:
        tiles = training.TileSet.concat([training.load_tile_folder(spec.folder, recipe=recipe, spec=spec,
                                                                   log=reporter.info) for spec in specs])
    elif images:
        label_raster, polygons = params.get("label_raster"), params.get("label_polygons")
        if (label_raster is None) == (polygons is None):
            raise ValueError("with rasters, give the labels as a mask raster or as polygons")
        tiles = training.load_raster_labels(images, label_raster, polygons, recipe=recipe)
    else:
        raise ValueError("no training data: give a tile folder, or rasters with labels")
    reporter.info(f"{len(tiles)} labelled windows of {tiles.images.shape[-1]} px")
    val_names = []
    if params.get("val_names_from"):
        from .core.model.checkpoint import read_record
        val_names = list(read_record(Path(params["val_names_from"])).get("training", {}).get("val_names", []))
        reporter.info(f"validation windows: the {len(val_names)} of {Path(params['val_names_from']).name} "
                      "where their source has them")
    # The best-so-far checkpoint goes to a hidden file that becomes the output only at the end; the resume
    # state (after every epoch) stays until the run has finished, so a stopped run continues with resume.
    best_so_far = out.parent / f".{out.name}.best-so-far"
    resume_state = out.parent / f".{out.name}.resume"
    for path in (out, best_so_far, resume_state):
        for stale in raster_io.remove_stale_partials(path):
            reporter.info(f"removed {stale.name}: a partial file left by a run that no longer exists")
    if resume_state.exists() and not params.get("resume"):
        resume_state.unlink()
    options = training.TrainOptions(
        epochs=int(params.get("epochs") or 30), batch_size=int(params.get("batch_size") or 8),
        lr=float(params.get("lr") or 1e-3), val_fraction=float(params.get("val_fraction") or 0.2),
        seed=int(params.get("seed") or 0), device=params.get("device") or "auto",
        imagenet_weights=params.get("imagenet_weights") or None, save_best_to=str(best_so_far), recipe=recipe,
        init_from=params.get("init_from") or None, resume_state=str(resume_state),
        val_groups=list(params.get("val_groups") or []), holdout_groups=list(params.get("holdout_groups") or []),
        val_names=val_names, threads=int(params.get("threads") or 0),
        boundary_weight=boundary_weight, refine_width=None if refine_width is None else int(refine_width))
    try:
        result = training.train(tiles, options, reporter)
        save(result.bundle, out, half=True)
    finally:
        best_so_far.unlink(missing_ok=True)
    resume_state.unlink(missing_ok=True)
    if params.get("history"):
        raster_io.atomic_write_text(params["history"], json.dumps(result.history, indent=2))
    reporter.info(f"model written to {out}")
    return {"checkpoint": str(out), "best": result.best, "windows": len(tiles),
            "threshold": result.bundle.threshold}


def assess(params: Dict, reporter) -> Dict:
    """Accuracy of a map against a reference (next to MVI and a random forest), or of a model
    on the validation windows it records."""
    from .core.evaluation import assessment
    from .core.io import polygons as polygons_io, raster_io
    prediction = params.get("prediction")
    raster_io.refuse_overwriting_inputs(
        [params.get("report"), params.get("table")],
        [prediction, params.get("reference"), params.get("reference_file"), params.get("area_file"),
         params.get("image"), params.get("model")])
    if prediction:
        import rasterio
        with rasterio.open(prediction) as ds:
            crs = ds.crs
        reference, polygons = params.get("reference"), params.get("reference_polygons")
        if params.get("reference_file"):
            polygons = polygons_io.read_polygons(params["reference_file"], crs)
        area = params.get("area_polygons")
        if params.get("area_file"):
            area = polygons_io.read_polygons(params["area_file"], crs)
        if reference is None and polygons is None:
            raise ValueError("give a reference: a mask raster or polygons")
        if params.get("tiles") and not params.get("image"):
            raise ValueError("the random-forest baseline (tile folder) needs the Sentinel-2 raster (image) too")
        forest = None
        if params.get("tiles"):
            reporter.info("training the random-forest baseline on the tile folder")
            forest = assessment.forest_from_tiles(params["tiles"])
        results = assessment.assess_rasters(
            prediction, reference=reference, reference_polygons=polygons, area_polygons=area,
            threshold=prediction_threshold(prediction, params.get("threshold"), reporter), name=params.get("name") or Path(prediction).name,
            image=params.get("image"), forest=forest)
    else:
        if not params.get("tiles"):
            raise ValueError("give a prediction raster, or a tile folder and a model to score the model on its "
                             "validation split")
        from .core.training import train as training
        # The checkpoint: it records its validation windows (an .onnx export does not).
        model_path = resolve_model(params.get("model"), runtime="torch", reporter=reporter)
        bundle = load_model(model_path)
        names = bundle.training.get("val_names")
        if not names:
            raise ValueError(f"{model_path.name} records no validation windows")
        tiles = training.load_tile_folder(params["tiles"], recipe=bundle.recipe)
        results = assessment.compare_on_tiles(bundle, tiles, names)
    rows = [r.to_dict() for r in results]
    for result, row in zip(results, rows):
        reporter.info(f"{row['name']}: F1 {row['f1']:.4f}, IoU {row['iou']:.4f}, kappa {row['kappa']:.4f}, "
                      f"OA {row['overall_accuracy']:.4f}")
        if result.best_threshold:
            reporter.info(f"{row['name']}: {result.best_threshold_note()}")
    if params.get("report"):
        assessment.write_html(results, params["report"])
    if params.get("table"):
        assessment.write_table(results, params["table"])
    return {"results": rows}


def prediction_threshold(prediction, given: Optional[float], reporter) -> float:
    """The threshold to call mangrove in ``prediction``: the one given, else the model's own that the
    probability carries (``MENET_THRESHOLD``, written by extract), else 0.5."""
    if given is not None:
        return float(given)
    import rasterio

    from .core.inference.engine import THRESHOLD_TAG
    with rasterio.open(prediction) as ds:
        stored = ds.tags().get(THRESHOLD_TAG)
    try:
        value = float(stored)
    except (TypeError, ValueError):
        reporter.info(f"mangrove = prediction >= 0.5 ({Path(prediction).name} carries no model threshold)")
        return 0.5
    reporter.info(f"mangrove = prediction >= {value:g}: the threshold of the model that made it ({THRESHOLD_TAG})")
    return value


JOBS: Dict[str, Callable[[Dict, object], Dict]] = {
    "extract": extract, "prepare": prepare, "export_channels": export_channels, "train": train, "assess": assess}


def run(name: str, params: Dict, reporter) -> Dict:
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; jobs: {', '.join(JOBS)}")
    return JOBS[name](params, reporter)
