"""The mapping loop: read windows ahead -> channels + model through a runner -> blend + write.

Three kinds of threads keep the device busy and memory bounded:
* reader threads read windows ahead (rasterio, one dataset handle per thread);
* the calling thread runs each batch through a ``runtimes.Runner`` (torch on
  the CPU or a CUDA GPU, or an ONNX runtime on the CPU: the loop does not care
  which) and collects a batch's results only after launching the next one;
* one sink thread blends window results into row strips
  (``tiling.StripStitcher``) and writes every finished strip straight to disk,
  so memory depends on the window size and the raster's width, never on its
  height.

``extract`` reads top to bottom: check the options, open the runner, check the
outputs, log the plan, map the windows, commit every output or none.
"""
from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import runtimes
from ..files import InputError, refuse_overwriting_inputs, remove_stale_partials, stage_path
from ..io import clouds
from ..io.raster_io import (Area, AtomicRaster, MaskSource, RasterInput, check_free_space, check_plausible_values,
                            check_writable, commit_all)
from ..model.stages import STAGE_BY_NAME, parse_stage_names
from ..reporting import Cancelled, Reporter
from .tiling import CroppedSink, StripStitcher, WindowGrid, stitch_batch
from ...options import ENGINE, default_of

STAGE_MODES = ("compact", "all")
#: Seconds between "windows done, rate, time left" log lines during a run.
PROGRESS_LOG_SECONDS = 30.0
COMPACT_BANDS = ("mean activation", "max activation", "std of activations")
#: Probability rasters carry the model's decision threshold (chosen on validation), so whatever
#: thresholds the map later (Assess accuracy, the example model, a user) can use the model's own.
THRESHOLD_TAG = "MENET_THRESHOLD"
#: Tag of a probability some of whose pixels were masked (no ground evidence): the one-line summary.
MASKED_TAG = "MENET_MASKED"
CLOUD_MASKS = ("auto", "scl", "detector", "off")


@dataclass
class EngineOptions:
    """The engine's options; what each means and its default: options.ENGINE (declared once for every front end)."""
    window: int = default_of(ENGINE, "window")              # 0 = the window size the checkpoint recommends
    overlap: int = default_of(ENGINE, "overlap")
    batch_size: int = default_of(ENGINE, "batch_size")      # 0 = automatic for the device
    device: str = default_of(ENGINE, "device")
    stages: Sequence[str] = default_of(ENGINE, "stages")
    stage_mode: str = default_of(ENGINE, "stage_mode")      # "compact" (3 summary bands) or "all" channels
    readers: int = 0               # reader threads; 0 = automatic (2 on the CPU, up to 8 with CUDA); not user-facing
    threads: int = default_of(ENGINE, "threads")            # 0 = every core this process may use
    precision: str = default_of(ENGINE, "precision")
    runtime: str = default_of(ENGINE, "runtime")            # see runtimes.choose_runtime
    tta: bool = default_of(ENGINE, "tta")                   # test-time flips: mean over the 8 flips of each window
    cloud_mask: str = default_of(ENGINE, "cloud_mask")      # auto | scl | detector | off (see open_mask)
    mask_layer: Optional[str] = default_of(ENGINE, "mask_layer")  # a user's mask: raster (nonzero) or polygons
    scl: Optional[str] = None      # a scene classification raster for the input (GDAL name); not user-facing


@dataclass
class ExtractionResult:
    probability: Path
    stages: Dict[str, Path] = field(default_factory=dict)
    device: str = ""
    windows: int = 0
    windows_run: int = 0
    batch_size: int = 0
    seconds: float = 0.0
    quality: Optional[Path] = None                      # the quality layer (codes: core/io/clouds.py)
    quality_counts: Dict[int, int] = field(default_factory=dict)  # pixels per quality code
    masked_summary: str = ""                            # "23 % cloud or shadow: left as no-data"
    masked_pixels: int = 0                              # masked for a reason other than no data


