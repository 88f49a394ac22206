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
from typing import Dict, List, Optional, Sequence, Tuple

from . import options
from .core.model.stages import stage_table
from .core.reporting import ConsoleReporter
from .resources import DEFAULT_MODEL_BASE
from .version import version


def _positional(name: str, **kwargs) -> Tuple[str, Dict]:
    return name, kwargs


#: command -> (help, positional arguments, option groups): the parser is generated from this table and
#: the declarations in options.py, so predict, batch and the Processing dialogs share every option.
SUBCOMMANDS: Dict[str, Tuple[str, List[Tuple[str, Dict]], List[Sequence[options.Option]]]] = {
    "stages": ("print the ResNet-101 stage table", [], [options.STAGE_TABLE]),
    "predict": ("mangrove probability (and stage layers) for rasters",
                [_positional("inputs", nargs="+",
                             help="input rasters (Sentinel-2 bands or an 11-band ME-Net stack)")],
                [options.PREDICT, options.ENGINE, options.INPUT]),
    "train": ("train ME-Net on labelled windows; writes a checkpoint", [], [options.TRAIN]),
    "export": ("export a checkpoint to ONNX (runs without torch; needs torch to make)",
               [_positional("model", nargs="?", help=f"checkpoint (.pt; default: {DEFAULT_MODEL_BASE}.pt from the "
                            "model store, else the plugin's)")],
               [options.EXPORT]),
    "prepare": ("6-band 10 m stack from a Sentinel-2 product, or the composite of the clear observations of "
                "several dates (with a band counting them)",
                [_positional("folder", nargs="+", help="a .SAFE folder or a folder of per-band files (..._B02_10m.jp2, "
                             "...); or two or more dates of one area to composite (products or 6-band rasters)"),
                 _positional("out", help="output GeoTIFF")],
                [options.PREPARE]),
    "batch": ("many scenes on Dask distributed: resumable, retried, COG outputs",
              [_positional("inputs", nargs="+", help="rasters, globs ('scenes/*.tif'), manifest CSVs (path[,date,"
                           "region,name,bands,dn_offset]) or STAC JSON (ItemCollection, Item, static catalog)")],
              [(options.MODEL,), options.BATCH, options.ENGINE, options.INPUT]),
    "stac-map": ("search a STAC API for Sentinel-2 L2A over an area and dates, composite the clear observations "
                 "(read over HTTP, the area's windows only) and map the composite",
                 [], [options.STAC, (options.MODEL,), options.ENGINE]),
    "assess": ("accuracy of a map against a reference, next to MVI and random forest",
               [_positional("prediction", nargs="?", help="probability or 0/1 mask raster")], [options.ASSESS]),
    "install-deps": ("create/update the managed Python environment the worker runs in", [],
                     [options.INSTALL_DEPS]),
    "install-model": ("download or copy a model, verify its sha256, store it in the model store "
                      "(MENET_HOME/models); --list shows the store",
                      [_positional("source", nargs="?", help=f"URL or file, e.g. dist/{DEFAULT_MODEL_BASE}.onnx "
                                   "(default: the MENET_MODEL_URL environment variable)")],
                      [options.INSTALL_MODEL]),
    "worker": ("run one job read as JSON from stdin, speaking JSON lines on stdout (what the QGIS algorithms "
               "start; see menet_qgis/engine_process.py)", [], []),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m menet_qgis", description="ME-Net mangrove extraction")
    parser.add_argument("--version", action="version", version=f"menet_qgis {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, (help_text, positionals, groups) in SUBCOMMANDS.items():
        command_parser = sub.add_parser(command, help=help_text)
        for name, kwargs in positionals:
            command_parser.add_argument(name, **kwargs)
        for group in groups:
            options.add_arguments(command_parser, group, front="cli")
    return parser


def cmd_stages(args) -> int:
    print(stage_table(args.window))
    return 0


def cmd_predict(args) -> int:
    from . import jobs
    from .core import files
    from .core.io import raster_io
    from .core.model.stages import check_window, parse_stage_names
    # Cheap checks first: parameters, every input, then the model, before any compute.
    check_window(args.window or 256, args.overlap)
    stages = parse_stage_names(args.stages)
    for path in args.inputs:
        raster_io.check_input_exists(path)
    stems = [raster_io.input_stem(p) for p in args.inputs]  # a product's name for its folder/zip/xml/subdataset
    if len(set(stems)) != len(stems):
        raise ValueError("two inputs share a file name stem; their outputs would overwrite each other")
    model_path = jobs.resolve_model(args.model, args.runtime, args.device, ConsoleReporter(args.quiet))
    outputs = [Path(args.out_dir) / f"{stem}_probability.tif" for stem in stems]
    files.refuse_overwriting_inputs(outputs + [files.stage_path(o, None, n) for o in outputs for n in stages],
                                    [*args.inputs, model_path])
    recipe = jobs.recorded_recipe(model_path)
    for path in args.inputs:  # the model's channel recipe says which bands each input must have
        raster_io.RasterInput(path, band_numbers=args.bands, dn_offset=args.dn_offset, recipe=recipe).close()
    jobs.load_model(model_path, None, args.runtime, args.device, stages)  # once, before the first input
    engine_options = dict(options.values(args, options.ENGINE), stages=stages)
    reporter = ConsoleReporter(args.quiet)
    summary = []
    for path, output in zip(args.inputs, outputs):
        result = jobs.extract({"input": path, "output": str(output), "model": str(model_path),
                               "bands": args.bands, "dn_offset": args.dn_offset, "options": engine_options}, reporter)
        summary.append({"input": path, **{k: result[k] for k in ("probability", "stages", "device", "windows",
                                                                  "windows_run", "batch_size", "seconds")}})
    print(json.dumps(summary, indent=2))
    return 0


def cmd_export(args) -> int:
    from .core.model import checkpoint
    from .core.inference.export import export
    from .core.inference.runtimes import check_against_torch, check_input, ensure_onnx, read_onnx_model
    from . import jobs
    model_path = jobs.resolve_model(args.model, runtime="torch")
    if model_path.suffix.lower() == ".onnx":
        raise ValueError(f"{model_path.name} is already an ONNX model: export needs a .pt checkpoint")
    bundle = checkpoint.load(model_path)
    need = "stages" if args.stages else "probability"
    if args.output:
        out = Path(args.output)
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
    engine_options = options.values(args, options.ENGINE)
    if not args.tta:  # only when asked: maps made before the option existed keep their result keys
        del engine_options["tta"]
    batch_options = BatchOptions(workers=args.workers, scheduler=args.scheduler, retries=args.retries,
                                 resources=resources, engine_options=engine_options, band_numbers=args.bands,
                                 dn_offset=args.dn_offset, data_root=args.data_root,
                                 progress=not args.no_progress)
    try:
        manifest = run_batch(args.inputs, args.out_dir, args.model, batch_options)
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
    result = jobs.train(options.values(args, options.TRAIN), ConsoleReporter())
    print(json.dumps({"checkpoint": result["checkpoint"], "best": result["best"]}, indent=2))
    return 0


def cmd_prepare(args) -> int:
    from . import jobs
    result = jobs.prepare(dict(options.values(args, options.PREPARE), dates=args.folder, output=args.out),
                          ConsoleReporter())
    print(json.dumps(result, indent=2))
    return 0


def cmd_stac_map(args) -> int:
    from . import jobs
    engine_options = options.values(args, options.ENGINE)
    params = dict(options.values(args, options.STAC), model=args.model, options=engine_options)
    result = jobs.stac_map(params, ConsoleReporter())
    print(json.dumps({k: result[k] for k in ("probability", "composite", "items", "dates", "never_clear", "device",
                                             "seconds")}, indent=2))
    return 0


def cmd_assess(args) -> int:
    from . import jobs
    params = dict(options.values(args, options.ASSESS), prediction=args.prediction)
    del params["reference"]  # a raster or a polygon file: which job key, below
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
                                          sha256=args.sha256, timeout=args.timeout, allow_http=args.allow_http,
                                          reporter=ConsoleReporter())
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
            "prepare": cmd_prepare, "train": cmd_train, "stac-map": cmd_stac_map, "assess": cmd_assess,
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
