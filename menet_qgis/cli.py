"""Command line for headless and server use: ``python -m menet_qgis COMMAND``.

Errors print one line (``menet_qgis: error: ...``) and exit with status 2;
nothing half-written is left behind (with several inputs, the outputs of the
inputs finished before the error are kept).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .core.stages import STAGE_NAMES, stage_table
from .resources import default_model_path


class CliReporter:
    """Prints engine messages to stderr; progress as a single updating percentage."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._last = -1

    def info(self, message):
        if not self.quiet:
            print(message, file=sys.stderr)

    def warn(self, message):
        print("WARNING: " + message, file=sys.stderr)

    def progress(self, percent):
        step = int(percent) // 10
        if not self.quiet and step != self._last:
            self._last = step
            print(f"  {int(percent)}%", file=sys.stderr)

    def cancelled(self):
        return False


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m menet_qgis", description="ME-Net mangrove extraction")
    sub = parser.add_subparsers(dest="command", required=True)

    stages = sub.add_parser("stages", help="print the ResNet-101 stage table")
    stages.add_argument("--window", type=int, default=256, help="window size for the map-size column")

    predict = sub.add_parser("predict", help="mangrove probability (and stage layers) for rasters")
    predict.add_argument("inputs", nargs="+", help="input rasters (Sentinel-2 bands or an 11-band ME-Net stack)")
    predict.add_argument("--model", help=f"checkpoint (default: {default_model_path().name} shipped with the plugin)")
    predict.add_argument("--out-dir", required=True, help="writes <input stem>_probability.tif here")
    predict.add_argument("--stages", default="", help=f"comma-separated stages to write ({','.join(STAGE_NAMES)})")
    predict.add_argument("--stage-mode", choices=["compact", "all"], default="compact",
                         help="compact = mean/max/std of channels (3 bands); all = every channel")
    predict.add_argument("--window", type=int, default=0, help="window size in px; 0 = the model's (256)")
    predict.add_argument("--overlap", type=int, default=64)
    predict.add_argument("--batch-size", type=_non_negative, default=0, help="0 = automatic")
    predict.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    predict.add_argument("--bands", type=_int_list, help="band numbers of B2,B3,B4,B8,B11,B12, e.g. 1,2,3,4,5,6")
    predict.add_argument("--dn-offset", type=float, help="DN offset when product metadata has none (-1000 for baseline 04.00+)")
    predict.add_argument("--quiet", action="store_true")

    train = sub.add_parser("train", help="train ME-Net on labelled windows; writes a checkpoint")
    train.add_argument("--tiles", required=True, help="folder of image/mask pairs (tile_NNNN.tif + mask_NNNN.tif)")
    train.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--val-fraction", type=float, default=0.2)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    train.add_argument("--imagenet-weights", help="torchvision ResNet-101 ImageNet .pth (optional)")
    train.add_argument("--history", help="also write the per-epoch log as JSON here")

    prepare = sub.add_parser("prepare", help="6-band 10 m stack from an unzipped Sentinel-2 product folder")
    prepare.add_argument("folder", help=".SAFE folder or a folder of per-band files (..._B02_10m.jp2, ...)")
    prepare.add_argument("out", help="output GeoTIFF")
    prepare.add_argument("--bounds", type=lambda t: [float(v) for v in t.split(",")],
                         help="xmin,ymin,xmax,ymax in the product's CRS")
    prepare.add_argument("--resampling", choices=["bilinear", "nearest"], default="bilinear",
                         help="for B11/B12 from 20 m to 10 m")

    assess = sub.add_parser("assess", help="accuracy of a map against a reference, next to MVI and random forest")
    assess.add_argument("prediction", nargs="?", help="probability or 0/1 mask raster")
    assess.add_argument("--reference", help="reference: mask raster (mangrove >= 0.5) or polygon file")
    assess.add_argument("--area", help="polygon file: assess only inside it")
    assess.add_argument("--threshold", type=float, default=0.5)
    assess.add_argument("--image", help="the Sentinel-2 raster: also score MVI (and the forest) on the same pixels")
    assess.add_argument("--tiles", help="tile folder: train the random-forest baseline on it; without a "
                        "prediction, score --model on its own validation windows next to both baselines")
    assess.add_argument("--model", help="checkpoint (with --tiles and no prediction)")
    assess.add_argument("--report", help="write an HTML report here")
    assess.add_argument("--table", help="write a CSV table here")
    sub.add_parser("worker", help="run one job read as JSON from stdin, speaking JSON lines on stdout "
                   "(what the QGIS algorithms start; see menet_qgis/worker.py)")
    return parser


