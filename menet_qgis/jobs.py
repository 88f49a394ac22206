"""The five ME-Net jobs: a JSON-able dict of parameters in, a JSON-able dict out.

The CLI, the engine process the QGIS algorithms start (``engine_process.py``) and
batch runners all call these, so a job behaves the same wherever it runs.
Each job reads its dict into a typed dataclass (``ExtractJob``, ``PrepareJob``,
``ExportChannelsJob``, ``TrainJob``, ``AssessJob``): ``None`` or absent means the
default declared in ``options.py``, values are checked against the declarations
(choices, ranges), the others against their annotation (a path is text, bounds
are four ordered numbers, polygons a list ...), and an unknown key is refused
naming the nearest known one, so a misspelt or mistyped parameter fails in one
line (a ``ValueError``) before anything runs, instead of being ignored or
surfacing as a library's ``TypeError`` deep inside the job.
QGIS-free; the heavy core modules (torch, rasterio) are imported inside each
job, so a missing library surfaces as an ImportError the worker can explain.
Errors are the core's one-line ``ValueError``/``OSError``; a cancelled job
raises ``core.reporting.Cancelled`` and leaves no output.
"""
from __future__ import annotations

import difflib
import math
import os
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

from . import model_store, options as opts
from .core.model.stages import check_window  # stdlib only
from .options import Option

#: Names listed in one message at most (a line stays one readable line whatever a client sends).
_SHOWN = 6


def shown(name) -> str:
    """A name as a message shows it: bare when it is a plain name, else quoted with escapes (one line)."""
    text = str(name)
    return text if text.isidentifier() else repr(text[:60] + ("..." if len(text) > 60 else ""))


def nearest(name, known: Sequence[str]) -> str:
    """' (did you mean dn_offset?)' for the closest known name, or ''."""
    match = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def refuse_unknown(what: str, given, known: Sequence[str]) -> None:
    """A one-line ValueError naming the unknown names in ``given``, each with the nearest known one."""
    unknown = sorted((name for name in given if name not in known), key=str)
    if unknown:
        names = [shown(name) + nearest(name, known) for name in unknown[:_SHOWN]]
        if len(unknown) > _SHOWN:
            names.append(f"and {len(unknown) - _SHOWN} more")
        raise ValueError(f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(names)}; "
                         f"known: {', '.join(known)}")


def _what(value) -> str:
    """A short, one-line description of a received value for a message."""
    if isinstance(value, dict):
        return "an object"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_type(name: str, value, hint):
    """``value`` checked against a field's annotation (str, List[str], List[float], List, Dict, Optional[...]);
    a path given as os.PathLike becomes text.  One-line ValueError naming the parameter otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return check_type(name, value, next(a for a in args if a is not type(None)))
    if hint is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ValueError(f"{name} must be text (a path or a name), got {_what(value)}")
        if "\0" in value:
            raise ValueError(f"{name} must not contain a NUL character")
        return value
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {_what(value)}")
        item = args[0] if args else None
        if item is str:
            return [check_type(f"{name}[{i}]", v, str) for i, v in enumerate(value)]
        if item is float:
            for v in value:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"{name} must be a list of finite numbers, got {_what(value)}")
            return [float(v) for v in value]
        return list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be an object (name: value), got {_what(value)}")
        return value
    return value  # int, float, bool, str choices: declared options, checked by their declaration


def check_bounds(name: str, bounds):
    """[xmin, ymin, xmax, ymax] with xmin < xmax and ymin < ymax, or None."""
    if bounds is None:
        return None
    bounds = check_type(name, bounds, List[float])
    if len(bounds) != 4 or not (bounds[0] < bounds[2] and bounds[1] < bounds[3]):
        raise ValueError(f"{name} must be xmin, ymin, xmax, ymax with xmin < xmax and ymin < ymax, "
                         f"got {_what(bounds)}")
    return bounds


def _default(group: Sequence[Option], name: str):
    """A dataclass field whose default is the declared one (lists as fresh copies)."""
    value = opts.by_name(group, name).default
    if isinstance(value, tuple):
        return field(default_factory=lambda: list(value))
    return field(default=value)


@dataclass
class JobParams:
    """A job's parameters, read from the dict the front ends send."""
    JOB: ClassVar[str] = ""
    #: Declarations that check this job's fields of the same name.
    DECLARED: ClassVar[Tuple[Option, ...]] = ()

    #: Fields that take one value or a list of them (the one value becomes a list of one).
    ONE_OR_LIST: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, params: Optional[Dict]):
        """The typed job, or a one-line ValueError: parameters not an object, an unknown name (with the
        nearest known one), missing required ones (all named), or a value of the wrong type or range."""
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"the {cls.JOB} job's parameters must be an object (name: value), got {_what(params)}")
        params = dict(params or {})
        names = [f.name for f in fields(cls)]
        refuse_unknown(f"{cls.JOB} parameter", params, names)
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
                   and params.get(f.name) is None]
        if missing:
            raise ValueError(f"the {cls.JOB} job needs {', '.join(missing)}")
        declared = {o.name for o in cls.DECLARED}
        hints = typing.get_type_hints(cls)
        for name in [n for n in names if n in params and n not in declared and params[n] is not None]:
            if name in cls.ONE_OR_LIST and isinstance(params[name], (str, os.PathLike)):
                params[name] = [params[name]]
            params[name] = check_type(name, params[name], hints[name])
        job = cls(**{k: v for k, v in params.items() if v is not None})
        job.check()
        return job

    def check(self) -> None:
        """Each declared field converted and checked against its declaration."""
        declared = {o.name: o for o in self.DECLARED}
        for f in fields(self):
            if f.name in declared:
                setattr(self, f.name, declared[f.name].check(getattr(self, f.name)))