class SinkThread:
    """Owns the output rasters: every GDAL write call happens on this thread."""

    def __init__(self, max_pending: int = 4):
        self.jobs: "queue.Queue" = queue.Queue(maxsize=max_pending)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="menet-sink", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is None:
                try:
                    job()
                except BaseException as exc:  # reported to the main thread
                    self.error = exc

    def submit(self, job: Callable[[], None]) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def close(self) -> None:
        """Finish queued jobs; re-raise the first error a job hit."""
        self.stop()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()


# --- the outputs: written on one thread, committed together ------------------------------------
class OutputRasters:
    """The probability and stage rasters of one run and their strip blenders.  Every GDAL call happens on the
    sink thread: they are opened there, fed blended strips, and committed together or all discarded."""

    def __init__(self, bundle, source: RasterInput, grid: WindowGrid, context: Area, output: Path,
                 stage_files: Dict[str, Path], stage_mode: str, mask: Optional[MaskSource] = None,
                 quality: Optional[Path] = None):
        self.sink = SinkThread()
        self.stitchers: Dict[str, StripStitcher] = {}
        self.created: List[AtomicRaster] = []
        self.masking: Optional[MaskingSink] = None
        self.sink.submit(lambda: self._open(bundle, source, grid, context, output, stage_files, stage_mode,
                                            mask, quality))

    def _open(self, bundle, source, grid, context, output, stage_files, stage_mode, mask, quality) -> None:
        prob = AtomicRaster(output, source.width, source.height, 1, source.crs, source.area_transform(),
                            ["mangrove probability"], tags={**source.plan.tags, THRESHOLD_TAG: f"{bundle.threshold:g}"})
        self.created.append(prob)
        target = prob
        if mask is not None:
            codes = AtomicRaster(quality, source.width, source.height, 1, source.crs, source.area_transform(),
                                 ["quality: why a pixel has no probability"], nodata=None, dtype="uint8",
                                 tags={clouds.QUALITY_TAG: clouds.quality_legend()})
            self.created.append(codes)
            codes.ds.write_colormap(1, clouds.QUALITY_COLOURS)
            target = self.masking = MaskingSink(prob, codes, mask, source.area)
        self.stitchers["probability"] = StripStitcher(cropped(target, source.area, context, 1), 1, 1, grid)
        for name, path in stage_files.items():
            st = STAGE_BY_NAME[name]
            count = st.channels if stage_mode == "all" else len(COMPACT_BANDS)
            desc = ([f"{name} channel {i}" for i in range(count)] if stage_mode == "all"
                    else [f"{name} {b}" for b in COMPACT_BANDS])
            box = stage_box(source.area, context, st.stride)
            raster = AtomicRaster(path, box.width, box.height, count, source.crs,
                                  source.area_transform(st.stride, box.row_off, box.col_off), desc,
                                  tags=source.plan.tags)
            self.created.append(raster)
            self.stitchers[name] = StripStitcher(cropped(raster, source.area, context, st.stride), count,
                                                 st.stride, grid)

    def add(self, batch, outputs) -> None:
        """Queue one batch's results for blending (brought to the host here, on the calling thread)."""
        host = {k: v if isinstance(v, np.ndarray) else v.cpu().numpy() for k, v in outputs.items()}
        self.sink.submit(lambda: stitch_batch(self.stitchers, batch, host))

    def commit(self) -> None:
        """Write the strips' last rows, then rename every output into place (or none: ``commit_all``)."""
        self.sink.submit(lambda: [s.flush_until() for s in self.stitchers.values()])
        if self.masking is not None:
            self.sink.submit(self.masking.tag)
        self.sink.submit(lambda: commit_all(self.created))
        self.sink.close()

    def discard(self) -> None:
        self.sink.stop()  # the sink thread has ended: its rasters can be discarded from here
        for raster in self.created:
            raster.discard()


