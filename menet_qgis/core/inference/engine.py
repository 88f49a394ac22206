"""Windowed inference: read ahead -> channels + model on the device -> stitch + write.

Three kinds of threads keep the device busy and memory bounded:
* reader threads read windows ahead (rasterio, one dataset handle per thread);
* the calling thread builds channels and runs the model through a runner:
  torch (channels on the device, inference mode, channels_last; bf16 autocast
  on CUDA, fp32 on the CPU) or an ONNX runtime on the CPU (OpenVINO or ONNX
  Runtime, channels in numpy; see ``runtimes.py``) — torch is imported only
  when torch runs;
* one sink thread blends window results into row strips and writes every
  finished strip straight to disk (so memory depends on the window size and
  the raster's width, never on its height).

``predict_reference`` is the plain single-threaded batch-1 path with
whole-raster accumulators; tests check the engine against it.
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
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from . import runtimes
from ..reporting import Cancelled, Reporter
from ..model.channels import compute_channels
from ..model.flips import mean_over_flips
from ..io.raster_io import (AtomicRaster, RasterInput, check_free_space, check_plausible_values, check_writable,
                            commit_all, refuse_overwriting_inputs, remove_stale_partials)
from ..model.stages import STAGE_BY_NAME, parse_stage_names
from .tiling import WindowGrid, blend_weights
from ...options import ENGINE, by_name

STAGE_MODES = ("compact", "all")


def __getattr__(name):
    """``engine.ModelBundle`` without importing torch until someone asks for it."""
    if name == "ModelBundle":
        from ..model.checkpoint import ModelBundle
        return ModelBundle
    raise AttributeError(name)
#: Seconds between "windows done, rate, time left" log lines during a run.
PROGRESS_LOG_SECONDS = 30.0
COMPACT_BANDS = ("mean activation", "max activation", "std of activations")


def _declared(name: str):
    return by_name(ENGINE, name).default


@dataclass
class EngineOptions:
    """The engine's options; what each means and its default: options.ENGINE (declared once for every front end)."""
    window: int = _declared("window")              # 0 = the window size the checkpoint recommends
    overlap: int = _declared("overlap")
    batch_size: int = _declared("batch_size")      # 0 = automatic for the device
    device: str = _declared("device")
    stages: Sequence[str] = _declared("stages")
    stage_mode: str = _declared("stage_mode")      # "compact" (3 summary bands) or "all" channels
    readers: int = 0               # reader threads; 0 = automatic (2 on the CPU, up to 8 with CUDA); not user-facing
    threads: int = _declared("threads")            # 0 = every core this process may use
    precision: str = _declared("precision")
    runtime: str = _declared("runtime")            # see runtimes.choose_runtime
    tta: bool = _declared("tta")                   # test-time flips: mean over the 8 flips of each window


@dataclass
class ExtractionResult:
    probability: Path
    stages: Dict[str, Path] = field(default_factory=dict)
    device: str = ""
    windows: int = 0
    windows_run: int = 0
    batch_size: int = 0
    seconds: float = 0.0


