"""Every user-facing option, declared once: name, kind, default, choices, help and which front ends show it.

The command line (``cli.py``, through ``add_arguments``), the Processing dialogs
(``processing/parameters.py``) and the typed job parameters (``jobs.py``) are
generated from these declarations, so a default, a choice list or a help text
cannot drift between them.  Standard library only: QGIS imports it.

Help texts say what an option does in words; measured numbers live in docs/
(the help points there) so they are kept up to date in one place.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .core.model.stages import MAX_WINDOW, STAGES, STAGE_NAMES  # stdlib only

FRONTS = frozenset({"cli", "processing", "batch"})
CLI_ONLY = frozenset({"cli"})
CLI_AND_DIALOG = frozenset({"cli", "processing"})
KINDS = ("int", "float", "bool", "choice", "multichoice", "text", "file", "folder", "int_list", "float_list",
         "text_list")


@dataclass(frozen=True)
class Option:
    name: str                 # the job/engine field name: "overlap", "batch_size", "stage_mode"
    kind: str                 # one of KINDS
    default: object           # the ONE default (None = unset / automatic)
    help: str                 # one or two sentences; no study numbers (point at docs/ instead)
    label: str = ""           # Processing dialog label
    choices: tuple = ()       # choice / multichoice: the values the job receives
    choice_labels: tuple = ()  # optional dialog labels for the choices (same length)
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    fronts: frozenset = FRONTS  # which front ends show it: "cli", "processing", "batch"
    advanced: bool = False    # Processing: in the "Advanced parameters" group
    optional: bool = False    # Processing: may be left empty
    flag: str = ""            # CLI flag; default "--" + name with "-" for "_"
    param: str = ""           # Processing parameter name; default NAME
    required: bool = False    # CLI: the flag must be given
    repeat: bool = False      # CLI: the flag may be given several times (the job gets a list)
    file_filter: str = ""     # Processing file picker filter, e.g. "ME-Net models (*.pt *.onnx)"
    file_extension: str = ""  # Processing: the one extension a file must have (checked by QGIS), e.g. "pt"

    def __post_init__(self):
        assert self.kind in KINDS, self.kind
        assert not self.choice_labels or len(self.choice_labels) == len(self.choices), self.name
        assert self.fronts <= FRONTS, self.fronts

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def param_name(self) -> str:
        return self.param or self.name.upper()

    def check(self, value):
        """``value`` converted to the option's kind and checked against its choices and range; a one-line
        ValueError naming the option otherwise.  ``None`` passes for options whose default is ``None``."""
        if value is None:
            if self.default is None or isinstance(self.default, tuple):
                return list(self.default) if isinstance(self.default, tuple) else None
            raise ValueError(f"{self.name} must be given")
        try:
            value = _convert(self, value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name} must be {_KIND_WORDS[self.kind]}, got {_quoted(value)}") from None
        if self.kind == "choice" and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(map(str, self.choices))}, got {_quoted(value)}")
        if self.kind in ("int", "float") and not (
                (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)):
            raise ValueError(f"{self.name} must be {_range_words(self)}, got {value:g}")
        return value


_KIND_WORDS = {"int": "a whole number", "float": "a finite number", "bool": "true or false",
               "choice": "one of the choices", "multichoice": "a list", "text": "text", "file": "a file path", "folder": "a folder path",
               "int_list": "a list of whole numbers", "float_list": "a list of finite numbers", "text_list": "a list"}


def _quoted(value) -> str:
    """A received value as a message quotes it: its repr, cut to 60 characters (a message stays one short line
    whatever a client sends)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _range_words(option: Option) -> str:
    low, high = option.minimum, option.maximum
    if high is None:
        return f"{low:g} or more"
    if low is None:
        return f"{high:g} or less"
    return f"from {low:g} to {high:g}"