class MaskingSink:
    """Between the probability's stitcher and its raster: every finished block of rows gets NaN wherever its
    pixels have no ground evidence (``MaskSource.quality``), and the codes go to the quality layer.  Masking
    happens on the model's output only, so the probability of every unmasked pixel is as without masking."""

    def __init__(self, probability: AtomicRaster, codes: AtomicRaster, mask: MaskSource, area: Area):
        self.probability, self.codes, self.mask, self.area = probability, codes, mask, area
        self.counts: Dict[int, int] = {code: 0 for code in clouds.QUALITY_NAMES}
        self.newly_masked = 0  # pixels with a probability that masking turned into no-data

    def write_rows(self, row0: int, block: np.ndarray) -> None:
        rows, width = block.shape[1], block.shape[2]
        quality = self.mask.quality(self.area.row_off + row0, self.area.col_off, rows, width)
        masked = quality != clouds.CLEAR
        self.newly_masked += int((masked & ~np.isnan(block[0])).sum())
        block[0][masked] = np.nan
        clouds.add_counts(self.counts, clouds.code_counts(quality))
        self.probability.write_rows(row0, block)
        self.codes.write_rows(row0, quality[None])

    def summary(self) -> str:
        return clouds.masked_summary(self.counts)

    def tag(self) -> None:
        """The masked share in the probability's tags, where masking changed it (so a map with nothing
        masked stays byte-identical to one made without masking)."""
        if self.newly_masked:
            self.probability.ds.update_tags(**{MASKED_TAG: self.summary()})