_EXTRACT_DECLARED = (opts.MODEL,) + opts.INPUT
#: Engine options the front ends do not show but a job may set (``EngineOptions.readers``).
_ENGINE_INTERNAL = (Option("readers", "int", 0, "reader threads; 0 = automatic", minimum=0, maximum=64,
                           fronts=frozenset()),
                    Option("scl", "text", None, "a scene classification raster (GDAL name) for the input",
                           fronts=frozenset()))


@dataclass
class _RasterThroughModel(JobParams):
    """A raster read the way a model reads it: its bands found by name or number, DN offset applied."""
    DECLARED: ClassVar[Tuple[Option, ...]] = _EXTRACT_DECLARED
    input: str
    output: str
    model: Optional[str] = _default(_EXTRACT_DECLARED, "model")
    bands: Optional[List[int]] = _default(opts.INPUT, "bands")
    dn_offset: Optional[float] = _default(opts.INPUT, "dn_offset")


@dataclass
class ExtractJob(_RasterThroughModel):
    """Mangrove probability (and stage layers) for one raster.  ``options``: ``EngineOptions`` fields by
    name (window, overlap, batch_size, device, stages, stage_mode, ...), passed through to the engine."""
    JOB: ClassVar[str] = "extract"
    bounds: Optional[List[float]] = None    # [xmin, ymin, xmax, ymax] in the input's CRS
    stage_dir: Optional[str] = None         # stage layers go here; None = beside the probability
    options: Dict = field(default_factory=dict)

    def check(self) -> None:
        super().check()
        self.bounds = check_bounds("bounds", self.bounds)
        declared = {o.name: o for o in opts.ENGINE + _ENGINE_INTERNAL}
        refuse_unknown("engine option", self.options, list(declared))
        self.options = {k: declared[k].check(v) for k, v in self.options.items()}
        window, overlap = self.options.get("window"), self.options.get("overlap")
        if window:  # 0/None = the model's window, checked once it is known
            check_window(window, opts.DEFAULT_OVERLAP if overlap is None else overlap)

    def engine_options(self):
        from .core.inference.engine import EngineOptions
        refuse_unknown("engine option", self.options, [f.name for f in fields(EngineOptions)])
        return EngineOptions(**self.options)