def finite_float(value) -> float:
    """``float(value)``; ValueError for NaN and infinities too, which no option means (``nan`` compares false
    with every range limit, so it would pass them)."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


def _convert(option: Option, value):
    kind = option.kind
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError
        return finite_float(value)
    if kind == "bool":
        if value not in (True, False):  # 0 and 1 too
            raise ValueError
        return bool(value)
    if kind == "choice":
        return type(option.choices[0])(value)
    if kind in ("text", "file", "folder"):
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError
    items = list(value)
    if kind == "int_list":
        return [_convert(Option("item", "int", 0, ""), v) for v in items]
    if kind == "float_list":
        return [_convert(Option("item", "float", 0.0, ""), v) for v in items]
    return [str(v) for v in items]  # multichoice (checked by the engine, which names the choices), text_list


# --- the engine: predict, batch and Extract mangroves -------------------------------------------------------
DEVICES = ("auto", "cuda", "cpu")
#: Inference runtimes; "auto" = torch on a CUDA GPU, else OpenVINO, else ONNX Runtime, else torch.
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
#: Numeric precision; "auto" = bf16 autocast on CUDA; on the CPU bf16 in OpenVINO where the CPU has
#: AVX512_BF16 or AMX-BF16, else fp32 (``runtimes.auto_cpu_precision``).
PRECISIONS = ("auto", "fp32", "bf16")
#: Overlap of neighbouring windows (px) when the user sets none; why 32: docs/performance.md ("Overlap").
DEFAULT_OVERLAP = 32
STAGE_MODES = ("compact", "all")

DEVICE = Option("device", "choice", "auto", "auto = a CUDA GPU when torch sees one, else the CPU",
                label="Device", choices=DEVICES, advanced=True)

ENGINE: Tuple[Option, ...] = (
    Option("stages", "multichoice", (),
           "stage layers to write besides the probability, each at its own resolution (see docs/model.md)",
           label="Stage layers", choices=tuple(STAGE_NAMES), optional=True,
           choice_labels=tuple(f"{s.name} — 1/{s.stride} resolution, {s.channels} channels" for s in STAGES)),
    Option("stage_mode", "choice", "compact",
           "compact = mean/max/std of a stage's channels (3 bands); all = every channel (large)",
           label="Stage layer content", choices=STAGE_MODES,
           choice_labels=("compact (mean, max, std of channels)", "all channels")),
    Option("window", "int", 0, "window size in px, a multiple of 32; 0 = the model's recommendation (256)",
           label="Window size (px)", minimum=0, maximum=MAX_WINDOW, advanced=True, param="WINDOW_SIZE"),
    Option("overlap", "int", DEFAULT_OVERLAP,
           "overlap of neighbouring windows in px, a multiple of 32 less than the window size; overlaps are "
           "blended without seams (see docs/performance.md)",
           label="Window overlap (px)", minimum=0, maximum=1024, advanced=True),
    Option("batch_size", "int", 0, "windows per forward pass; 0 = automatic (halved on GPU out-of-memory)",
           label="Batch size", minimum=0, maximum=1024, advanced=True),
    DEVICE,
    Option("runtime", "choice", "auto",
           "auto = torch on a CUDA GPU when torch sees one, else OpenVINO if installed, else onnxruntime, else "
           "torch (the log says which and why). The ONNX runtimes run on the CPU, faster than torch there, and "
           "need no torch once a .pt checkpoint is exported (done once, cached by its sha256); see "
           "docs/performance.md",
           label="Runtime", choices=RUNTIMES, advanced=True),
    Option("threads", "int", 0,
           "CPU threads of the runtime (torch, onnxruntime or OpenVINO); 0 = every core the process may use "
           "(batch: each worker's share of its host's cores). On a machine shared with other heavy jobs, fewer "
           "threads can be much faster (see docs/performance.md)",
           label="CPU threads", minimum=0, maximum=256, advanced=True),
    Option("precision", "choice", "auto",
           "auto = bf16 autocast on CUDA; on the CPU bf16 in OpenVINO where the CPU has AVX512_BF16 or AMX-BF16, "
           "else fp32 (the log says which and why). bf16 on the CPU is faster and changes the probability "
           "slightly, a few pixels change class (see docs/performance.md)",
           label="Precision", choices=PRECISIONS, advanced=True),
    # optional: graphical models saved before this parameter existed stay valid (QGIS 3.22 refuses a
    # mandatory boolean a model's child has no value for)
    Option("tta", "bool", False,
           "test-time flips: average the model over the 8 flips/rotations of every window, for 8x the model's "
           "time (what it gains: the scores in resources/models/MODEL_CARD.md)",
           label="Test-time flips (8x slower)", optional=True, advanced=True),
    # pixels without ground evidence (issue 27): core/io/clouds.py, docs/guide/extract-mangroves.md#clouds
    Option("cloud_mask", "choice", "auto",
           "pixels without ground evidence (cloud, cloud shadow, cirrus, saturated or defective, no data) are left "
           "as no-data and a quality layer (<output>_quality.tif) says why: auto = the product's scene "
           "classification (SCL) where the input has one, else the cloud detector on the bands read; scl = the "
           "scene classification only; detector = the detector only; off = no cloud masking, every pixel with "
           "data gets a probability (a mask layer still applies)",
           label="Cloud mask", choices=("auto", "scl", "detector", "off"),
           choice_labels=("auto (scene classification, else the cloud detector)", "scene classification (SCL)",
                          "cloud detector", "off (map under clouds too)"), optional=True),
    Option("mask_layer", "file", None,
           "a mask of your own, added to the cloud mask: a raster (nonzero = masked) or a polygon file (masked "
           "inside); masked pixels are left as no-data (quality code 'user mask')",
           label="Mask layer (raster or polygons)", optional=True, advanced=True),
)

# --- the input raster: predict, batch, Extract mangroves, Export channels ----------------------------------
#: Processing shows ``bands`` as six band pickers: (parameter name, label), in the recipes' source-band order.
BAND_PARAMS = (("BAND_BLUE", "B2 blue"), ("BAND_GREEN", "B3 green"), ("BAND_RED", "B4 red"),
               ("BAND_NIR", "B8 NIR"), ("BAND_SWIR1", "B11 SWIR-1"), ("BAND_SWIR2", "B12 SWIR-2"))
BAND_HELP = ("Band number of {label} when the file does not name its bands; set B2 to B11 (and B12 for models "
             "of channel recipe v1) or none (empty = found from the band names)")

INPUT: Tuple[Option, ...] = (
    Option("bands", "int_list", None,
           "band numbers of B2,B3,B4,B8,B11,B12 when the file does not name its bands, e.g. 1,2,3,4,5,6 (B12 "
           "only for models of channel recipe v1)",
           label="Band numbers", optional=True, advanced=True),
    # Sentinel-2 products use -1000 (processing baseline 04.00 and later) or 0 (before); an offset beyond
    # +-2000 moves every reflectance by more than 0.2, which is never a Sentinel-2 product's
    Option("dn_offset", "float", None,
           "added to integer DN before dividing by 10000 when the product metadata has no offset (-1000 for "
           "processing baseline 04.00 and later, 0 before)",
           label="DN offset", optional=True, advanced=True, minimum=-2000.0, maximum=2000.0),
)

MODEL = Option("model", "file", None,
               "exported model (.onnx; maps without torch) or checkpoint (.pt); empty = the default model from "
               "the model store (Install model / install-model --list show it)",
               label="Model checkpoint", optional=True, file_filter="ME-Net models (*.pt *.onnx)")

PREDICT: Tuple[Option, ...] = (
    MODEL,
    Option("out_dir", "folder", None, "writes <input stem>_probability.tif (and stage layers) here",
           fronts=CLI_ONLY, required=True),
    Option("quiet", "bool", False, "no progress or log lines (the summary only)", fronts=CLI_ONLY),
)

#: ``stages``: the stage table printed for a window size.
STAGE_TABLE: Tuple[Option, ...] = (
    Option("window", "int", 256, "window size for the map-size column", fronts=CLI_ONLY),
)

#: ``export``: a checkpoint to ONNX.
EXPORT: Tuple[Option, ...] = (
    Option("output", "file", None, "the .onnx to write (default: the cache beside the checkpoint)", flag="--out",
           fronts=CLI_ONLY),
    Option("stages", "bool", False, "also output every stage map (for predict --stages)", fronts=CLI_ONLY),
)

# --- Train ME-Net -------------------------------------------------------------------------------------------
#: Channel recipe versions, newest first (core/model/channels.py RECIPES; a test keeps them equal).
RECIPE_VERSIONS = (2, 1)

TRAIN: Tuple[Option, ...] = (
    # the dialog's tile folder is optional (rasters with labels instead); the command line needs --tiles
    Option("tiles", "folder", None,
           "folder of image/mask pairs (tile_NNNN.tif + mask_NNNN.tif); on the command line, repeat --tiles for "
           "several sources, each as FOLDER[:name=N,weight=W,edge_ignore=PX,group=REGEX,style=S] (see docs/cli.md)",
           label="Folder of image/mask tile pairs", param="TILE_FOLDER", optional=True, fronts=CLI_AND_DIALOG,
           required=True, repeat=True),
    Option("output", "file", None, "checkpoint to write (.pt)", flag="--out", fronts=CLI_ONLY,
           required=True),
    Option("epochs", "int", 30, "passes over the training windows", label="Epochs", minimum=1, maximum=1000,
           fronts=CLI_AND_DIALOG),
    Option("batch_size", "int", 8, "windows per training step", label="Batch size", minimum=2, maximum=512,
           advanced=True, fronts=CLI_AND_DIALOG),
    Option("lr", "float", 1e-3, "peak learning rate (AdamW)", label="Peak learning rate (AdamW)",
           minimum=1e-6, maximum=1.0, advanced=True, param="LEARNING_RATE", fronts=CLI_AND_DIALOG),
    Option("val_fraction", "float", 0.2, "share of the windows kept for validation",
           label="Validation share of windows", minimum=0.05, maximum=0.5, advanced=True, fronts=CLI_AND_DIALOG),
    Option("seed", "int", 0, "random seed (split, augmentation, initial weights)", label="Random seed",
           advanced=True, fronts=CLI_AND_DIALOG),
    DEVICE,
    Option("imagenet_weights", "file", None, "torchvision ResNet-101 ImageNet weights (.pth), optional",
           label="ImageNet weights (.pth)", optional=True, advanced=True, file_extension="pth", fronts=CLI_AND_DIALOG),
    Option("recipe", "choice", 2, "channel recipe version: 2 = B2,B3,B4,B8,B11 (default), 1 = also B12",
           label="Channel recipe", choices=RECIPE_VERSIONS, advanced=True,
           choice_labels=("v2: B2, B3, B4, B8, B11 (no B12)", "v1: B2, B3, B4, B8, B11, B12"), fronts=CLI_AND_DIALOG),
    Option("init_from", "file", None,
           "start from this checkpoint's weights (fine-tuning; its channel statistics are kept when its recipe "
           "is the chosen one)",
           label="Fine-tune from model", optional=True, advanced=True, flag="--init", param="INIT_MODEL",
           file_extension="pt", fronts=CLI_AND_DIALOG),
    Option("resume", "bool", False, "continue a stopped run from its resume state (.OUT.resume, written every epoch)",
           label="Continue a stopped run", advanced=True, fronts=CLI_AND_DIALOG),
    Option("history", "file", None,
           "also write the per-epoch log as JSON here (.json; replaces only an earlier history)", fronts=CLI_ONLY),
    Option("val_groups", "text_list", (), "location groups used for validation, e.g. magset2:6",
           fronts=CLI_ONLY),
    Option("holdout_groups", "text_list", (),
           "location groups or sources never trained on nor used to choose anything", flag="--holdout",
           fronts=CLI_ONLY),
    Option("val_names_from", "file", None, "validate on the windows this checkpoint validated on",
           fronts=CLI_ONLY),
    Option("threads", "int", 0, "CPU threads for training; 0 = every core the process may use", minimum=0,
           fronts=CLI_ONLY),
    Option("boundary_weight", "float", 0.0,
           "boundary-aware loss: pixels within 2 px of a label boundary count 1 + this much (0 = off)",
           minimum=0.0, fronts=CLI_ONLY),
    Option("refine_width", "int", None,
           "channels of the full-resolution image-guided refinement (0 = none; default: as --init's model, "
           "else none)",
           minimum=0, maximum=256, fronts=CLI_ONLY),
    Option("train_on_clouds", "bool", False,
           "also train on the labels of pixels the cloud detector (the one that masks the maps) marks as cloud; by "
           "default they carry no loss and no validation score, since the ground under a cloud is not seen and a "
           "model trained on such labels learns to paint mangrove on clouds",
           label="Train on labels under clouds too", advanced=True, fronts=CLI_AND_DIALOG),
)

# --- Prepare Sentinel-2 stack -------------------------------------------------------------------------------
PREPARE: Tuple[Option, ...] = (
    Option("bounds", "float_list", None, "xmin,ymin,xmax,ymax in the product's CRS", fronts=CLI_ONLY),
    Option("resampling", "choice", "bilinear",
           "for B11/B12 from 20 m to 10 m: bilinear (reflectance varies continuously) or nearest (each 20 m "
           "value on its four 10 m pixels)",
           label="B11/B12 resampling (20 m → 10 m)", choices=("bilinear", "nearest"), fronts=CLI_AND_DIALOG),
    # several dates -> one composite of clear observations (core/io/composite.py, docs/guide/prepare-sentinel2.md)
    Option("composite", "choice", "medoid",
           "with two or more dates: how each pixel's clear observations become one value: medoid (the whole "
           "spectrum of the clear observation closest to the others; of two, the darker blue), median (per band) "
           "or ndvi_max (the clear observation of greatest NDVI); cloud, shadow, cirrus, defective and no-data "
           "pixels never enter (docs/guide/prepare-sentinel2.md#composites says why the medoid)",
           label="Composite of several dates", choices=("medoid", "median", "ndvi_max"),
           choice_labels=("medoid (one date's whole spectrum)", "median of the clear observations",
                          "greatest NDVI"), fronts=CLI_AND_DIALOG),
    Option("masks", "text_list", None,
           "with several dates: one mask raster per date, in the order of the dates (nonzero = not clear; '-' for "
           "a date without one); otherwise a date's clear pixels come from its scene classification (L2A "
           "products), else the cloud detector", fronts=CLI_ONLY),
)

# --- Assess accuracy ----------------------------------------------------------------------------------------
ASSESS: Tuple[Option, ...] = (
    Option("reference", "file", None, "reference: mask raster (mangrove >= 0.5) or polygon file",
           fronts=CLI_ONLY),
    Option("area_file", "file", None, "polygon file: assess only inside it", flag="--area",
           fronts=CLI_ONLY),
    Option("threshold", "float", None,
           "probability that counts as mangrove; empty = the threshold of the model that made the map (chosen on "
           "its validation data and stored in the probability raster), else 0.5",
           label="Mangrove threshold", minimum=0.0, maximum=1.0, optional=True, fronts=CLI_AND_DIALOG),
    Option("image", "file", None, "the Sentinel-2 raster: also score MVI (and the forest) on the same pixels",
           fronts=CLI_ONLY),
    Option("tiles", "folder", None,
           "tile folder: train the random-forest baseline on it; without a prediction, score the model on its "
           "own validation windows next to both baselines",
           label="Tiles for a random forest", optional=True, param="TILE_FOLDER", fronts=CLI_AND_DIALOG),
    Option("model", "file", None,
           "checkpoint (.pt) scored on its validation windows (with --tiles and no prediction); empty = the "
           "default model", fronts=CLI_ONLY),
    Option("report", "file", None, "write an HTML report here (.html; replaces only an earlier report)",
           fronts=CLI_ONLY),
    Option("table", "file", None, "write a CSV table here (.csv; replaces only an earlier table)",
           fronts=CLI_ONLY),
)

# --- batch: many scenes on Dask ------------------------------------------------------------------------------
_BATCH_ONLY = frozenset({"cli", "batch"})
BATCH: Tuple[Option, ...] = (
    Option("out_dir", "folder", None,
           "writes <scene>_probability.tif (COG), batch_summary.csv and batch_manifest.json here",
           fronts=CLI_ONLY, required=True),
    Option("workers", "int", 0, "worker processes of the embedded cluster; 0 = automatic", minimum=0,
           fronts=_BATCH_ONLY),
    Option("scheduler", "text", None, "address of an existing Dask scheduler (tcp://host:8786) instead",
           fronts=_BATCH_ONLY),
    Option("retries", "int", 2, "further attempts for a failed scene", minimum=0, fronts=_BATCH_ONLY),
    Option("resources", "text", "", "Dask resources per scene, e.g. GPU=1 (workers started with --resources GPU=1)",
           fronts=_BATCH_ONLY),
    Option("no_progress", "bool", False, "no progress bars (log lines only)", fronts=_BATCH_ONLY),
    Option("data_root", "folder", None,
           "local files that manifest CSVs and STAC catalogues list must lie inside this folder; default: "
           "each manifest's or catalogue's own folder", fronts=_BATCH_ONLY),
)

# --- Map mangroves from STAC (an area and a date range) ---------------------------------------------------
#: The default STAC API and collection: Element 84's Earth Search (public COGs, no signing needed).
STAC_API = "https://earth-search.aws.element84.com/v1"
STAC_COLLECTION = "sentinel-2-l2a"

STAC: Tuple[Option, ...] = (
    Option("output", "file", None, "the mangrove probability to write (.tif)", flag="--out", fronts=CLI_ONLY,
           required=True),
    Option("bounds", "float_list", None, "the area: xmin,ymin,xmax,ymax in --bounds-crs (default longitude and "
           "latitude, WGS 84)", fronts=CLI_ONLY, required=True),
    Option("bounds_crs", "text", "EPSG:4326", "coordinate system of --bounds (EPSG code or WKT)", fronts=CLI_ONLY),
    Option("start", "text", None, "first day of the date range, YYYY-MM-DD", fronts=CLI_ONLY, required=True),
    Option("end", "text", None, "last day of the date range, YYYY-MM-DD (included)", fronts=CLI_ONLY,
           required=True),
    Option("cloud_limit", "float", 40.0,
           "leave out scenes whose cloud cover (eo:cloud_cover, whole scene) is above this percentage; the clouds "
           "of the scenes kept are masked per pixel from their scene classification before compositing",
           label="Most scene cloud cover (%)", minimum=0.0, maximum=100.0, fronts=CLI_AND_DIALOG),
    Option("max_items", "int", 10, "read at most this many scenes, the least cloudy first",
           label="Most scenes read", minimum=1, maximum=100, advanced=True, fronts=CLI_AND_DIALOG),
    Option("api_url", "text", STAC_API,
           "STAC API to search (Earth Search by default; Microsoft Planetary Computer needs signed asset URLs, "
           "see docs/guide/map-from-stac.md)", label="STAC API URL", advanced=True, fronts=CLI_AND_DIALOG),
    Option("collection", "text", STAC_COLLECTION, "the Sentinel-2 L2A collection of that API",
           label="STAC collection", advanced=True, fronts=CLI_AND_DIALOG),
    Option("composite", "file", None,
           "also keep the composite (6 bands and the clear-observation count) here (.tif); default: "
           "<output stem>_composite.tif beside the probability", fronts=CLI_ONLY),
)

# --- Install ME-Net dependencies -----------------------------------------------------------------------------
#: environment_installer.VARIANTS (a test keeps them equal).
VARIANTS = ("cpu-light", "cpu", "cuda")

INSTALL_DEPS: Tuple[Option, ...] = (
    Option("variant", "choice", "cpu-light",
           "cpu-light = mapping through ONNX Runtime; cpu / cuda = + PyTorch (menet_qgis/requirements/)",
           label="Variant", choices=VARIANTS,
           choice_labels=("cpu-light — mapping on the CPU through ONNX Runtime, no PyTorch",
                          "cpu — everything on the CPU, PyTorch's CPU build from PyTorch's own index",
                          "cuda — everything on an NVIDIA GPU, PyTorch with CUDA"), fronts=CLI_AND_DIALOG),
    Option("wheel_folder", "folder", None,
           "install offline from this folder of wheels (pip --no-index --find-links); empty = download",
           label="Wheel folder (offline)", optional=True, fronts=CLI_AND_DIALOG),
    Option("index_url", "text", None, "package index to use instead of PyPI (a mirror); empty = PyPI",
           label="Package index URL", optional=True, fronts=CLI_AND_DIALOG),
    Option("env_dir", "folder", None, "where the environment goes (default: the managed environment)",
           fronts=CLI_ONLY),
    Option("python", "file", None, "Python to create the environment from (default: found automatically)",
           fronts=CLI_ONLY),
    Option("system_site_packages", "bool", False,
           "let the environment see the system's Python packages (e.g. the distribution's rasterio/GDAL); "
           "isolated by default",
           label="See system Python packages", advanced=True, param="SYSTEM_SITE", fronts=CLI_AND_DIALOG),
    Option("fresh", "bool", False,
           "build a new environment even when the installed one is up to date (the installed one stays in use "
           "until the new one has passed its check)",
           label="Rebuild even if up to date", advanced=True, fronts=CLI_AND_DIALOG),
)

# --- Install model -------------------------------------------------------------------------------------------
INSTALL_MODEL: Tuple[Option, ...] = (
    Option("list", "bool", False, "list the installed models (after installing SOURCE, if given) and the "
           "default-model rule", fronts=CLI_ONLY),
    Option("sha256", "text", None, "expected sha256; empty = read from <source>.sha256 beside it", label="SHA256",
           optional=True, fronts=CLI_AND_DIALOG),
    Option("name", "text", None, "file name to store it under; empty = the source's file name", label="Install as",
           optional=True, fronts=CLI_AND_DIALOG),
    Option("allow_http", "bool", False,
           "download over plain http from another machine (not protected: needs the expected SHA256 given, "
           "from a source you trust)", label="Allow plain http (needs SHA256)", advanced=True,
           fronts=CLI_AND_DIALOG),
    Option("timeout", "float", 60.0, "seconds without data before giving up", minimum=0.0,
           fronts=CLI_ONLY),
)

GROUPS: Dict[str, Tuple[Option, ...]] = {
    "engine": ENGINE, "input": INPUT, "predict": PREDICT, "stage_table": STAGE_TABLE, "export": EXPORT,
    "train": TRAIN, "prepare": PREPARE, "assess": ASSESS, "batch": BATCH, "stac": STAC,
    "install_deps": INSTALL_DEPS, "install_model": INSTALL_MODEL}


def group(name: str) -> Tuple[Option, ...]:
    return GROUPS[name]


def by_name(options: Sequence[Option], name: str) -> Option:
    for option in options:
        if option.name == name:
            return option
    raise KeyError(f"no option {name!r}; options: {', '.join(o.name for o in options)}")


def default_of(options: Sequence[Option], name: str):
    """The declared default of one option: what the core's own option dataclasses start from."""
    return by_name(options, name).default