def stage_box(area: Area, context: Area, stride: int) -> Area:
    """The whole stage pixels (of ``stride`` input px, on the grid of the context's corner) covering ``area``,
    in input pixels; for a whole-raster run (context = area) the stage raster of the area as before."""
    top, left = (area.row_off - context.row_off) // stride, (area.col_off - context.col_off) // stride
    bottom = min(-(-(area.row_off + area.height - context.row_off) // stride), -(-context.height // stride))
    right = min(-(-(area.col_off + area.width - context.col_off) // stride), -(-context.width // stride))
    return Area(context.row_off + top * stride, context.col_off + left * stride, bottom - top, right - left)


def cropped(raster: AtomicRaster, area: Area, context: Area, stride: int):
    """``raster`` itself when the context is the area (a whole-raster run), else the part of the context's
    rows and columns that ``raster`` covers (``CroppedSink``)."""
    if context == area:
        return raster
    box = stage_box(area, context, stride)
    return CroppedSink(raster, (box.row_off - context.row_off) // stride, (box.col_off - context.col_off) // stride,
                       box.height, box.width)


# --- the engine -----------------------------------------------------------------
def extract(bundle, source: RasterInput, output, options: EngineOptions = EngineOptions(),
            reporter: Reporter = Reporter(), stage_dir=None) -> ExtractionResult:
    """Run the model over ``source`` and write the probability (and stage) GeoTIFFs.

    ``bundle`` is a ``checkpoint.ModelBundle`` (any runtime; the ONNX runtimes
    export it once) or an ``onnx_model.OnnxModel`` (onnxruntime/openvino, no torch)."""
    source.use_recipe(bundle.recipe)  # the bands this model's channel recipe reads
    pixel_warnings = source.check_mappable()  # too thin or too coarse: refused before anything is opened
    output = check_writable(output)
    stages = parse_stage_names(options.stages)
    grid, context = window_grid(bundle, source, options)
    mask = open_mask(source, options, reporter)  # a bad mask layer is refused before the model loads
    runner = runtimes.open_runner(bundle, options, stages, reporter)
    batch_size = options.batch_size or runner.auto_batch_size(grid.window)
    runner.prepare(batch_size, grid.window)
    t0 = time.perf_counter()  # windows/s counts the mapping, not a one-time export or compile
    stage_files = {name: check_writable(stage_path(output, stage_dir, name)) for name in stages}
    for message in pixel_warnings:
        reporter.warn(message)
    check_outputs(bundle, source, output, stage_files, options.stage_mode, reporter)
    quality = check_quality_output(output, mask, [source.path, bundle.path, options.mask_layer], reporter)
    log_plan(bundle, source, grid, context, runner, batch_size, options, stages, reporter)
    rasters = OutputRasters(bundle, source, grid, context, output, stage_files, options.stage_mode, mask, quality)
    try:
        run_count, batch_size = map_windows(source, grid, context, runner, batch_size, rasters, options.readers,
                                            reporter, t0, mask)
        rasters.commit()
    except BaseException:
        rasters.discard()
        source.close()
        if mask is not None:
            mask.close()
        raise
    source.close()
    seconds = time.perf_counter() - t0
    result = ExtractionResult(output, stage_files, runner.description, len(grid), run_count, batch_size, seconds)
    if mask is not None:
        mask.close()
        result.quality, result.quality_counts = quality, dict(rasters.masking.counts)
        result.masked_summary = rasters.masking.summary()
        result.masked_pixels = clouds.evidence_masked(result.quality_counts)
        reporter.info(f"pixels without ground evidence: {result.masked_summary} (why, per pixel: {quality.name})")
    if run_count == 0:
        reporter.warn("the input has no valid pixels in the processed area: the output is all no-data")
    reporter.info(f"ran the model on {run_count} of {len(grid)} windows (the rest hold only no-data"
                  f"{' or masked pixels' if mask is not None else ''}) "
                  f"in {seconds:.1f} s ({run_count / max(seconds, 1e-9):.2f} windows/s)")
    return result


def open_mask(source: RasterInput, options: EngineOptions, reporter: Reporter) -> Optional[MaskSource]:
    """The sources of the quality codes for this run (``options.cloud_mask``): ``scl`` = the scene
    classification (``options.scl`` or the input product's SCL; refused when there is none), ``detector`` =
    the spectral detector, ``auto`` = the SCL where the input has one, else the detector (where the input
    holds Sentinel-2 bands), ``off`` = no cloud masking; a mask layer the user gives applies with any of
    them (with ``off`` alone).  None (and a log line) when nothing masks."""
    choice = options.cloud_mask or "auto"
    if choice not in CLOUD_MASKS:
        raise ValueError(f"cloud mask must be one of {', '.join(CLOUD_MASKS)}, got {choice!r}")
    if choice == "off" and not options.mask_layer:
        reporter.info("cloud masking off: every pixel with data gets a probability, under clouds too")
        return None
    product = getattr(source, "product", None)
    scl = options.scl or (getattr(product, "scl", None) if product is not None else None)
    if choice == "scl" and not scl:
        raise InputError(f"{Path(source.path).name} has no scene classification (SCL: Sentinel-2 L2A products "
                         "have one): choose cloud mask auto or detector, or give a mask layer")
    use_scl = scl if choice in ("scl", "auto") else None  # off: the mask layer only
    detector = choice == "detector" or (choice == "auto" and not scl and source.plan.kind == "sentinel2")
    if choice == "auto" and detector:
        try:
            from ..io import cloud_detector  # noqa: F401
        except ImportError:
            detector = False
    if not (use_scl or detector or options.mask_layer):
        reporter.info("no cloud mask: the input has no scene classification and holds ready-made channels the "
                      "cloud detector cannot read; give a mask layer to leave clouds as no-data")
        return None
    mask = MaskSource(source, scl=use_scl, mask_layer=options.mask_layer or None, detector=detector)
    reporter.info(f"cloud mask: {mask.describe()}; pixels without ground evidence (cloud, shadow, cirrus, "
                  "defective, no data) are left as no-data")
    return mask


def check_quality_output(output: Path, mask: Optional[MaskSource], inputs, reporter: Reporter) -> Optional[Path]:
    """The quality layer's path once it can be written (None without masking)."""
    if mask is None:
        return None
    path = check_writable(clouds.quality_path(output))
    refuse_overwriting_inputs([path], [p for p in inputs if p])
    for stale in remove_stale_partials(path):
        reporter.info(f"removed {stale.name}: a partial output left by a run that no longer exists")
    return path


def window_grid(bundle, source: RasterInput, options: EngineOptions) -> Tuple[WindowGrid, Area]:
    """The windows over the context of ``source``'s processed area (``RasterInput.context_area``), once the
    options make sense (ValueError naming the bad one), and that context."""
    if options.stage_mode not in STAGE_MODES:
        raise ValueError(f"stage mode must be one of {', '.join(STAGE_MODES)}")
    if options.batch_size < 0:
        raise ValueError(f"batch size must be 0 (automatic) or positive, got {options.batch_size}")
    grid = WindowGrid(source.height, source.width, options.window or bundle.window_size, options.overlap)
    if options.threads < 0:
        raise ValueError(f"threads must be 0 (automatic) or positive, got {options.threads}")
    context = source.context_area(grid.window, grid.overlap)
    if context != source.area:
        grid = WindowGrid(context.height, context.width, grid.window, grid.overlap)
    return grid, context


def log_plan(bundle, source: RasterInput, grid: WindowGrid, context: Area, runner, batch_size: int,
             options: EngineOptions, stages: Sequence[str], reporter: Reporter) -> None:
    """What is about to run, on what and why: the log is all a long run shows."""
    reporter.info(f"input: {source.path} ({source.full_width} x {source.full_height} px, {source.crs.to_string()})")
    product = getattr(source, "product", None)
    if product is not None:
        scl = str(product.scl).replace("\\", "/").rsplit("/", 1)[-1] if product.scl else "none"
        (reporter.warn if product.level == "L1C" else reporter.info)(
            f"Sentinel-2 product {product.describe()}; scene classification: {scl}")
    reporter.info(f"input bands: {source.plan.describe()}")
    reporter.info(f"model: {bundle.path or 'in memory'} — {bundle.training.get('note', '')}".rstrip(" —"))
    reporter.info(f"mangrove threshold of this model: {bundle.threshold:g} (stored in the probability as {THRESHOLD_TAG})")
    reporter.info(f"runtime: {runner.runtime} ({runner.why})")
    reporter.info(f"device: {runner.description}")
    if context != source.area:
        reporter.info(f"extent: {source.width} x {source.height} px, mapped from the whole raster's windows that "
                      f"touch it ({context.width} x {context.height} px read), as in a run over the whole raster")
    reporter.info(f"windows: {len(grid)} of {grid.window}² px, overlap {grid.overlap} px, batch size {batch_size}")
    if stages:
        size = estimate_stage_bytes(source.width, source.height, stages, options.stage_mode)
        reporter.info(f"stage layers {', '.join(stages)} ({options.stage_mode}): about {size / 2**20:.1f} MiB uncompressed")
    if options.tta:
        reporter.info("test-time flips: each window's probability is the mean over its 8 flips/rotations "
                      "(8x the model's time)")
    reporter.info(f"precision {runner.precision}: {runner.precision_why}")


def estimate_stage_bytes(width: int, height: int, stages: Sequence[str], mode: str) -> int:
    total = 0
    for name in stages:
        st = STAGE_BY_NAME[name]
        bands = st.channels if mode == "all" else len(COMPACT_BANDS)
        total += math.ceil(width / st.stride) * math.ceil(height / st.stride) * bands * 4
    return total


def check_outputs(bundle, source: RasterInput, output: Path, stage_files: Dict[str, Path], stage_mode: str,
                  reporter: Reporter) -> None:
    """Before any compute: no output may replace an input, the values must make sense,
    the outputs must fit on their disks; partial files of killed earlier runs are removed."""
    refuse_overwriting_inputs([output, *stage_files.values()], [source.path, bundle.path])
    for message in source.plan.warnings:
        reporter.warn(message)
    check_plausible_values(source, reporter.warn)
    needs = {output: source.width * source.height * 4}
    for name, path in stage_files.items():
        needs[path] = estimate_stage_bytes(source.width, source.height, [name], stage_mode)
    check_free_space(needs, reporter.warn, "probability and stage layers" if stage_files else "probability")
    for path in needs:
        for stale in remove_stale_partials(path):
            reporter.info(f"removed {stale.name}: a partial output left by a run that no longer exists")


# --- the pipelined loop ----------------------------------------------------------
def map_windows(source: RasterInput, grid: WindowGrid, context: Area, runner, batch_size: int,
                rasters: "OutputRasters", readers: int, reporter: Reporter, t0: float,
                mask: Optional[MaskSource] = None) -> Tuple[int, int]:
    """Every window of ``grid`` in row-major order through ``runner`` into ``rasters``; windows of pure no-data
    are skipped, not run, and so are windows whose every pixel is masked (``mask``).  A batch's results are collected only after the next batch is launched, so the
    device works meanwhile.  Returns (windows run, the batch size in the end: out of GPU memory halves it)."""
    total, done, run_count = len(grid), 0, 0
    in_flight = None  # (batch, outputs): collected after the next batch is launched
    last_log = time.perf_counter()
    with ReadAhead(source, grid, context, reader_count(readers, runner.device_type), mask) as reads:
        while done < total:
            batch, consumed = reads.next_batch(batch_size)
            done += consumed
            if batch:
                run_count += len(batch)
                outputs, batch_size = runner.run(batch, source.plan, batch_size, reporter)
                if in_flight is not None:
                    rasters.add(*in_flight)  # the device works on this batch meanwhile
                in_flight = (batch, outputs)
            reporter.progress(100.0 * done / total)
            last_log = _log_rate(reporter, t0, last_log, done, total)
            if reporter.cancelled():
                raise Cancelled("cancelled by the user")
        if in_flight is not None:
            rasters.add(*in_flight)
    return run_count, batch_size


class ReadAhead:
    """Reads the grid's windows in order on reader threads, up to two batches ahead of the model."""

    def __init__(self, source: RasterInput, grid: WindowGrid, context: Area, workers: int,
                 mask: Optional[MaskSource] = None):
        self.source, self.window, self.windows, self.context = source, grid.window, list(grid), context
        self.mask = mask
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="menet-read")
        self.pending: deque = deque()
        self.next_read = 0

    def next_batch(self, size: int) -> Tuple[List, int]:
        """Up to ``size`` windows holding valid pixels [(y0, x0, data, valid), ...] and how many windows
        were consumed to find them (all-no-data ones included)."""
        while self.next_read < len(self.windows) and len(self.pending) < 2 * size:
            _, y0, x0 = self.windows[self.next_read]
            self.pending.append((y0, x0, self.pool.submit(self._read, y0, x0)))
            self.next_read += 1
        batch, consumed = [], 0
        while self.pending and len(batch) < size:
            y0, x0, fut = self.pending.popleft()
            data, valid, evidence = fut.result()
            consumed += 1
            if evidence:  # windows of pure no-data (or all masked) are skipped, not run
                batch.append((y0, x0, data, valid))
        return batch, consumed

    def _read(self, y0: int, x0: int):
        """A window's values, validity, and whether any of its pixels has ground evidence (valid and, with a
        mask, clear): the model runs only on windows that have."""
        data, valid = self.source.read(y0, x0, self.window, self.context)
        evidence = bool(valid.any())
        if evidence and self.mask is not None:
            h, w = min(self.window, self.context.height - y0), min(self.window, self.context.width - x0)
            quality = self.mask.quality(self.context.row_off + y0, self.context.col_off + x0, h, w)
            evidence = bool((quality == clouds.CLEAR).any())
        return data, valid, evidence

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)


def _log_rate(reporter: Reporter, t0: float, last_log: float, done: int, total: int) -> float:
    """Every PROGRESS_LOG_SECONDS: windows done, rate and time left (the log is all a long run shows)."""
    now = time.perf_counter()
    if now - last_log < PROGRESS_LOG_SECONDS or done >= total:
        return last_log
    rate = done / max(now - t0, 1e-9)
    reporter.info(f"{done} of {total} windows ({100.0 * done / total:.0f} %), {rate:.2f} windows/s, "
                  f"about {(total - done) / max(rate, 1e-9):.0f} s left")
    return now


def reader_count(requested: int, device_type: str) -> int:
    """Reader threads: enough to feed a GPU, few enough not to starve the runtime's CPU threads."""
    if requested > 0:
        return requested
    return min(8, os.cpu_count() or 2) if device_type == "cuda" else 2