@dataclass
class PrepareJob(JobParams):
    """The 6-band 10 m stack of a Sentinel-2 product (``folder``), or the composite of the clear observations of
    two or more dates (``folder`` and/or ``dates``: products or rasters of one area), cut to bounds and/or a
    polygon."""
    JOB: ClassVar[str] = "prepare"
    DECLARED: ClassVar[Tuple[Option, ...]] = opts.PREPARE
    ONE_OR_LIST: ClassVar[Tuple[str, ...]] = ("dates",)
    output: str
    folder: Optional[str] = None
    dates: List[str] = field(default_factory=list)
    bounds: Optional[List[float]] = _default(opts.PREPARE, "bounds")
    bounds_crs: Optional[str] = None        # WKT; None = the product's
    polygon: Optional[Dict] = None          # GeoJSON geometry
    polygon_crs: Optional[str] = None       # WKT; None = the product's
    resampling: str = _default(opts.PREPARE, "resampling")
    composite: str = _default(opts.PREPARE, "composite")
    masks: Optional[List[str]] = _default(opts.PREPARE, "masks")

    def check(self) -> None:
        super().check()
        self.bounds = check_bounds("bounds", self.bounds)
        inputs = self.inputs()
        if not inputs:
            raise ValueError("give a Sentinel-2 product (folder), or two or more dates to composite")
        if self.masks and len(self.masks) != len(inputs):
            raise ValueError(f"{len(self.masks)} mask(s) for {len(inputs)} date(s): give one per date, in the "
                             "order of the dates ('-' for a date without one)")
        if self.masks and len(inputs) == 1:
            raise ValueError("masks apply to composites of two or more dates")

    def inputs(self) -> List[str]:
        """Every date: ``folder`` first, then ``dates``."""
        return ([self.folder] if self.folder else []) + list(self.dates)


@dataclass
class StacMapJob(JobParams):
    """Sentinel-2 L2A over an area and a date range from a STAC API, composited from clear observations and
    mapped like Extract's input (``options``: the engine options, as Extract's)."""
    JOB: ClassVar[str] = "stac_map"
    DECLARED: ClassVar[Tuple[Option, ...]] = (opts.MODEL,) + tuple(o for o in opts.STAC if o.name != "bounds")
    output: str
    bounds: List[float]
    start: str
    end: str
    bounds_crs: str = _default(opts.STAC, "bounds_crs")
    cloud_limit: float = _default(opts.STAC, "cloud_limit")
    max_items: int = _default(opts.STAC, "max_items")
    api_url: str = _default(opts.STAC, "api_url")
    collection: str = _default(opts.STAC, "collection")
    composite: Optional[str] = _default(opts.STAC, "composite")
    model: Optional[str] = _default((opts.MODEL,), "model")
    options: Dict = field(default_factory=dict)

    def check(self) -> None:
        super().check()
        self.bounds = check_bounds("bounds", self.bounds)
        self.extract_job("composite.tif")  # the engine options and the output, checked before any search

    def composite_path(self) -> Path:
        out = Path(self.output)
        return Path(self.composite) if self.composite else out.with_name(f"{out.stem}_composite.tif")

    def extract_job(self, composite: str) -> "ExtractJob":
        return ExtractJob.from_dict({"input": composite, "output": self.output, "model": self.model,
                                     "options": self.options})


@dataclass
class ExportChannelsJob(_RasterThroughModel):
    """The 11 input channels as the model sees them (before normalisation)."""
    JOB: ClassVar[str] = "export_channels"