def cmd_stages(args) -> int:
    print(stage_table(args.window))
    return 0


def cmd_predict(args) -> int:
    from . import jobs
    from .core import raster_io
    from .core.stages import parse_stage_names
    from .core.tiling import check_window
    # Cheap checks first: parameters, every input, then the model, before any compute.
    stages = [s for s in args.stages.split(",") if s]
    check_window(args.window or 256, args.overlap)
    parse_stage_names(stages)
    for path in args.inputs:
        raster_io.RasterInput(path, band_numbers=args.bands, dn_offset=args.dn_offset).close()
    stems = [Path(p).stem for p in args.inputs]
    if len(set(stems)) != len(stems):
        raise ValueError("two inputs share a file name stem; their outputs would overwrite each other")
    jobs.load_model(jobs.resolve_model(args.model))
    options = dict(window=args.window, overlap=args.overlap, batch_size=args.batch_size, device=args.device,
                   stages=stages, stage_mode=args.stage_mode)
    reporter = CliReporter(args.quiet)
    summary = []
    for path, stem in zip(args.inputs, stems):
        result = jobs.extract({"input": path, "output": str(Path(args.out_dir) / f"{stem}_probability.tif"),
                               "model": args.model, "bands": args.bands, "dn_offset": args.dn_offset,
                               "options": options}, reporter)
        summary.append({"input": path, "probability": result["probability"], "stages": result["stages"],
                        "device": result["device"], "windows": result["windows"], "seconds": result["seconds"]})
    print(json.dumps(summary, indent=2))
    return 0


def cmd_train(args) -> int:
    from . import jobs
    result = jobs.train({"tiles": args.tiles, "output": args.out, "epochs": args.epochs,
                         "batch_size": args.batch_size, "lr": args.lr, "val_fraction": args.val_fraction,
                         "seed": args.seed, "device": args.device, "imagenet_weights": args.imagenet_weights,
                         "history": args.history}, CliReporter())
    print(json.dumps({"checkpoint": result["checkpoint"], "best": result["best"]}, indent=2))
    return 0


def cmd_prepare(args) -> int:
    from . import jobs
    result = jobs.prepare({"folder": args.folder, "output": args.out, "bounds": args.bounds,
                           "resampling": args.resampling}, CliReporter())
    print(json.dumps(result, indent=2))
    return 0


def cmd_assess(args) -> int:
    from . import jobs
    params = {"prediction": args.prediction, "threshold": args.threshold, "image": args.image,
              "tiles": args.tiles, "model": args.model, "report": args.report, "table": args.table,
              "area_file": args.area}
    if args.prediction:
        if not args.reference:
            raise ValueError("--reference is required with a prediction raster")
        is_raster = Path(args.reference).suffix.lower() in (".tif", ".tiff", ".vrt", ".img")
        params["reference" if is_raster else "reference_file"] = args.reference
    result = jobs.assess(params, CliReporter(quiet=True))
    print(json.dumps(result["results"], indent=2))
    return 0


def cmd_worker(args) -> int:
    from .worker import main as worker_main
    return worker_main()


COMMANDS = {"stages": cmd_stages, "predict": cmd_predict, "prepare": cmd_prepare, "train": cmd_train,
            "assess": cmd_assess, "worker": cmd_worker}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "worker":  # speaks its own protocol, errors included
        return cmd_worker(args)
    try:
        from .core.raster_io import limit_gdal_cache
        limit_gdal_cache()
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("menet_qgis: cancelled; no output was kept", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"menet_qgis: error: {message}", file=sys.stderr)
        return 2
