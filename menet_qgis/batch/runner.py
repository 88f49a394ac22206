"""Run many scenes on Dask distributed: embedded LocalCluster or an existing scheduler.

Only this module imports Dask, and only the ``batch`` command imports it: the
QGIS plugin's process never loads Dask.

Retries are the client's, so every attempt shows in the summary: the
embedded cluster's scheduler is told not to reschedule a task whose worker
died (``allowed-failures: 0``), the client sees ``KilledWorker`` and submits
the scene again (up to ``retries`` times, like an ordinary error).  On an
existing cluster the scheduler's own rescheduling also happens; the start
events the workers send still show each attempt.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from distributed import Client, Event, LocalCluster, as_completed
from distributed.client import FutureCancelledError
from distributed.diagnostics.plugin import WorkerPlugin

from ..core.files import file_sha256
from .inputs import WORK_FOLDER, Scene, collect_scenes
from .manifest import (RunManifest, SceneRecord, is_done, result_key, result_parameters,
                       scene_fingerprint)
from .scene_task import ENGINE_CHOICE_PREFIXES, EVENT_TOPIC, Job, engine_options, load_model, output_paths, run_scene


@dataclass
class BatchOptions:
    workers: int = 0                    # embedded cluster's worker processes; 0 = automatic
    scheduler: Optional[str] = None     # address of an existing Dask scheduler instead
    retries: int = 2                    # further attempts after a failed one (error or worker death)
    resources: Dict[str, float] = field(default_factory=dict)   # per task, e.g. {"GPU": 1}
    engine_options: Dict = field(default_factory=dict)          # EngineOptions fields (runtime, precision, …)
    band_numbers: Optional[Sequence[int]] = None
    dn_offset: Optional[float] = None
    data_root: Optional[str] = None     # local files in manifests/catalogues must lie here (default: their folder)
    progress: bool = True
    cancel_grace_s: float = 20.0        # how long Ctrl-C waits for running scenes to stop


class PreloadModel(WorkerPlugin):
    """Loads the run's model (for its runtime, device and stages) when a worker (re)starts,
    so no scene waits for it."""

    def __init__(self, path: str, sha256: str, engine_options: Dict, ignore_sigint: bool = False):
        self.path, self.sha256, self.engine_options = path, sha256, engine_options
        self.ignore_sigint = ignore_sigint

    def setup(self, worker):
        if self.ignore_sigint and threading.current_thread() is threading.main_thread():
            # embedded workers share the terminal's process group: Ctrl-C is the client's to handle
            # (it cancels the run), not a signal that kills workers mid-write
            import signal
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        load_model(self.path, self.sha256, self.engine_options)


def default_workers(cpus: int, memory_bytes: int, cuda: bool) -> int:
    """Worker processes for the embedded cluster.

    One process per GPU would need per-process GPU pinning (dask-cuda does it);
    the embedded cluster uses one GPU with one worker.  On the CPU: one
    single-threaded process per core — measured here, 2 processes × 1 runtime
    thread mapped the same scenes faster than 1 process × 2 threads (docs/cli.md,
    batch scaling) — at most one per 3 GB of memory (a worker peaks at about
    1.7 GB with a ResNet-101 and a full tile).
    """
    if cuda:
        return 1
    return max(1, min(cpus, memory_bytes // (3 * 2**30)))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def embedded_cluster(workers: int, resources: Dict[str, float]) -> LocalCluster:
    """Worker processes (the GIL never serialises two scenes), one task thread each (a
    scene already keeps its reader, compute and writer threads busy; two scenes in one
    process would share one model's runtime threads and, on a GPU, each size its batch to
    70 % of the free memory)."""
    import dask
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                            dashboard_address=":0", resources=resources or None)


class Progress:
    """Scenes and windows on the terminal (tqdm), fed by the workers' events; the engine's
    runtime, device and precision lines, each distinct one once."""

    def __init__(self, total_scenes: int, enabled: bool, stream=sys.stderr):
        self.enabled, self.stream = enabled, stream
        self.lock = threading.Lock()
        self.windows: Dict[str, List[int]] = {}  # token -> [done, total]
        self.started: Dict[str, List[Dict]] = {}  # scene -> start events
        self.engine_lines: List[str] = []        # distinct engine choice lines the workers reported
        self._engine_shown = 0
        self.scenes = self.window_bar = None
        if enabled:
            from tqdm import tqdm
            self.scenes = tqdm(total=total_scenes, desc="scenes ", unit="scene", file=stream, position=0,
                               dynamic_ncols=True)
            self.window_bar = tqdm(total=0, desc="windows", unit="win", file=stream, position=1,
                                   dynamic_ncols=True)

    def on_event(self, event) -> None:
        _ts, msg = event
        with self.lock:
            if msg.get("event") == "start":
                self.started.setdefault(msg["scene"], []).append(msg)
                self.windows[msg["token"]] = [0, int(msg.get("total", 0))]
            elif msg.get("event") == "windows" and msg.get("token") in self.windows:
                self.windows[msg["token"]][0] = int(msg["done"])
        if msg.get("event") == "engine":
            self.add_engine_lines([msg.get("line", "")])

    def add_engine_lines(self, lines: Sequence[str]) -> None:
        with self.lock:
            self.engine_lines += [l for l in dict.fromkeys(lines) if l and l not in self.engine_lines]

    def new_engine_lines(self) -> List[str]:
        """Engine choice lines not shown yet."""
        with self.lock:
            lines = self.engine_lines[self._engine_shown:]
            self._engine_shown = len(self.engine_lines)
        return lines

    def starts(self, scene: str) -> List[Dict]:
        with self.lock:
            return list(self.started.get(scene, []))

    def forget_attempt(self, token: str) -> None:
        """A lost attempt's windows no longer count (they are redone by the next one)."""
        with self.lock:
            self.windows.pop(token, None)

    def refresh(self) -> None:
        if not self.enabled:
            return
        with self.lock:
            done = sum(d for d, _ in self.windows.values())
            total = sum(t for _, t in self.windows.values())
        self.window_bar.total = total
        self.window_bar.n = done
        self.window_bar.refresh()

    def scene_finished(self) -> None:
        if self.enabled:
            self.scenes.update(1)

    def write(self, line: str) -> None:
        if self.enabled:
            from tqdm import tqdm
            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.refresh()
            self.window_bar.close()
            self.scenes.close()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _lock(work: Path):
    handle = open(work / "lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RuntimeError(f"another batch run is writing to {work.parent}; wait for it or use another --out-dir") from None
    return handle


class _Say:
    """Engine reporter that prints through the run's log function."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say

    def info(self, message: str) -> None:
        self.say(message)

    def warn(self, message: str) -> None:
        self.say("WARNING: " + message)


def prepare_run(inputs: Sequence[str], out_dir, model_path, options: BatchOptions,
                log: Optional[Callable[[str], None]] = None):
    """Everything checked and decided before a cluster starts: scenes, model, parameters, what is done.

    ``model_path`` None = the default model, found as Extract finds it (``jobs.resolve_model``).
    The model is loaded here as Extract loads it (``jobs.load_model``), so a model the chosen
    runtime cannot run (a .pt without torch and without its ONNX export, an .onnx for torch) is
    refused before any cluster starts; when scenes are to be mapped by an ONNX runtime from a .pt
    checkpoint, its ONNX export is made here once, not by every worker."""
    from .. import jobs
    from ..core.inference import runtimes
    from ..core.model.stages import parse_stage_names
    from ..core.model.stages import check_window
    out_dir = Path(out_dir)
    work = out_dir / WORK_FOLDER
    say = _Say(log or (lambda _line: None))
    scenes = collect_scenes(inputs, work / "vrt", options.band_numbers, options.dn_offset, options.data_root,
                            out_dir, say.info)
    opts = engine_options(options.engine_options)  # refuses unknown fields early
    check_window(opts.window or 256, opts.overlap)
    stages = parse_stage_names(opts.stages)
    if options.retries < 0:
        raise ValueError(f"retries must be 0 or more, got {options.retries}")
    model_path = jobs.resolve_model(str(model_path) if model_path else None, opts.runtime, opts.device, say).resolve()
    model = jobs.load_model(model_path, say, opts.runtime, opts.device, stages)  # a .pt for ONNX: exported here
    runtime, why = runtimes.check_model_fits(model, opts.runtime, opts.device, stages)
    sha = file_sha256(model_path)
    threshold = model.threshold  # chosen on validation when it was trained
    params = result_parameters(options.engine_options)
    records, todo = [], []
    for scene in scenes:
        key = result_key(scene_fingerprint(scene), sha, params)
        outputs = output_paths(_job_stub(out_dir, options), scene)
        rec = SceneRecord(scene.name, scene.path, str(outputs[-1]), date=scene.date, region=scene.region,
                          result_key=key)
        tags = is_done(outputs, key)
        if tags is not None:
            rec.status = "skipped"
            rec.mangrove_ha = float(tags["MENET_MANGROVE_HA"]) if tags.get("MENET_MANGROVE_HA") else None
        else:
            todo.append((scene, rec))
        records.append(rec)
    run = {"run_id": uuid.uuid4().hex[:12], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "model": str(model_path), "model_sha256": sha, "model_trained": model.trained,
           "runtime": runtime, "runtime_why": why,  # as the client sees it; each scene's log has its worker's
           "threshold": threshold, "parameters": params, "engine_options": options.engine_options,
           "retries": options.retries, "inputs": list(inputs)}
    return RunManifest(out_dir, run, records, threshold), todo, sha, threshold


def _job_stub(out_dir: Path, options: BatchOptions) -> Job:
    return Job("", "", options.engine_options, str(out_dir), "", 0.5)


def run_batch(inputs: Sequence[str], out_dir, model_path=None, options: BatchOptions = BatchOptions(),
              client: Optional[Client] = None, log: Optional[Callable[[str], None]] = None) -> RunManifest:
    """Map every scene of ``inputs`` into ``out_dir``; returns the run manifest (also written there).

    ``model_path``: an .onnx model or a .pt checkpoint; None = the default model, as for Extract.

    ``client``: use this Dask client (its cluster is left running); else connect to
    ``options.scheduler`` or start an embedded LocalCluster.  A cluster not started here is checked
    first (``check_cluster``), before anything is written.  Raises ``KeyboardInterrupt`` after a
    clean cancel (manifest saved, no partial files).
    """
    connected = None
    if client is None and options.scheduler:
        client = connected = Client(options.scheduler)
    try:
        if client is not None:
            check_cluster(client)
            if connected is not None:
                (log or (lambda line: print(line, file=sys.stderr, flush=True)))(
                    f"connected to Dask scheduler {options.scheduler}")
        return _run(inputs, Path(out_dir), model_path, options, client, log)
    finally:
        if connected is not None:
            connected.close()


def check_cluster(client: Client) -> None:
    """Refuse, in one line, a cluster whose scheduler or workers cannot import this menet_qgis at this
    version: the scheduler unpickles each scene's task (it names ``scene_task.run_scene``), the
    workers run it.  Without this, every scene fails with Dask's "Error during deserialization of
    the task graph" after a traceback ending in ModuleNotFoundError.  A cluster with no worker yet
    passes: scenes wait for workers to join, as Dask does."""
    import cloudpickle

    from ..version import version
    from . import package_probe
    wanted = version()
    cloudpickle.register_pickle_by_value(package_probe)  # the probe must run where menet_qgis is missing
    try:
        answers = [("scheduler", client.run_on_scheduler(package_probe.installed_version))]
        answers += sorted(client.run(package_probe.installed_version, on_error="return").items())
    finally:
        cloudpickle.unregister_pickle_by_value(package_probe)
    has: Dict[str, List[str]] = {}  # what they have -> who
    for who, answer in answers:
        if answer == wanted:
            continue
        what = ("no menet_qgis" if answer is None else f"menet_qgis {answer}" if isinstance(answer, str)
                else f"no answer ({_one_line(answer)})")
        has.setdefault(what, []).append(who)
    if has:
        def clause(what: str, who: List[str]) -> str:
            workers = [w for w in who if w != "scheduler"]
            names = (["the scheduler"] if "scheduler" in who else []) + \
                ([f"worker{'s' if len(workers) > 1 else ''} {', '.join(workers)}"] if workers else [])
            return f"{' and '.join(names)} {'has' if len(who) == 1 else 'have'} {what}"
        raise RuntimeError(
            f"the Dask cluster at {client.scheduler.address} cannot run menet_qgis {wanted}: "
            + "; ".join(clause(what, who) for what, who in has.items())
            + f". Install menet_qgis {wanted} on the scheduler and every worker (pip install . from this "
            "checkout, with the extras the scenes need) or put the checkout on their PYTHONPATH; "
            "no scene was submitted")


def _run(inputs: Sequence[str], out_dir: Path, model_path, options: BatchOptions, client: Optional[Client],
         log: Optional[Callable[[str], None]]) -> RunManifest:
    work = out_dir / WORK_FOLDER
    made = [f for f in (out_dir, work) if not f.exists()]  # removed again when the inputs are refused
    work.mkdir(parents=True, exist_ok=True)
    lock = _lock(work)
    staging = work / "staging"
    try:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed (we hold the lock)
        say = log or (lambda line: print(line, file=sys.stderr, flush=True))
        try:
            manifest, todo, sha, threshold = prepare_run(inputs, out_dir, model_path, options, say)
        except Exception:
            if work in made:  # nothing of this run is kept: no output folder appears for a refused run
                shutil.rmtree(work, ignore_errors=True)
                if out_dir in made and not any(out_dir.iterdir()):
                    out_dir.rmdir()
            raise
        progress = Progress(len(todo), options.progress and bool(todo))
        say = log or progress.write
        for rec in manifest.records:
            if rec.status == "skipped":
                say(f"scene {rec.scene}: skipped, output up to date ({rec.output})")
        manifest.save()
        if not todo:
            say(f"nothing to do: all {len(manifest.records)} scenes are up to date in {out_dir}")
            return manifest
        if not manifest.run["model_trained"]:
            say(f"WARNING: model {Path(manifest.run['model']).name} is UNTRAINED (random weights): outputs only "
                "test the pipeline")
        _execute(manifest, todo, sha, threshold, options, client, staging, progress, say)
        return manifest
    finally:
        lock.close()


def _execute(manifest: RunManifest, todo, sha, threshold, options: BatchOptions, client, staging: Path,
             progress: Progress, say) -> None:
    own_cluster = cluster = None
    engine_opts = dict(options.engine_options)
    own_client = client is None
    if own_client:  # the embedded cluster (run_batch has connected to a scheduler it was given)
        import psutil

        from ..core.inference.runtimes import torch_sees_cuda
        cuda = (manifest.run["runtime"] == "torch" and engine_opts.get("device", "auto") != "cpu"
                and torch_sees_cuda())
        n = options.workers or default_workers(_cpu_count(), psutil.virtual_memory().total, cuda)
        cluster = own_cluster = embedded_cluster(min(n, len(todo)), options.resources)
        client = Client(cluster)
    try:
        if not engine_opts.get("threads"):
            engine_opts["threads"] = _runtime_threads(client)
        info = client.scheduler_info()
        workers = info.get("workers", {})
        say(f"Dask: {len(workers)} worker(s) × {max([w.get('nthreads', 1) for w in workers.values()] or [1])} "
            f"task thread(s), {engine_opts['threads']} runtime thread(s) each" +
            (f"; dashboard {client.dashboard_link}" if importlib.util.find_spec("bokeh") and client.dashboard_link
             else "; no dashboard (install bokeh for Dask's)"))
        manifest.run.update(dask_workers=len(workers), runtime_threads=engine_opts["threads"])
        client.register_plugin(PreloadModel(manifest.run["model"], sha, engine_opts,
                                            ignore_sigint=own_cluster is not None), name="menet-preload-model")
        cancel = Event(f"menet-cancel-{manifest.run['run_id']}", client=client)
        job = Job(manifest.run["model"], sha, engine_opts, str(manifest.out_dir), str(staging), threshold,
                  cancel.name)
        client.subscribe_topic(EVENT_TOPIC, progress.on_event)
        _schedule(client, job, todo, options, manifest, progress, say, cancel)
    finally:
        progress.close()
        try:
            client.unsubscribe_topic(EVENT_TOPIC)
        except Exception:
            pass
        if own_client:
            client.close()
        if own_cluster is not None:
            own_cluster.close()
        if own_cluster is not None or not manifest.run.get("cancelled"):
            # no task of this run is left (we hold the out-dir lock): what is left was written by
            # attempts whose worker died before their own clean-up
            shutil.rmtree(staging, ignore_errors=True)
        elif staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()  # after Ctrl-C on an existing cluster, scenes still stopping clean up themselves
        manifest.save()


def _runtime_threads(client: Client) -> int:
    """CPU threads of the runtime (torch, onnxruntime or OpenVINO) per worker: the cores of its host
    shared by the task threads there (Dask's nanny sets OMP_NUM_THREADS=1, so torch would otherwise
    use one, and the ONNX runtimes would each use every core of the host)."""
    cpus = client.run(_cpu_count)
    info = client.scheduler_info()["workers"]
    per_host: Dict[str, int] = {}
    for address, w in info.items():
        per_host[w["host"]] = per_host.get(w["host"], 0) + int(w.get("nthreads", 1))
    shares = [max(1, cpus[a] // per_host[w["host"]]) for a, w in info.items() if a in cpus]
    return min(shares) if shares else 1


def _schedule(client, job: Job, todo, options: BatchOptions, manifest: RunManifest, progress: Progress, say,
              cancel) -> None:
    active: Dict = {}  # future -> (scene, record, attempts started before it)

    def submit(scene: Scene, rec: SceneRecord):
        key = f"menet-{scene.name}-{len(rec.attempts) + 1}-{uuid.uuid4().hex[:8]}"
        fut = client.submit(run_scene, scene, job, rec.result_key, key=key, pure=False,
                            resources=options.resources or None)
        active[fut] = (scene, rec, len(progress.starts(scene.name)))
        finished.add(fut)

    # on this client's own loop: distributed.wait() would use the default client's, which is
    # another one when a process holds several clients
    finished = as_completed(loop=client.loop)
    for scene, rec in todo:
        submit(scene, rec)
    try:
        while active:
            done = finished.next_batch(block=False)
            progress.refresh()
            if not done:
                time.sleep(0.25)
            for line in progress.new_engine_lines():
                say(line)
            for fut in done:
                scene, rec, seen_before = active.pop(fut)
                starts = progress.starts(scene.name)[seen_before:]
                if fut.status == "finished":  # its log has the lines even if their events come late
                    progress.add_engine_lines([l for l in fut.result()["log"] if l.startswith(ENGINE_CHOICE_PREFIXES)])
                    for line in progress.new_engine_lines():
                        say(line)
                _settle(fut, scene, rec, starts, options, progress, say)
                if rec.status == "retry":
                    submit(scene, rec)
                else:
                    progress.scene_finished()
                    manifest.save()
    except KeyboardInterrupt:
        say("cancelling: running scenes stop within one batch; finished outputs are kept")
        cancel.set()
        running = [f for f, (scene, _rec, seen) in active.items() if len(progress.starts(scene.name)) > seen]
        client.cancel([f for f in active if f not in running])
        deadline = time.monotonic() + options.cancel_grace_s
        try:
            while time.monotonic() < deadline and not all(f.done() for f in running):
                time.sleep(0.2)
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
            pass
        for fut, (scene, rec, seen_before) in list(active.items()):
            if fut.status == "finished":
                _settle(fut, scene, rec, progress.starts(scene.name)[seen_before:], options, progress, say)
            if rec.status != "ok":
                rec.status = "cancelled"
        client.cancel(list(active))
        manifest.run["cancelled"] = True
        raise


def _settle(fut, scene: Scene, rec: SceneRecord, starts: List[Dict], options: BatchOptions, progress: Progress,
            say) -> None:
    """Record a finished future on the scene: ok, retry, failed or cancelled."""
    if fut.status == "finished":
        res = fut.result()
        for s in starts:
            if s["token"] != res["token"]:  # rescheduled by an external scheduler after a worker death
                rec.attempts.append({"worker": s["worker"], "outcome": "worker lost"})
        rec.attempts.append({"worker": res["worker"], "outcome": "ok", "seconds": round(res["seconds"], 2)})
        rec.status, rec.seconds, rec.worker = "ok", res["seconds"], res["worker"]
        rec.mangrove_ha, rec.windows, rec.log = res["mangrove_ha"], res["windows"], res["log"]
        ha = "" if rec.mangrove_ha is None else f", {rec.mangrove_ha:g} ha mangrove"
        retried = f" (attempt {len(rec.attempts)}; {rec.note()})" if len(rec.attempts) > 1 else ""
        say(f"scene {scene.name}: ok in {rec.seconds:.1f} s on {rec.worker}, {rec.windows} windows{ha}{retried}")
        return
    try:
        exc = fut.exception()
    except FutureCancelledError:
        rec.status = "cancelled"
        return
    from distributed.scheduler import KilledWorker
    from ..core.reporting import Cancelled
    for s in starts:
        progress.forget_attempt(s["token"])
    if isinstance(exc, Cancelled):
        rec.status = "cancelled"
        return
    if isinstance(exc, KilledWorker):
        if not starts and rec.requeued < 3:  # only queued on the worker that died: not an attempt
            rec.requeued += 1
            rec.status = "retry"
            return
        starts = starts or [{"worker": "", "token": ""}]
        for s in starts:
            rec.attempts.append({"worker": s["worker"], "outcome": "worker died", "error": ""})
    else:
        worker = starts[-1]["worker"] if starts else ""
        for s in starts[:-1]:
            rec.attempts.append({"worker": s["worker"], "outcome": "worker lost"})
        rec.attempts.append({"worker": worker, "outcome": "error", "error": _one_line(exc)})
    if len(rec.attempts) <= options.retries:
        rec.status = "retry"
        say(f"scene {scene.name}: attempt {len(rec.attempts)} failed ({rec.attempts[-1]['outcome']}"
            f"{': ' + rec.attempts[-1]['error'] if rec.attempts[-1].get('error') else ''}); retrying")
        return
    rec.status = "failed"
    rec.error = rec.attempts[-1].get("error") or rec.attempts[-1]["outcome"]
    say(f"scene {scene.name}: FAILED after {len(rec.attempts)} attempts: {rec.error}")