@dataclass
class TrainJob(JobParams):
    """Training data: tile folders (``tiles``: one or a list, each FOLDER[:name=...]) or rasters (``images``)
    with ``label_raster`` or ``label_polygons`` (one list of GeoJSON geometries per image, in its CRS)."""
    JOB: ClassVar[str] = "train"
    DECLARED: ClassVar[Tuple[Option, ...]] = tuple(o for o in opts.TRAIN if o.name != "tiles")
    ONE_OR_LIST: ClassVar[Tuple[str, ...]] = ("tiles",)
    output: str
    tiles: List[str] = field(default_factory=list)
    images: List[str] = field(default_factory=list)
    label_raster: Optional[str] = None
    label_polygons: Optional[List] = None
    epochs: int = _default(opts.TRAIN, "epochs")
    batch_size: int = _default(opts.TRAIN, "batch_size")
    lr: float = _default(opts.TRAIN, "lr")
    val_fraction: float = _default(opts.TRAIN, "val_fraction")
    seed: int = _default(opts.TRAIN, "seed")
    device: str = _default(opts.TRAIN, "device")
    imagenet_weights: Optional[str] = _default(opts.TRAIN, "imagenet_weights")
    recipe: int = _default(opts.TRAIN, "recipe")
    init_from: Optional[str] = _default(opts.TRAIN, "init_from")
    resume: bool = _default(opts.TRAIN, "resume")
    history: Optional[str] = _default(opts.TRAIN, "history")
    val_groups: List[str] = _default(opts.TRAIN, "val_groups")
    holdout_groups: List[str] = _default(opts.TRAIN, "holdout_groups")
    val_names_from: Optional[str] = _default(opts.TRAIN, "val_names_from")
    threads: int = _default(opts.TRAIN, "threads")
    boundary_weight: float = _default(opts.TRAIN, "boundary_weight")
    refine_width: Optional[int] = _default(opts.TRAIN, "refine_width")
    train_on_clouds: bool = _default(opts.TRAIN, "train_on_clouds")

    def check(self) -> None:
        super().check()  # declared options converted first: the checks below read them
        if Path(self.output).suffix != ".pt":
            raise ValueError(f"the model file {_what(Path(self.output).name)} must end in .pt")
        if not float(self.boundary_weight) >= 0:  # NaN too
            raise ValueError(f"boundary weight must be 0 (off) or positive, got {float(self.boundary_weight):g}")
        if self.refine_width is not None and not 0 <= int(self.refine_width) <= 256:
            raise ValueError(f"refinement width must be 0 (none) to 256, got {self.refine_width}")
        if self.tiles and self.images:
            raise ValueError("give either tile folders or rasters with labels, not both")
        if not self.tiles and not self.images:
            raise ValueError("no training data: give a tile folder, or rasters with labels")
        if self.images and (self.label_raster is None) == (self.label_polygons is None):
            raise ValueError("with rasters, give the labels as a mask raster or as polygons")


@dataclass
class AssessJob(JobParams):
    """A map (``prediction``) against ``reference`` (raster path), ``reference_file`` (polygon file) or
    ``reference_polygons`` (GeoJSON list in the prediction's CRS), inside ``area_file``/``area_polygons``;
    or, without a prediction, ``model`` on the validation windows it records from ``tiles``."""
    JOB: ClassVar[str] = "assess"
    DECLARED: ClassVar[Tuple[Option, ...]] = opts.ASSESS
    prediction: Optional[str] = None
    reference: Optional[str] = _default(opts.ASSESS, "reference")
    reference_file: Optional[str] = None
    reference_polygons: Optional[List] = None
    area_file: Optional[str] = _default(opts.ASSESS, "area_file")
    area_polygons: Optional[List] = None
    threshold: Optional[float] = _default(opts.ASSESS, "threshold")
    name: Optional[str] = None              # the map's name in the results; None = its file name
    image: Optional[str] = _default(opts.ASSESS, "image")
    tiles: Optional[str] = _default(opts.ASSESS, "tiles")
    model: Optional[str] = _default(opts.ASSESS, "model")
    report: Optional[str] = _default(opts.ASSESS, "report")
    table: Optional[str] = _default(opts.ASSESS, "table")

    def check(self) -> None:
        super().check()
        if self.prediction:
            if self.reference is None and self.reference_file is None and self.reference_polygons is None:
                raise ValueError("give a reference: a mask raster or polygons")
            if self.tiles and not self.image:
                raise ValueError("the random-forest baseline (tile folder) needs the Sentinel-2 raster (image) too")
        elif not self.tiles:
            raise ValueError("give a prediction raster, or a tile folder and a model to score the model on its "
                             "validation split")


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
        model = runtimes.load_model(path, runtime, device, stages, reporter)  # exports a .pt for an ONNX runtime
        runtimes.check_model_fits(model, runtime, device, stages)
        _MODEL_CACHE[key] = model
        if reporter is not None:
            reporter.info(f"model {Path(path).name} loaded in {time.perf_counter() - started:.1f} s")
    return _MODEL_CACHE[key]