# --- turning raw windows into model input -------------------------------------
def prepare_batch(raw: "torch.Tensor", valid: "torch.Tensor", bundle, plan) -> "torch.Tensor":
    """(N, bands, H, W) raw values + (N, H, W) validity -> normalised (N, 11, H, W).

    Runs on whatever device ``raw`` is on.  Invalid pixels become exactly 0
    after normalisation (the training mean), so no-data never spreads as NaN.
    ``runtimes.prepare_batch_numpy`` is its numpy twin.
    """
    import torch
    x = raw
    if plan.kind == "sentinel2":
        x = compute_channels((x + plan.offset) * plan.scale, bundle.pca, bundle.recipe)
    mean = torch.as_tensor(bundle.norm_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(bundle.norm_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = (x - mean) / std
    x = torch.where(valid.unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def compact_stage(features: "torch.Tensor") -> "torch.Tensor":
    """(N, C, h, w) -> (N, 3, h, w): mean, max and standard deviation over channels."""
    import torch
    f = features.float()
    return torch.stack([f.mean(1), f.amax(1), f.std(1)], dim=1)


def pooled_valid(valid: np.ndarray, stride: int) -> np.ndarray:
    """A stage pixel is valid when any input pixel under it is."""
    if stride == 1:
        return valid
    h, w = valid.shape
    return valid.reshape(h // stride, stride, w // stride, stride).any(axis=(1, 3))


# --- stitching ----------------------------------------------------------------
class StripStitcher:
    """Blends window results for one output into a strip one window tall and
    writes rows as soon as no later window can touch them.

    Hand-written because no library blends overlapping windows into a
    streamed GeoTIFF; geoai and rasterio hold the whole raster in memory.
    """

    def __init__(self, sink: AtomicRaster, channels: int, stride: int, grid: WindowGrid):
        self.sink, self.stride, self.channels = sink, stride, channels
        self.size = grid.window // stride
        self.weights = blend_weights(self.size, grid.overlap // stride)
        self.out_h = math.ceil(grid.height / stride)
        self.out_w = math.ceil(grid.width / stride)
        strip_w = (grid.col_origins[-1] + grid.window) // stride
        self.acc = np.zeros((channels, self.size, strip_w), np.float32)
        self.wsum = np.zeros((self.size, strip_w), np.float32)
        self.valid = np.zeros((self.size, strip_w), bool)
        self.top = 0  # output row held by strip row 0

    def add(self, y0: int, x0: int, values: np.ndarray, valid: np.ndarray) -> None:
        """Blend one window in.  Windows arrive in row-major order, so rows above
        this window's top can no longer change: they are written first."""
        self.flush_until(y0)
        r, c, s = y0 // self.stride - self.top, x0 // self.stride, self.size
        self.acc[:, r:r + s, c:c + s] += values * self.weights
        self.wsum[r:r + s, c:c + s] += self.weights
        self.valid[r:r + s, c:c + s] |= valid

    def flush_until(self, row_end_px: Optional[int] = None) -> None:
        """Write and drop strip rows above input row ``row_end_px`` (all rows if None).
        Rows no window touched (skipped no-data windows) come out as no-data."""
        end = self.out_h if row_end_px is None else min(self.out_h, row_end_px // self.stride)
        while self.top < end:
            n = min(end - self.top, self.size)
            ok = self.valid[:n, :self.out_w] & (self.wsum[:n, :self.out_w] > 0)
            block = np.full((self.channels, n, self.out_w), np.nan, np.float32)
            np.divide(self.acc[:, :n, :self.out_w], np.maximum(self.wsum[:n, :self.out_w], 1e-12),
                      out=block, where=ok[None])
            self.sink.write_rows(self.top, block)
            for arr in (self.acc, self.wsum[None], self.valid[None]):
                arr[:, :self.size - n] = arr[:, n:].copy()
                arr[:, self.size - n:] = 0
            self.top += n


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


# --- the engine -----------------------------------------------------------------
def stage_path(probability_path: Path, stage_dir: Optional[Path], stage: str) -> Path:
    folder = Path(stage_dir) if stage_dir else probability_path.parent
    return folder / f"{probability_path.stem}_{stage}.tif"


def estimate_stage_bytes(width: int, height: int, stages: Sequence[str], mode: str) -> int:
    total = 0
    for name in stages:
        st = STAGE_BY_NAME[name]
        bands = st.channels if mode == "all" else len(COMPACT_BANDS)
        total += math.ceil(width / st.stride) * math.ceil(height / st.stride) * bands * 4
    return total


#: Probability rasters carry the model's decision threshold (chosen on validation), so whatever
#: thresholds the map later (Assess accuracy, the example model, a user) can use the model's own.
THRESHOLD_TAG = "MENET_THRESHOLD"


def extract(bundle, source: RasterInput, output, options: EngineOptions = EngineOptions(),
            reporter: Reporter = Reporter(), stage_dir=None) -> ExtractionResult:
    """Run the model over ``source`` and write the probability (and stage) GeoTIFFs.

    ``bundle`` is a ``checkpoint.ModelBundle`` (any runtime; the ONNX runtimes
    export it once) or a ``runtimes.OnnxModel`` (onnxruntime/openvino, no torch)."""
    t0 = time.perf_counter()
    source.use_recipe(bundle.recipe)  # the bands this model's channel recipe reads
    output = check_writable(output)
    stages = parse_stage_names(options.stages)
    if options.stage_mode not in STAGE_MODES:
        raise ValueError(f"stage mode must be one of {', '.join(STAGE_MODES)}")
    if options.batch_size < 0:
        raise ValueError(f"batch size must be 0 (automatic) or positive, got {options.batch_size}")
    window = options.window or bundle.window_size
    grid = WindowGrid(source.height, source.width, window, options.overlap)
    if options.threads < 0:
        raise ValueError(f"threads must be 0 (automatic) or positive, got {options.threads}")
    runner = open_runner(bundle, options, stages, reporter)
    device_text = runner.description
    batch_size = options.batch_size or runner.auto_batch_size(window)
    runner.prepare(batch_size, window)
    t0 = time.perf_counter()  # windows/s counts the mapping, not a one-time export or compile
    stage_files = {name: check_writable(stage_path(output, stage_dir, name)) for name in stages}
    check_outputs(bundle, source, grid, output, stage_files, options.stage_mode, reporter)

    reporter.info(f"input: {source.path} ({source.full_width} x {source.full_height} px, {source.crs.to_string()})")
    reporter.info(f"input bands: {source.plan.describe()}")
    reporter.info(f"model: {bundle.path or 'in memory'} — {bundle.training.get('note', '')}".rstrip(" —"))
    reporter.info(f"mangrove threshold of this model: {bundle.threshold:g} (stored in the probability as {THRESHOLD_TAG})")
    reporter.info(f"runtime: {runner.runtime} ({runner.why})")
    reporter.info(f"device: {device_text}")
    reporter.info(f"windows: {len(grid)} of {grid.window}² px, overlap {grid.overlap} px, batch size {batch_size}")
    if stages:
        size = estimate_stage_bytes(grid.width, grid.height, stages, options.stage_mode)
        reporter.info(f"stage layers {', '.join(stages)} ({options.stage_mode}): about {size / 2**20:.1f} MiB uncompressed")

    if options.tta:
        reporter.info("test-time flips: each window's probability is the mean over its 8 flips/rotations "
                      "(8x the model's time)")
    reporter.info(f"precision {runner.precision}: {runner.precision_why}")
    sink = SinkThread()
    stitchers: Dict[str, StripStitcher] = {}
    created: List[AtomicRaster] = []

    def open_outputs():
        prob = AtomicRaster(output, grid.width, grid.height, 1, source.crs, source.area_transform(),
                            ["mangrove probability"], tags={**source.plan.tags, THRESHOLD_TAG: f"{bundle.threshold:g}"})
        created.append(prob)
        stitchers["probability"] = StripStitcher(prob, 1, 1, grid)
        for name in stages:
            st = STAGE_BY_NAME[name]
            count = st.channels if options.stage_mode == "all" else len(COMPACT_BANDS)
            desc = ([f"{name} channel {i}" for i in range(count)] if options.stage_mode == "all"
                    else [f"{name} {b}" for b in COMPACT_BANDS])
            raster = AtomicRaster(stage_files[name], math.ceil(grid.width / st.stride),
                                  math.ceil(grid.height / st.stride), count, source.crs,
                                  source.area_transform(st.stride), desc, tags=source.plan.tags)
            created.append(raster)
            stitchers[name] = StripStitcher(raster, count, st.stride, grid)

    sink.submit(open_outputs)
    windows = list(grid)
    run_count = 0
    readers = ThreadPoolExecutor(max_workers=reader_count(options.readers, runner.device_type),
                                 thread_name_prefix="menet-read")
    pending: deque = deque()
    in_flight = None  # (batch, outputs): collected after the next batch is launched
    next_read = done = 0
    last_log = time.perf_counter()

    def finish(job):
        batch_done, outputs = job
        host = {k: v if isinstance(v, np.ndarray) else v.cpu().numpy() for k, v in outputs.items()}
        sink.submit(lambda: _stitch(stitchers, batch_done, host))

    try:
        while done < len(windows):
            while next_read < len(windows) and len(pending) < 2 * batch_size:
                _, y0, x0 = windows[next_read]
                pending.append((windows[next_read], readers.submit(source.read, y0, x0, grid.window)))
                next_read += 1
            batch = []
            while pending and len(batch) < batch_size:
                (_row, y0, x0), fut = pending.popleft()
                data, valid = fut.result()
                done += 1
                if valid.any():  # windows of pure no-data are skipped, not run
                    batch.append((y0, x0, data, valid))
            if batch:
                run_count += len(batch)
                outputs, batch_size = runner.run(batch, source.plan, batch_size, reporter)
                if in_flight is not None:
                    finish(in_flight)  # the device works on this batch meanwhile
                in_flight = (batch, outputs)
            reporter.progress(100.0 * done / len(windows))
            last_log = _log_rate(reporter, t0, last_log, done, len(windows))
            if reporter.cancelled():
                raise Cancelled("cancelled by the user")
        if in_flight is not None:
            finish(in_flight)
        sink.submit(lambda: [s.flush_until() for s in stitchers.values()])
        sink.submit(lambda: commit_all(created))
        sink.close()
    except BaseException:
        readers.shutdown(wait=True, cancel_futures=True)
        sink.stop()  # the sink thread has ended: its rasters can be discarded from here
        for raster in created:
            raster.discard()
        source.close()
        raise
    readers.shutdown(wait=True)
    source.close()
    seconds = time.perf_counter() - t0
    if run_count == 0:
        reporter.warn("the input has no valid pixels in the processed area: the output is all no-data")
    reporter.info(f"ran the model on {run_count} of {len(windows)} windows (the rest hold only no-data) "
                  f"in {seconds:.1f} s ({run_count / max(seconds, 1e-9):.2f} windows/s)")
    return ExtractionResult(output, stage_files, device_text, len(windows), run_count, batch_size, seconds)


def check_outputs(bundle, source: RasterInput, grid: WindowGrid, output: Path,
                  stage_files: Dict[str, Path], stage_mode: str, reporter: Reporter) -> None:
    """Before any compute: no output may replace an input, the values must make sense,
    the outputs must fit on their disks; partial files of killed earlier runs are removed."""
    refuse_overwriting_inputs([output, *stage_files.values()], [source.path, bundle.path])
    for message in source.plan.warnings:
        reporter.warn(message)
    check_plausible_values(source, reporter.warn)
    needs = {output: grid.width * grid.height * 4}
    for name, path in stage_files.items():
        needs[path] = estimate_stage_bytes(grid.width, grid.height, [name], stage_mode)
    check_free_space(needs, reporter.warn, "probability and stage layers" if stage_files else "probability")
    for path in needs:
        for stale in remove_stale_partials(path):
            reporter.info(f"removed {stale.name}: a partial output left by a run that no longer exists")


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


class TorchRunner:
    """The torch path: channels on the device, channels_last, bf16 autocast on CUDA, out-of-memory halving."""

    runtime = "torch"

    def __init__(self, bundle, options: EngineOptions, stages: Sequence[str]):
        import torch
        from .device import auto_batch_size, choose_device
        if options.threads:
            torch.set_num_threads(options.threads)
        self.device, self.description = choose_device(options.device)
        self.device_type = self.device.type
        self.fast = use_bf16(options.precision, self.device)
        self.precision = "bf16" if self.fast else "fp32"
        self.precision_why = ("asked for" if options.precision != "auto" else
                              "auto on the CUDA GPU" if self.fast else
                              "torch runs fp32 on the CPU (OpenVINO runs bf16 where the CPU has it)")
        self.precision_why += (" (bf16 autocast, channels_last memory format)" if self.fast
                               else " (channels_last memory format)")
        self._auto_batch_size = auto_batch_size
        self.bundle, self.stages, self.stage_mode = bundle, list(stages), options.stage_mode
        self.tta = options.tta
        # channels_last suits both cuDNN and oneDNN: +13 % windows/s on the 2-core CPU, more on GPUs
        self.model = bundle.model.to(self.device).eval().to(memory_format=torch.channels_last)

    def auto_batch_size(self, window: int) -> int:
        return self._auto_batch_size(self.device, window)

    def prepare(self, batch_size: int, window: int) -> None:
        pass

    def run(self, batch, plan, batch_size, reporter):
        return _run_batch(self.model, self.bundle, plan, batch, self.stages, self.stage_mode, self.device,
                          self.fast, batch_size, reporter, self.tta)


def open_runner(model, options: EngineOptions, stages: Sequence[str], reporter: Reporter):
    """The runner for ``options.runtime`` (auto: see ``runtimes.choose_runtime``); ``.why`` says why."""
    name, why = runtimes.check_model_fits(model, options.runtime, options.device, stages)
    if options.precision not in runtimes.PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(runtimes.PRECISIONS)}, got {options.precision!r}")
    if name == "torch":
        runner = TorchRunner(model, options, stages)
    else:
        if not isinstance(model, runtimes.OnnxModel):
            from .export import ensure_onnx
            model = ensure_onnx(model, runtimes.need_for(stages), reporter)
        runner = runtimes.open_onnx_runner(name, model, stages, options.stage_mode, options.threads,
                                           options.precision)
        runner.device_type = "cpu"
        runner.tta = options.tta
    runner.why = why
    return runner


def _stitch(stitchers: Dict[str, StripStitcher], batch, results: Dict[str, np.ndarray]) -> None:
    for i, (y0, x0, _data, valid) in enumerate(batch):
        for name, stitcher in stitchers.items():
            values = results[name][i]
            stitcher.add(y0, x0, values, pooled_valid(valid, stitcher.stride))


def use_bf16(precision: str, device) -> bool:
    """bf16 autocast: the fast path on CUDA; selectable on the CPU so tests cover it."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _forward(model, bundle, plan, batch, stages, stage_mode, device, fast: bool,
             tta: bool = False) -> Dict[str, "torch.Tensor"]:
    """Launch one batch; returns outputs still on the device (CUDA runs them asynchronously).
    ``tta``: the probability is the mean over the 8 flips (the stage maps are the unflipped pass's)."""
    import torch
    raw = torch.from_numpy(np.stack([b[2] for b in batch]))
    valid = torch.from_numpy(np.stack([b[3] for b in batch]))
    if device.type == "cuda":
        raw, valid = raw.pin_memory(), valid.pin_memory()
    raw = raw.to(device, non_blocking=True)
    valid = valid.to(device, non_blocking=True)
    with torch.inference_mode():
        x = prepare_batch(raw, valid, bundle, plan).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            logits, feats = model.forward_with_stages(x)
            probability = torch.sigmoid(logits.float())
            if tta:
                probability = mean_over_flips(
                    lambda view: torch.sigmoid(model(view.contiguous(memory_format=torch.channels_last)).float()),
                    x, first=probability)
        out = {"probability": probability}
        for name in stages:
            out[name] = feats[name].float() if stage_mode == "all" else compact_stage(feats[name])
        return out


def _run_batch(model, bundle, plan, batch, stages, stage_mode, device, fast, batch_size, reporter, tta=False):
    """Launch a batch; on out-of-memory run it in halves (synchronously) and keep the smaller size."""
    import torch
    try:
        return _forward(model, bundle, plan, batch, stages, stage_mode, device, fast, tta), batch_size
    except torch.OutOfMemoryError:
        if len(batch) == 1:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        half = max(1, len(batch) // 2)
        reporter.warn(f"out of GPU memory at batch size {len(batch)}; retrying with {half}")
        merged: Dict[str, List[np.ndarray]] = {}
        for part in [batch[i:i + half] for i in range(0, len(batch), half)]:
            res, half = _run_batch(model, bundle, plan, part, stages, stage_mode, device, fast, half, reporter, tta)
            for k, v in res.items():
                merged.setdefault(k, []).append(v if isinstance(v, np.ndarray) else v.cpu().numpy())
        return {k: np.concatenate(v) for k, v in merged.items()}, half


def predict_reference(bundle, source: RasterInput, window: int = 256, overlap: int = 64) -> np.ndarray:
    """Plain path: one window at a time, fp32 on the CPU, whole-raster accumulators.
    Returns the (height, width) probability with NaN where the input has no data."""
    import torch
    source.use_recipe(bundle.recipe)
    grid = WindowGrid(source.height, source.width, window, overlap)
    weights = blend_weights(window, overlap)
    H, W = grid.row_origins[-1] + window, grid.col_origins[-1] + window
    acc, wsum = np.zeros((H, W), np.float64), np.zeros((H, W), np.float64)
    valid_all = np.zeros((H, W), bool)
    model = bundle.model.cpu().eval()
    for _, y0, x0 in grid:
        data, valid = source.read(y0, x0, window)
        valid_all[y0:y0 + window, x0:x0 + window] |= valid
        if not valid.any():
            continue
        with torch.inference_mode():
            x = prepare_batch(torch.from_numpy(data[None]), torch.from_numpy(valid[None]), bundle, source.plan)
            prob = torch.sigmoid(model(x))[0, 0].numpy()
        acc[y0:y0 + window, x0:x0 + window] += prob * weights
        wsum[y0:y0 + window, x0:x0 + window] += weights
    source.close()
    out = np.full((H, W), np.nan, np.float32)
    ok = valid_all & (wsum > 0)
    out[ok] = (acc[ok] / wsum[ok]).astype(np.float32)
    return out[:grid.height, :grid.width]
