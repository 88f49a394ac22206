"""Command line for headless and server use: ``python -m menet_qgis COMMAND``.

Errors print one line (``menet_qgis: error: ...``) and exit with status 2;
nothing half-written is left behind (with several inputs, the outputs of the
inputs finished before the error are kept).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import List, Optional

from .core.choices import DEFAULT_OVERLAP, PRECISIONS, RUNTIMES
from .core.model.stages import STAGE_NAMES, stage_table
from .core.reporting import ConsoleReporter
from .resources import DEFAULT_MODEL_BASE


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_engine_arguments(parser: argparse.ArgumentParser, threads_auto: str) -> None:
    """The engine options (``EngineOptions``) as predict and batch take them: declared once, so a
    batch runs with the same runtimes, precisions and defaults as a single map.
    ``threads_auto``: what --threads 0 means for this command."""
    parser.add_argument("--stages", default="", help=f"comma-separated stages to write ({','.join(STAGE_NAMES)})")
    parser.add_argument("--stage-mode", choices=["compact", "all"], default="compact",
                        help="compact = mean/max/std of channels (3 bands); all = every channel")
    parser.add_argument("--window", type=int, default=0, help="window size in px; 0 = the model's (256)")
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP,
                        help=f"overlap of neighbouring windows in px, a multiple of 32 (default {DEFAULT_OVERLAP})")
    parser.add_argument("--batch-size", type=_non_negative, default=0, help="0 = automatic")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--runtime", choices=list(RUNTIMES), default="auto",
                        help="auto = torch on a CUDA GPU when torch sees one, else OpenVINO if installed, "
                             "else onnxruntime, else torch. The ONNX runtimes run on the CPU (1.3-1.7x faster "
                             "than torch there when the CPU is quiet, more when it is busy) and export a .pt "
                             "checkpoint once (cached by its sha256)")
    parser.add_argument("--threads", type=_non_negative, default=0,
                        help=f"CPU threads for the runtime (torch, onnxruntime or OpenVINO); 0 = {threads_auto}. "
                             "On a machine shared with other heavy jobs, fewer threads can be much faster")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto = bf16 autocast on CUDA; on the CPU bf16 in OpenVINO where the CPU has "
                             "AVX512_BF16 or AMX-BF16, else fp32 (the log says which and why). bf16 on the CPU "
                             "is about 2x faster and changes the probability by up to ~0.02 (a few pixels in "
                             "10 000 change class at 0.5)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time flips: average the model over the 8 flips/rotations of every window "
                             "(+0.1-0.8 F1 points on the validation and held-out coasts, 8x the model's time)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m menet_qgis", description="ME-Net mangrove extraction")
    sub = parser.add_subparsers(dest="command", required=True)

    stages = sub.add_parser("stages", help="print the ResNet-101 stage table")
    stages.add_argument("--window", type=int, default=256, help="window size for the map-size column")

    predict = sub.add_parser("predict", help="mangrove probability (and stage layers) for rasters")
    predict.add_argument("inputs", nargs="+", help="input rasters (Sentinel-2 bands or an 11-band ME-Net stack)")
    predict.add_argument("--model", help=f"exported model (.onnx; runs without torch) or checkpoint (.pt) "
                         f"(default: {DEFAULT_MODEL_BASE}.onnx from the model store, or its .pt where torch runs "
                         "on a CUDA GPU; see install-model --list)")
    predict.add_argument("--out-dir", required=True, help="writes <input stem>_probability.tif here")
    add_engine_arguments(predict, "every core this process may use")
    predict.add_argument("--bands", type=_int_list, help="band numbers of B2,B3,B4,B8,B11,B12, e.g. 1,2,3,4,5,6")
    predict.add_argument("--dn-offset", type=float, help="DN offset when product metadata has none (-1000 for baseline 04.00+)")
    predict.add_argument("--quiet", action="store_true")

    train = sub.add_parser("train", help="train ME-Net on labelled windows; writes a checkpoint")
    train.add_argument("--tiles", required=True, action="append",
                       help="folder of image/mask pairs (tile_NNNN.tif + mask_NNNN.tif); repeat for several sources, "
                            "each as FOLDER[:name=N,weight=W,edge_ignore=PX,group=REGEX,style=S]")
    train.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--val-fraction", type=float, default=0.2)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    train.add_argument("--imagenet-weights", help="torchvision ResNet-101 ImageNet .pth (optional)")
    train.add_argument("--history", help="also write the per-epoch log as JSON here")
    train.add_argument("--recipe", type=int, choices=[1, 2], default=2,
                       help="channel recipe version: 2 = B2,B3,B4,B8,B11 (default), 1 = also B12")
    train.add_argument("--init", dest="init_from",
                       help="start from this checkpoint's weights (fine-tuning; its channel statistics are kept "
                            "when its recipe is --recipe)")
    train.add_argument("--val-groups", type=lambda t: [x for x in t.split(",") if x], default=[],
                       help="location groups used for validation, e.g. magset2:6")
    train.add_argument("--holdout", type=lambda t: [x for x in t.split(",") if x], default=[],
                       help="location groups or sources never trained on nor used to choose anything")
    train.add_argument("--val-names-from", help="validate on the windows this checkpoint validated on")
    train.add_argument("--resume", action="store_true",
                       help="continue a stopped run from its resume state (.OUT.resume, written every epoch)")
    train.add_argument("--threads", type=int, default=0)
    train.add_argument("--boundary-weight", type=float, default=0.0,
                       help="boundary-aware loss: pixels within 2 px of a label boundary count 1 + this much "
                            "(0 = off)")
    train.add_argument("--refine-width", type=_non_negative,
                       help="channels of the full-resolution image-guided refinement (0 = none; default: as "
                            "--init's model, else none)")

    export = sub.add_parser("export", help="export a checkpoint to ONNX (runs without torch; needs torch to make)")
    export.add_argument("model", nargs="?", help=f"checkpoint (.pt; default: {DEFAULT_MODEL_BASE}.pt from the "
                        "model store, else the plugin's)")
    export.add_argument("--out", help="the .onnx to write (default: the cache beside the checkpoint)")
    export.add_argument("--stages", action="store_true", help="also output every stage map (for --stages)")

    prepare = sub.add_parser("prepare", help="6-band 10 m stack from an unzipped Sentinel-2 product folder")
    prepare.add_argument("folder", help=".SAFE folder or a folder of per-band files (..._B02_10m.jp2, ...)")
    prepare.add_argument("out", help="output GeoTIFF")
    prepare.add_argument("--bounds", type=lambda t: [float(v) for v in t.split(",")],
                         help="xmin,ymin,xmax,ymax in the product's CRS")
    prepare.add_argument("--resampling", choices=["bilinear", "nearest"], default="bilinear",
                         help="for B11/B12 from 20 m to 10 m")

    batch = sub.add_parser("batch", help="many scenes on Dask distributed: resumable, retried, COG outputs")
    batch.add_argument("inputs", nargs="+", help="rasters, globs ('scenes/*.tif'), manifest CSVs (path[,date,region,"
                       "name,bands,dn_offset]) or STAC JSON (ItemCollection, Item, static catalog)")
    batch.add_argument("--out-dir", required=True, help="writes <scene>_probability.tif (COG), batch_summary.csv "
                       "and batch_manifest.json here")
    batch.add_argument("--model", help="exported model (.onnx; runs without torch) or checkpoint (.pt) (default: "
                       "the default model, found as predict and Extract find it)")
    batch.add_argument("--workers", type=_non_negative, default=0, help="worker processes of the embedded cluster; "
                       "0 = automatic")
    batch.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:8786) instead")
    batch.add_argument("--retries", type=_non_negative, default=2, help="further attempts for a failed scene")
    batch.add_argument("--resources", default="", help="Dask resources per scene, e.g. GPU=1 (workers started "
                       "with --resources GPU=1)")
    add_engine_arguments(batch, "each worker's share of its host's cores")
    batch.add_argument("--bands", type=_int_list, help="band numbers of B2,B3,B4,B8,B11,B12 for scenes that "
                       "do not name their bands")
    batch.add_argument("--dn-offset", type=float, help="DN offset when the product metadata has none")
    batch.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")

    assess = sub.add_parser("assess", help="accuracy of a map against a reference, next to MVI and random forest")
    assess.add_argument("prediction", nargs="?", help="probability or 0/1 mask raster")
    assess.add_argument("--reference", help="reference: mask raster (mangrove >= 0.5) or polygon file")
    assess.add_argument("--area", help="polygon file: assess only inside it")
    assess.add_argument("--threshold", type=float, default=None,
                        help="probability that counts as mangrove (default: the model's own, stored in the map; else 0.5)")
    assess.add_argument("--image", help="the Sentinel-2 raster: also score MVI (and the forest) on the same pixels")
    assess.add_argument("--tiles", help="tile folder: train the random-forest baseline on it; without a "
                        "prediction, score --model on its own validation windows next to both baselines")
    assess.add_argument("--model", help=f"checkpoint (with --tiles and no prediction; default: "
                        f"{DEFAULT_MODEL_BASE}.pt)")
    assess.add_argument("--report", help="write an HTML report here")
    assess.add_argument("--table", help="write a CSV table here")

    deps = sub.add_parser("install-deps", help="create/update the managed Python environment the worker runs in")
    deps.add_argument("--variant", choices=["cpu-light", "cpu", "cuda"], default="cpu-light",
                      help="cpu-light = mapping through ONNX Runtime; cpu / cuda = + PyTorch (menet_qgis/requirements/)")
    deps.add_argument("--wheel-folder", help="install offline from this folder of wheels (pip --no-index --find-links)")
    deps.add_argument("--index-url", help="package index to use instead of PyPI (a mirror)")
    deps.add_argument("--env-dir", help="where the environment goes (default: the managed environment)")
    deps.add_argument("--python", help="Python to create the environment from (default: found automatically)")
    deps.add_argument("--system-site-packages", action="store_true",
                      help="let the environment see the system's packages (e.g. Debian's rasterio/GDAL)")
    deps.add_argument("--fresh", action="store_true", help="build a new environment even when the installed one "
                      "is up to date (the installed one stays in use until the new one has passed its check)")

    model = sub.add_parser("install-model", help="download or copy a model, verify its sha256, store it in the "
                           "model store (MENET_HOME/models); --list shows the store")
    model.add_argument("source", nargs="?", help=f"URL or file, e.g. dist/{DEFAULT_MODEL_BASE}.onnx (default: the "
                       "MENET_MODEL_URL environment variable)")
    model.add_argument("--list", action="store_true", help="list the installed models (after installing SOURCE, "
                       "if given) and the default-model rule")
    model.add_argument("--sha256", help="expected sha256 (default: <source>.sha256 beside it)")
    model.add_argument("--name", help="file name to store it under (default: the source's file name)")
    model.add_argument("--timeout", type=float, default=60, help="seconds without data before giving up")

    sub.add_parser("worker", help="run one job read as JSON from stdin, speaking JSON lines on stdout "
                   "(what the QGIS algorithms start; see menet_qgis/engine_process.py)")
    return parser


def cmd_stages(args) -> int:
    print(stage_table(args.window))
    return 0


def cmd_predict(args) -> int:
    from . import jobs
    from .core.inference import engine
    from .core.io import raster_io
    from .core.model.stages import parse_stage_names
    from .core.inference.tiling import check_window
    # Cheap checks first: parameters, every input, then the model, before any compute.
    stages = [s for s in args.stages.split(",") if s]
    check_window(args.window or 256, args.overlap)
    stages = parse_stage_names(stages)
    for path in args.inputs:
        raster_io.check_input_exists(path)
    stems = [Path(p).stem for p in args.inputs]
    if len(set(stems)) != len(stems):
        raise ValueError("two inputs share a file name stem; their outputs would overwrite each other")
    model_path = jobs.resolve_model(args.model, args.runtime, args.device, ConsoleReporter(args.quiet))
    outputs = [Path(args.out_dir) / f"{stem}_probability.tif" for stem in stems]
    raster_io.refuse_overwriting_inputs(outputs + [engine.stage_path(o, None, n) for o in outputs for n in stages],
                                        [*args.inputs, model_path])
    model = jobs.load_model(model_path, None, args.runtime, args.device, stages)
    for path in args.inputs:  # the model's channel recipe says which bands each input must have
        raster_io.RasterInput(path, band_numbers=args.bands, dn_offset=args.dn_offset, recipe=model.recipe).close()
    options = dict(window=args.window, overlap=args.overlap, batch_size=args.batch_size, device=args.device,
                   stages=stages, stage_mode=args.stage_mode, runtime=args.runtime, threads=args.threads,
                   precision=args.precision, tta=args.tta)
    reporter = ConsoleReporter(args.quiet)
    summary = []
    for path, output in zip(args.inputs, outputs):
        result = jobs.extract({"input": path, "output": str(output), "model": str(model_path),
                               "bands": args.bands, "dn_offset": args.dn_offset, "options": options}, reporter)
        summary.append({"input": path, **{k: result[k] for k in ("probability", "stages", "device", "windows",
                                                                  "windows_run", "batch_size", "seconds")}})
    print(json.dumps(summary, indent=2))
    return 0


def cmd_export(args) -> int:
    from .core.model import checkpoint
    from .core.inference.export import check_against_torch, check_input, ensure_onnx, export
    from .core.inference.runtimes import read_onnx_model
    from . import jobs
    model_path = jobs.resolve_model(args.model, runtime="torch")
    if model_path.suffix.lower() == ".onnx":
        raise ValueError(f"{model_path.name} is already an ONNX model: export needs a .pt checkpoint")
    bundle = checkpoint.load(model_path)
    need = "stages" if args.stages else "probability"
    if args.out:
        out = Path(args.out)
        if out.suffix != ".onnx":
            raise ValueError(f"--out {out.name} must end in .onnx")
        export(bundle, out, need)
        model = read_onnx_model(out)
        diff = check_against_torch(bundle, model, check_input(bundle, bundle.window_size))
    else:
        model = ensure_onnx(bundle, need, ConsoleReporter())
        diff = None
    print(json.dumps({"onnx": model.path, "outputs": model.outputs, "checked_max_difference": diff}, indent=2))
    return 0


def cmd_batch(args) -> int:
    from .batch import BatchOptions, run_batch
    try:
        resources = {k.strip(): float(v) for k, v in (p.split("=") for p in args.resources.split(",") if p)}
    except ValueError:
        raise ValueError(f"--resources must look like GPU=1, got {args.resources!r}") from None
    engine_options = {"window": args.window, "overlap": args.overlap, "batch_size": args.batch_size,
                      "device": args.device, "stages": [s for s in args.stages.split(",") if s],
                      "stage_mode": args.stage_mode, "threads": args.threads, "runtime": args.runtime,
                      "precision": args.precision}
    if args.tta:  # only when asked: maps made before the option existed keep their result keys
        engine_options["tta"] = True
    options = BatchOptions(workers=args.workers, scheduler=args.scheduler, retries=args.retries, resources=resources,
                           engine_options=engine_options, band_numbers=args.bands, dn_offset=args.dn_offset,
                           progress=not args.no_progress)
    try:
        manifest = run_batch(args.inputs, args.out_dir, args.model, options)
    except KeyboardInterrupt:
        counts = _batch_counts(Path(args.out_dir))
        print(f"menet_qgis: cancelled ({counts}); finished outputs are kept, no partial files: "
              "run the same command again to resume", file=sys.stderr)
        return 130
    print(manifest.table())
    counts = manifest.counts()
    print(f"{len(manifest.records)} scenes: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) +
          f"; summary {manifest.csv_path}, manifest {manifest.json_path}", file=sys.stderr)
    return 1 if counts.get("failed") else 0


def _batch_counts(out_dir: Path) -> str:
    try:
        counts = json.loads((out_dir / "batch_manifest.json").read_text())["counts"]
        return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    except (OSError, ValueError, KeyError):
        return "no scene finished"


def cmd_train(args) -> int:
    from . import jobs
    result = jobs.train({"tiles": args.tiles, "output": args.out, "epochs": args.epochs,
                         "batch_size": args.batch_size, "lr": args.lr, "val_fraction": args.val_fraction,
                         "seed": args.seed, "device": args.device, "imagenet_weights": args.imagenet_weights,
                         "history": args.history, "recipe": args.recipe, "init_from": args.init_from,
                         "val_groups": args.val_groups, "holdout_groups": args.holdout,
                         "val_names_from": args.val_names_from, "resume": args.resume, "threads": args.threads,
                         "boundary_weight": args.boundary_weight, "refine_width": args.refine_width},
                        ConsoleReporter())
    print(json.dumps({"checkpoint": result["checkpoint"], "best": result["best"]}, indent=2))
    return 0


def cmd_prepare(args) -> int:
    from . import jobs
    result = jobs.prepare({"folder": args.folder, "output": args.out, "bounds": args.bounds,
                           "resampling": args.resampling}, ConsoleReporter())
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
    result = jobs.assess(params, ConsoleReporter(quiet=True))
    print(json.dumps(result["results"], indent=2))
    return 0


def cmd_worker(args) -> int:
    from .engine_process import main as worker_main
    return worker_main()


def cmd_install_deps(args) -> int:
    from . import environment_installer
    result = environment_installer.install_environment(
        args.variant, env_dir=args.env_dir, base_python=args.python, wheel_folder=args.wheel_folder,
        index_url=args.index_url, system_site_packages=args.system_site_packages, fresh=args.fresh,
        reporter=ConsoleReporter())
    print(json.dumps({"python": str(result.python), "variant": result.variant,
                      "already_installed": result.already_installed, "versions": result.verification.versions,
                      "torch_device": result.verification.torch_device,
                      "seconds": round(result.seconds, 1)}, indent=2))
    return 0


def cmd_install_model(args) -> int:
    from . import model_store
    if args.list and not args.source:
        print("\n".join(_store_listing()))
        return 0
    installed = model_store.install_model(args.source or model_store.default_model_url(), name=args.name,
                                          sha256=args.sha256, timeout=args.timeout, reporter=ConsoleReporter())
    if args.list:
        print("\n".join(_store_listing()))
    else:
        print(json.dumps({"model": str(installed.path), "sha256": installed.sha256, "bytes": installed.size,
                          "sha256_from": installed.sha256_from, "index": installed.entry}, indent=2))
    return 0


def _store_listing() -> List[str]:
    """The store's index, the rule, and the default model this Python's engine would take (runtime auto)."""
    from . import model_store
    found = model_store.find_default_model()
    return model_store.listing_lines() + [
        f"default model here (this Python, runtime auto): {found.why}" if found else
        f"default model here: none ({model_store.no_default_model_message()})"]


COMMANDS = {"stages": cmd_stages, "predict": cmd_predict, "export": cmd_export, "batch": cmd_batch,
            "prepare": cmd_prepare, "train": cmd_train, "assess": cmd_assess,
            "install-deps": cmd_install_deps, "install-model": cmd_install_model, "worker": cmd_worker}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "worker":  # speaks its own protocol, errors included
        return cmd_worker(args)
    from .core.termination import Terminated, raise_on_sigterm
    previous_sigterm = raise_on_sigterm()  # a terminated run discards its partial outputs like a cancelled one
    try:
        if args.command not in ("install-deps", "install-model"):  # these run on a bare Python (stdlib only)
            from .core.io.raster_io import limit_gdal_cache
            limit_gdal_cache()
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("menet_qgis: cancelled; no output was kept", file=sys.stderr)
        return 130
    except Terminated:
        print("menet_qgis: terminated; no output was kept", file=sys.stderr)
        return 143
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"menet_qgis: error: {message}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