def recorded_recipe(path: Path):
    """The channel recipe a model file records, read without loading its weights (standard library), so an
    input is checked against it before any load or ONNX export; None when the record cannot be read
    (loading the model then says why)."""
    from . import model_records
    from .core.model import channels
    try:
        return channels.recipe_for(model_records.read_model_record(path).get("recipe", {}))
    except (OSError, ValueError):
        return None


def extract(params: Dict, reporter) -> Dict:
    """Mangrove probability (and stage layers) for one raster."""
    from .core.inference import engine
    from .core.io import raster_io
    job = ExtractJob.from_dict(params)
    options = job.engine_options()
    raster_io.check_input_exists(str(job.input))
    model_path = resolve_model(job.model, options.runtime, options.device, reporter)
    # The model's channel recipe says which bands to look for in the input: checked before the model loads.
    source = raster_io.RasterInput(job.input, band_numbers=job.bands, dn_offset=job.dn_offset,
                                   bounds=tuple(job.bounds) if job.bounds else None,
                                   recipe=recorded_recipe(model_path))
    bundle = load_model(model_path, reporter, options.runtime, options.device, options.stages)
    outdated = model_store.outdated_copy_note(model_path)
    if outdated:
        reporter.warn(outdated)
    if not bundle.trained:
        reporter.warn(f"model {model_path.name} is UNTRAINED (random weights): the probability is meaningless; "
                      "use it only to test the pipeline")
    result = engine.extract(bundle, source, job.output, options, reporter, job.stage_dir)
    return {"probability": str(result.probability), "stages": {k: str(v) for k, v in result.stages.items()},
            "device": result.device, "windows": result.windows, "windows_run": result.windows_run,
            "batch_size": result.batch_size, "seconds": round(result.seconds, 2), "trained": bundle.trained,
            "threshold": bundle.threshold, "quality": str(result.quality) if result.quality else None,
            "masked": result.masked_summary, "masked_pixels": result.masked_pixels}


def prepare(params: Dict, reporter) -> Dict:
    """The 6-band 10 m stack of a Sentinel-2 product, or the composite of several dates' clear observations."""
    from rasterio.warp import transform_bounds, transform_geom

    job = PrepareJob.from_dict(params)
    if len(job.inputs()) > 1:
        return prepare_composite(job, reporter)
    from .core.io import sentinel2_product, stack
    job.folder = job.inputs()[0]
    product = sentinel2_product.open_product(job.folder)
    bounds, polygon = job.bounds, job.polygon
    if bounds and job.bounds_crs:
        bounds = transform_bounds(job.bounds_crs, product.crs, *bounds)
    if polygon and job.polygon_crs:
        polygon = transform_geom(job.polygon_crs, product.crs, polygon)
    result = stack.build_stack(job.folder, job.output, bounds=bounds, polygon_geojson=polygon,
                               resampling=job.resampling, reporter=reporter)
    reporter.info(f"wrote {result.width} x {result.height} px, bands B2, B3, B4, B8, B11, B12 to {result.path}")
    return {"stack": str(result.path), "width": result.width, "height": result.height,
            "product": result.product.describe()}


