"""The per-scene task that runs on a Dask worker: the same engine as ``predict`` and QGIS.

One model per worker process, loaded once: ``model_for`` keeps loaded
checkpoints keyed by their sha256 (the run's ``PreloadModel`` worker plugin
fills it when a worker starts, so a restarted worker is warm before its first
scene).  Each attempt writes into its own staging folder (a fresh uuid), so
two attempts at one scene — a retry racing a worker the scheduler thought
dead — never write the same file; finished COGs are renamed into place,
stage layers first and the probability last (the probability is what
resume looks at).
"""
from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from .inputs import Scene
from .manifest import RESULT_KEY_TAG, file_sha256, mangrove_hectares, write_cog

EVENT_TOPIC = "menet-batch"
_MODELS: Dict[str, object] = {}


@dataclass(frozen=True)
class Job:
    """What every scene of a run shares (sent with each task; small)."""

    model_path: str
    model_sha256: str
    engine_options: Dict
    out_dir: str
    staging_dir: str
    threshold: float
    cancel_event: str = ""           # name of a distributed.Event set on Ctrl-C
    extra_tags: Dict = field(default_factory=dict)


def model_for(path: str, sha256: str):
    """The checkpoint's bundle, loaded once per process (and checked to be the file the client hashed)."""
    bundle = _MODELS.get(sha256)
    if bundle is None:
        from ..core import checkpoint
        actual = file_sha256(path)
        if actual != sha256:
            raise RuntimeError(f"model {path} on this worker has sha256 {actual[:12]}…, the run uses {sha256[:12]}…")
        bundle = _MODELS[sha256] = checkpoint.load(path)
    return bundle


def output_paths(job: Job, scene: Scene) -> List[Path]:
    """Stage layers first, the probability last (the order they are committed in)."""
    from ..core.engine import stage_path
    out = Path(job.out_dir) / f"{scene.name}_probability.tif"
    return [stage_path(out, None, s) for s in job.engine_options.get("stages", ())] + [out]


def _worker_address() -> str:
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


def _emit(message: Dict) -> None:
    try:
        from distributed import get_worker
        get_worker().log_event(EVENT_TOPIC, message)
    except (ImportError, ValueError):
        pass


class TaskReporter:
    """Engine reporter on a worker: keeps the log, sends window progress to the client
    (at most twice a second) and asks the run's cancel event (at most once a second)."""

    def __init__(self, scene: str, token: str, windows: int, cancel_event: str):
        self.scene, self.token, self.windows = scene, token, windows
        self.lines: List[str] = []
        self._sent = 0.0
        self._checked = 0.0
        self._cancelled = False
        self._event = None
        if cancel_event:
            from distributed import Event
            self._event = Event(cancel_event)

    def info(self, message: str) -> None:
        self.lines.append(message)

    def warn(self, message: str) -> None:
        self.lines.append("WARNING: " + message)

    def progress(self, percent: float) -> None:
        now = time.monotonic()
        if percent >= 100 or now - self._sent >= 0.5:
            self._sent = now
            _emit({"event": "windows", "scene": self.scene, "token": self.token,
                   "done": int(round(self.windows * percent / 100.0)), "total": self.windows})

    def cancelled(self) -> bool:
        now = time.monotonic()
        if self._event is not None and not self._cancelled and now - self._checked >= 1.0:
            self._checked = now
            self._cancelled = self._event.is_set()
        return self._cancelled


def run_scene(scene: Scene, job: Job, result_key: str) -> Dict:
    """Map one scene: engine -> COG(s) with the result key -> rename into place."""
    from ..core import engine, raster_io
    from ..core.tiling import WindowGrid
    token = uuid.uuid4().hex[:12]
    worker = _worker_address()
    t0 = time.perf_counter()
    staging = Path(job.staging_dir) / f"{scene.name}.{token}"
    reporter = TaskReporter(scene.name, token, 0, job.cancel_event)
    if reporter.cancelled():
        raise engine.Cancelled("the run was cancelled before this scene started")
    try:
        staging.mkdir(parents=True)
        bundle = model_for(job.model_path, job.model_sha256)
        source = raster_io.RasterInput(scene.path, band_numbers=scene.band_numbers, dn_offset=scene.dn_offset,
                                       recipe=bundle.recipe)
        options = engine_options(job.engine_options)
        grid = WindowGrid(source.height, source.width, options.window or bundle.window_size, options.overlap)
        reporter.windows = len(grid)
        _emit({"event": "start", "scene": scene.name, "token": token, "worker": worker, "total": len(grid)})
        result = engine.extract(bundle, source, staging / f"{scene.name}_probability.tif", options, reporter)
        hectares = mangrove_hectares(result.probability, job.threshold)
        tags = {RESULT_KEY_TAG: result_key, "MENET_MODEL_SHA256": job.model_sha256,
                "MENET_INPUT": scene.path, "MENET_THRESHOLD": f"{job.threshold:g}",
                "MENET_MANGROVE_HA": "" if hectares is None else f"{hectares:g}", **job.extra_tags}
        finals = output_paths(job, scene)
        staged = [result.stages[s] for s in job.engine_options.get("stages", ())] + [result.probability]
        threads = options.threads or 1
        cogs = [write_cog(src, staging / ("cog-" + final.name), tags, threads) for src, final in zip(staged, finals)]
        for cog, final in zip(cogs, finals):
            os.replace(cog, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"scene": scene.name, "token": token, "worker": worker, "seconds": time.perf_counter() - t0,
            "mangrove_ha": hectares, "windows": result.windows, "windows_run": result.windows_run,
            "device": result.device, "log": reporter.lines}


def engine_options(values: Dict):
    """EngineOptions from a plain dict, so fields other helpers add (runtime, …) pass straight through."""
    import dataclasses
    from ..core.engine import EngineOptions
    known = {f.name for f in dataclasses.fields(EngineOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return EngineOptions(**values)
