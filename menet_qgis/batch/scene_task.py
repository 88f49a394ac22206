"""The per-scene task that runs on a Dask worker: ``jobs.extract``, the job ``predict`` and QGIS run.

Each scene goes through the same front door as Extract (``jobs.extract``): the
same model loader (``jobs.load_model``: an ``.onnx`` model or a ``.pt``
checkpoint, the ONNX export cache), the same runtime and precision choice, the
same engine.  One model per worker process, loaded once (``jobs.load_model``
keeps it; the run's ``PreloadModel`` worker plugin loads it when a worker
starts, so a restarted worker is warm before its first scene), after checking
that the file on this worker is the one the client hashed.  Each attempt
writes into its own staging folder (a fresh uuid), so two attempts at one
scene — a retry racing a worker the scheduler thought dead — never write the
same file; finished COGs are renamed into place, stage layers first and the
probability last (the probability is what resume looks at).
"""
from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

from .inputs import Scene
from .manifest import RESULT_KEY_TAG, mangrove_hectares, write_cog
from ..core.files import file_sha256, finish_file, stage_path
from ..core.reporting import Cancelled

EVENT_TOPIC = "menet-batch"
#: Engine log lines that say which runtime, device and precision run the model and why; the
#: client shows each distinct one once (the per-scene logs keep them all).
ENGINE_CHOICE_PREFIXES = ("runtime:", "device:", "precision")
#: (path, mtime, size) -> sha256 of the model files this process has checked.
_CHECKED: Dict[Tuple[str, int, int], str] = {}


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


def load_model(path: str, sha256: str, options: Dict, reporter=None):
    """The run's model as Extract loads it (``jobs.load_model``, kept between scenes), once the
    file here is checked to be the one the client hashed (hashed once per file version)."""
    from .. import jobs
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _CHECKED:
        _CHECKED[key] = file_sha256(path)
    if _CHECKED[key] != sha256:
        raise RuntimeError(f"model {path} on this worker has sha256 {_CHECKED[key][:12]}…, "
                           f"the run uses {sha256[:12]}…")
    return jobs.load_model(Path(path), reporter, options.get("runtime", "auto"), options.get("device", "auto"),
                           tuple(options.get("stages", ())))


def output_paths(job: Job, scene: Scene) -> List[Path]:
    """Stage layers first, the probability last (the order they are committed in)."""
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
    (at most twice a second) and the engine's runtime choice, and asks the run's cancel
    event (at most once a second)."""

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
        if message.startswith(ENGINE_CHOICE_PREFIXES):
            _emit({"event": "engine", "scene": self.scene, "token": self.token, "line": message})

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
    """Map one scene: ``jobs.extract`` into staging -> COG(s) with the result key -> rename into place."""
    from .. import jobs
    from ..core.inference import engine
    from ..core.io import raster_io
    from ..core.inference.tiling import WindowGrid
    token = uuid.uuid4().hex[:12]
    worker = _worker_address()
    t0 = time.perf_counter()
    staging = Path(job.staging_dir) / f"{scene.name}.{token}"
    reporter = TaskReporter(scene.name, token, 0, job.cancel_event)
    if reporter.cancelled():
        raise Cancelled("the run was cancelled before this scene started")
    try:
        staging.mkdir(parents=True)
        model = load_model(job.model_path, job.model_sha256, job.engine_options, reporter)
        options = engine_options(job.engine_options)
        source = raster_io.RasterInput(scene.path, band_numbers=scene.band_numbers, dn_offset=scene.dn_offset,
                                       recipe=model.recipe)
        source.close()  # opened for its size (the progress bar's window count); jobs.extract opens it again
        reporter.windows = len(WindowGrid(source.height, source.width, options.window or model.window_size,
                                          options.overlap))
        _emit({"event": "start", "scene": scene.name, "token": token, "worker": worker, "total": reporter.windows})
        result = jobs.extract({"input": scene.path, "output": str(staging / f"{scene.name}_probability.tif"),
                               "model": job.model_path, "bands": scene.band_numbers, "dn_offset": scene.dn_offset,
                               "options": job.engine_options}, reporter)
        hectares = mangrove_hectares(result["probability"], job.threshold)
        tags = {RESULT_KEY_TAG: result_key, "MENET_MODEL_SHA256": job.model_sha256,
                "MENET_INPUT": scene.path, engine.THRESHOLD_TAG: f"{job.threshold:g}",
                "MENET_MANGROVE_HA": "" if hectares is None else f"{hectares:g}", **job.extra_tags}
        finals = output_paths(job, scene)
        staged = [Path(result["stages"][s]) for s in job.engine_options.get("stages", ())] + \
            [Path(result["probability"])]
        threads = options.threads or 1
        cogs = [write_cog(src, staging / ("cog-" + final.name), tags, threads) for src, final in zip(staged, finals)]
        for cog, final in zip(cogs, finals):
            finish_file(cog, final)  # fsync, then rename into place
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"scene": scene.name, "token": token, "worker": worker, "seconds": time.perf_counter() - t0,
            "mangrove_ha": hectares, "windows": result["windows"], "windows_run": result["windows_run"],
            "device": result["device"], "log": reporter.lines}


def engine_options(values: Dict):
    """The EngineOptions ``jobs.extract`` reads from ``values``: each declared option checked, an unknown
    one refused in one line (so the client refuses what every scene would)."""
    from .. import jobs
    return jobs.ExtractJob.from_dict({"input": "-", "output": "-", "options": dict(values)}).engine_options()