def stac_map(params: Dict, reporter) -> Dict:
    """Search a STAC API for Sentinel-2 L2A over an area and dates, read only the area's windows of the COGs,
    composite the clear observations (SCL) and map the composite through ``extract``."""
    from collections import Counter

    import numpy as np
    from rasterio.warp import transform_bounds

    from .core import files
    from .core.io import clouds, composite as compositing, raster_io, stac_search
    job = StacMapJob.from_dict(params)
    composite_path = job.composite_path()
    if composite_path.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"the composite {_what(composite_path.name)} must end in .tif")
    if composite_path.resolve() == Path(job.output).resolve():
        raise ValueError("the composite and the probability must be two files")
    raster_io.check_writable(job.output)
    raster_io.check_writable(composite_path)
    files.refuse_overwriting_inputs([job.output, composite_path], [job.model])
    try:
        bbox = transform_bounds(job.bounds_crs, "EPSG:4326", *job.bounds, densify_pts=21)
    except Exception as exc:  # rasterio raises CRSError and others for a bad CRS
        raise ValueError(f"bounds CRS {_what(job.bounds_crs)} is not one GDAL knows ({' '.join(str(exc).split())[:120]})") \
            from None
    items, document = stac_search.search(job.api_url, bbox, job.start, job.end, job.cloud_limit, job.collection,
                                         job.max_items, reporter.info)
    assets = [stac_search.item_assets(item, document) for item in items]
    reporter.info(f"{len(assets)} scene(s) from {job.api_url}: " + ", ".join(
        f"{a.id} ({a.cloud:g} % cloud)" for a in assets))
    crss = [stac_search.item_crs(a) for a in assets]  # the CRS most scenes are in (their UTM zone)
    common = Counter(str(c) for c in crss).most_common(1)[0][0]
    crs = next(c for c in crss if str(c) == common)
    grid = stac_search.area_grid(job.bounds, job.bounds_crs, crs)
    reporter.info(f"reading {grid.width} x {grid.height} px at 10 m ({crs}) from each scene: the windows only")
    observations = stac_search.read_observations(assets, grid, log=reporter.info, cancelled=reporter.cancelled)
    for obs in observations:  # what each date loses to its SCL
        counts = clouds.code_counts(obs.quality)
        lost = [f"{n / obs.quality.size:.1%} {clouds.QUALITY_NAMES.get(code, code)}"
                for code, n in sorted(counts.items()) if code != clouds.CLEAR and n]
        reporter.info(f"{obs.day}: " + (", ".join(lost) + ": left out of the composite" if lost else "clear everywhere"))
    stack, count = compositing.clear_composite([(o.reflectance, o.quality) for o in observations])
    never = float((count == 0).mean())
    if never == 1.0:
        raise ValueError(f"no pixel of the area is clear on any of the {len(observations)} date(s): widen the "
                         "dates or raise the cloud limit")
    reporter.info(f"composite of {len(observations)} date(s): median {float(np.median(count)):g} clear observations "
                  f"per pixel, {never:.1%} of the area never clear (no data in the map)")
    tags = {"MENET_STAC_API": job.api_url, "MENET_STAC_ITEMS": ",".join(a.id for a in assets),
            "MENET_STAC_DATES": ",".join(str(o.day) for o in observations)}
    out = raster_io.AtomicRaster(composite_path, grid.width, grid.height, len(stac_search.BANDS) + 1, grid.crs,
                                 grid.transform, descriptions=list(stac_search.BANDS) + ["clear observations"],
                                 tags=tags)
    try:
        out.write_rows(0, np.concatenate([stack, count[None].astype(np.float32)]))
        out.commit()
    except BaseException:
        out.discard()
        raise
    try:
        result = extract({"input": str(composite_path), "output": job.output, "model": job.model,
                          "options": job.options}, reporter)
    except BaseException:
        composite_path.unlink(missing_ok=True)
        raise
    return {**result, "composite": str(composite_path), "items": [a.id for a in assets],
            "dates": [str(o.day) for o in observations], "never_clear": round(never, 4)}


def prepare_composite(job: PrepareJob, reporter) -> Dict:
    """The composite of the clear observations of ``job``'s dates on the first date's grid (core/io/composite.py)."""
    import tempfile

    import rasterio
    from rasterio.warp import transform_bounds, transform_geom

    from .core.io import composite
    inputs, masks = job.inputs(), job.masks or [None] * len(job.inputs())
    with tempfile.TemporaryDirectory(prefix="menet-composite-") as workdir:
        dates = [composite.date_input(name, mask, workdir, i) for i, (name, mask) in enumerate(zip(inputs, masks), 1)]
        with rasterio.open(dates[0].raster) as first:
            crs = first.crs
        bounds, polygon = job.bounds, job.polygon
        if bounds and job.bounds_crs:
            bounds = transform_bounds(job.bounds_crs, crs, *bounds)
        if polygon and job.polygon_crs:
            polygon = transform_geom(job.polygon_crs, crs, polygon)
        result = composite.write_composite(dates, job.output, method=job.composite, bounds=bounds,
                                           polygon_geojson=polygon, reporter=reporter)
    reporter.info(f"wrote {result.width} x {result.height} px, bands B2, B3, B4, B8, B11, B12 and "
                  f"{composite.COUNT_BAND} to {result.path}")
    return {"stack": str(result.path), "width": result.width, "height": result.height, "dates": result.dates,
            "composite": result.method, "clear_count_pixels": result.count_histogram,
            "masked_shares": [round(v, 4) for v in result.masked_shares], "seconds": round(result.seconds, 2),
            "product": result.describe()}