def defaults(options: Sequence[Option]) -> Dict[str, object]:
    """{name: default}; list-valued defaults as fresh lists (a caller may append to them)."""
    return {o.name: list(o.default) if isinstance(o.default, tuple) else o.default for o in options}


# --- argparse ------------------------------------------------------------------------------------------------
def _ranged(option: Option, convert):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {_KIND_WORDS[option.kind]}, got {text!r}") from None
        if (option.minimum is not None and value < option.minimum) or \
                (option.maximum is not None and value > option.maximum):
            raise argparse.ArgumentTypeError(f"must be {_range_words(option)}, got {text}")
        return value
    parse.__name__ = option.kind  # argparse names the type in its messages
    return parse


def _comma_list(convert, words: str):
    def parse(text: str) -> List:
        try:
            return [convert(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {words} separated by commas, got {text!r}") from None
    return parse


_LIST_ITEMS = {"int_list": int, "float_list": finite_float, "text_list": str, "multichoice": str}


def argument(option: Option) -> Tuple[List[str], Dict]:
    """The flag and keyword arguments of ``parser.add_argument`` for ``option``."""
    kwargs: Dict = {"dest": option.name, "help": option.help}
    if option.kind == "bool":
        kwargs.update(action="store_true", default=bool(option.default))
        return [option.cli_flag], kwargs
    if option.kind in ("int", "float"):
        kwargs["type"] = _ranged(option, int if option.kind == "int" else finite_float)
    elif option.kind == "choice":
        kwargs.update(choices=list(option.choices), type=type(option.choices[0]))
    elif option.kind in _LIST_ITEMS:
        kwargs["type"] = _comma_list(_LIST_ITEMS[option.kind], _KIND_WORDS[option.kind])
        if not option.repeat:  # the dialog shows a list widget; on the command line it is one word
            listed = f": {','.join(option.choices)}" if option.choices else ""
            kwargs["help"] = f"{option.help} (comma-separated{listed})"
    default = option.default
    if option.repeat:
        kwargs["action"] = "append"
        default = None
    kwargs["default"] = list(default) if isinstance(default, tuple) else default
    if default not in (None, "", ()) and "default" not in option.help:
        kwargs["help"] = f"{kwargs['help']} (default: {default})"
    if option.required:
        kwargs["required"] = True
    return [option.cli_flag], kwargs


def add_arguments(parser: argparse.ArgumentParser, options: Sequence[Option], front: str = "cli") -> None:
    """argparse arguments generated from the declarations of ``options`` shown on ``front``."""
    for option in options:
        if front in option.fronts:
            flags, kwargs = argument(option)
            parser.add_argument(*flags, **kwargs)


def values(args: argparse.Namespace, options: Sequence[Option], front: str = "cli") -> Dict[str, object]:
    """{name: value} of the parsed ``args`` for ``options`` shown on ``front``."""
    return {o.name: getattr(args, o.name) for o in options if front in o.fronts}