def export_channels(params: Dict, reporter) -> Dict:
    """The 11 input channels as the model sees them (before normalisation)."""
    from .core.io import stack
    job = ExportChannelsJob.from_dict(params)
    # Only the model's PCA basis and recipe are read: the .onnx first (no torch needed).
    model_path = resolve_model(job.model, device="cpu", reporter=reporter)
    if not model_path.is_file():
        raise ValueError(f"model file not found: {model_path}")
    if model_path.suffix.lower() == ".onnx":
        from .core.inference.runtimes import read_onnx_model
        model = read_onnx_model(model_path)
        pca, recipe = model.pca, model.recipe
    else:
        from .core.model import checkpoint
        pca, recipe = checkpoint.read_pca(model_path), checkpoint.read_recipe(model_path)
    path = stack.export_channels(job.input, job.output, pca, job.bands, job.dn_offset, reporter, recipe)
    return {"output": str(path)}


def train(params: Dict, reporter) -> Dict:
    """Train ME-Net; the checkpoint appears at ``output`` only when training has finished."""
    from .core import files
    from .core.model import channels
    from .core.model.checkpoint import read_record, save
    from .core.training import data as training_data, train as training
    job = TrainJob.from_dict(params)
    out, recipe = Path(job.output), channels.RECIPES[job.recipe]
    specs = [training_data.SourceSpec.parse(t) for t in job.tiles]
    for spec in specs:
        if not Path(spec.folder).is_dir():
            raise ValueError(f"tile folder not found: {spec.folder}")
    inputs = [p for spec in specs for p in Path(spec.folder).glob("*") if p.is_file()] + job.images
    files.refuse_overwriting_inputs([out, job.history],
                                        inputs + [job.label_raster, job.imagenet_weights, job.init_from])
    files.refuse_replacing(job.history, files.JSON_HISTORY)  # before training, not after hours of it
    if specs:
        tiles = training_data.TileSet.concat([training_data.load_tile_folder(spec.folder, recipe=recipe, spec=spec,
                                                                   log=reporter.info, ignore_clouds=not job.train_on_clouds)
                                              for spec in specs])
    else:
        tiles = training_data.load_raster_labels(job.images, job.label_raster, job.label_polygons, recipe=recipe,
                                                 ignore_clouds=not job.train_on_clouds, log=reporter.info)
    reporter.info(f"{len(tiles)} labelled windows of {tiles.images.shape[-1]} px")
    val_names = []
    if job.val_names_from:
        val_names = list(read_record(Path(job.val_names_from)).get("training", {}).get("val_names", []))
        reporter.info(f"validation windows: the {len(val_names)} of {Path(job.val_names_from).name} "
                      "where their source has them")
    # The best-so-far checkpoint goes to a hidden file that becomes the output only at the end; the resume
    # state (after every epoch) stays until the run has finished, so a stopped run continues with resume.
    best_so_far = files.best_so_far_path(out)
    resume_state = out.parent / f".{out.name}.resume"
    for path in (out, best_so_far, resume_state):
        for stale in files.remove_stale_partials(path):
            reporter.info(f"removed {stale.name}: a partial file left by a run that no longer exists")
    if resume_state.exists() and not job.resume:
        resume_state.unlink()
    options = training.TrainOptions(
        epochs=job.epochs, batch_size=job.batch_size, lr=job.lr, val_fraction=job.val_fraction, seed=job.seed,
        device=job.device, imagenet_weights=job.imagenet_weights, save_best_to=str(best_so_far), recipe=recipe,
        init_from=job.init_from, resume_state=str(resume_state), val_groups=job.val_groups,
        holdout_groups=job.holdout_groups, val_names=val_names, threads=job.threads,
        boundary_weight=job.boundary_weight, refine_width=job.refine_width, train_on_clouds=job.train_on_clouds)
    try:
        result = training.train(tiles, options, reporter)
        save(result.bundle, out, half=True)
    finally:
        best_so_far.unlink(missing_ok=True)
    resume_state.unlink(missing_ok=True)
    if job.history:
        training.write_history(result.history, job.history)
    reporter.info(f"model written to {out}")
    return {"checkpoint": str(out), "best": result.best, "windows": len(tiles),
            "threshold": result.bundle.threshold}


def assess(params: Dict, reporter) -> Dict:
    """Accuracy of a map against a reference (next to MVI and a random forest), or of a model
    on the validation windows it records."""
    from .core.evaluation import assessment
    from .core import files
    from .core.io import polygons as polygons_io
    job = AssessJob.from_dict(params)
    files.refuse_overwriting_inputs([job.report, job.table], [job.prediction, job.reference, job.reference_file,
                                                                  job.area_file, job.image, job.model])
    files.refuse_replacing(job.report, files.HTML_REPORT)
    files.refuse_replacing(job.table, files.CSV_TABLE)
    if job.prediction:
        import rasterio
        with rasterio.open(job.prediction) as ds:
            crs = ds.crs
        read = polygons_io.read_polygons
        polygons = read(job.reference_file, crs) if job.reference_file else job.reference_polygons
        area = read(job.area_file, crs) if job.area_file else job.area_polygons
        forest = None
        if job.tiles:
            reporter.info("training the random-forest baseline on the tile folder")
            forest = assessment.forest_from_tiles(job.tiles)
        results = assessment.assess_rasters(
            job.prediction, reference=job.reference, reference_polygons=polygons, area_polygons=area,
            threshold=prediction_threshold(job.prediction, job.threshold, reporter),
            name=job.name or Path(job.prediction).name, image=job.image, forest=forest)
    else:
        from .core.training import data as training_data
        # The checkpoint: it records its validation windows (an .onnx export does not).
        model_path = resolve_model(job.model, runtime="torch", reporter=reporter)
        bundle = load_model(model_path)
        names = bundle.training.get("val_names")
        if not names:
            raise ValueError(f"{model_path.name} records no validation windows")
        tiles = training_data.load_tile_folder(job.tiles, recipe=bundle.recipe)
        results = assessment.compare_on_tiles(bundle, tiles, names)
    rows = [r.to_dict() for r in results]
    for result, row in zip(results, rows):
        reporter.info(f"{row['name']}: F1 {row['f1']:.4f}, IoU {row['iou']:.4f}, kappa {row['kappa']:.4f}, "
                      f"OA {row['overall_accuracy']:.4f}")
        if result.best_threshold:
            reporter.info(f"{row['name']}: {result.best_threshold_note()}")
    if job.report:
        assessment.write_html(results, job.report)
    if job.table:
        assessment.write_table(results, job.table)
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
    if not 0.0 <= value <= 1.0:  # NaN too
        raise ValueError(f"{Path(prediction).name} carries the model threshold {stored} ({THRESHOLD_TAG}), not a "
                         "number from 0 to 1: give the mangrove threshold explicitly")
    reporter.info(f"mangrove = prediction >= {value:g}: the threshold of the model that made it ({THRESHOLD_TAG})")
    return value


JOBS: Dict[str, Callable[[Dict, object], Dict]] = {
    "extract": extract, "prepare": prepare, "export_channels": export_channels, "train": train, "assess": assess,
    "stac_map": stac_map}


def run(name: str, params: Dict, reporter) -> Dict:
    if not isinstance(name, str) or name not in JOBS:
        hint = nearest(name, list(JOBS)) if isinstance(name, str) else ""
        raise ValueError(f"unknown job {_what(name)}{hint}; jobs: {', '.join(JOBS)}")
    return JOBS[name](params, reporter)
