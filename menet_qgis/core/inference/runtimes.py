"""Which runtime runs the model (torch, ONNX Runtime or OpenVINO), the runners behind one interface, and loading.

Most QGIS users map on a CPU.  There the same network exported to ONNX runs
faster in ONNX Runtime or OpenVINO than in torch eager mode (1.3–1.7× on a quiet
2-core AVX2 CPU, 2–4× when the CPU is busy: docs/performance.md), and neither
needs torch's 5 GB: this module imports torch only where torch runs (or to ask
whether it sees a CUDA GPU).  For the ONNX runtimes the channels are built in
numpy (``channels.compute_channels_numpy``) and the model's record travels in
the ONNX file (``onnx_model.py``), so an ``.onnx`` file alone is a complete model.

``auto`` picks CUDA torch when torch sees a GPU, else OpenVINO if installed,
else ONNX Runtime, else torch; ``choose_runtime`` says why in one line.  On the
CPU ``auto`` precision is a rule of the CPU's flags (``auto_cpu_precision``):
bf16 in OpenVINO where the CPU computes bf16 natively, fp32 otherwise; the
engine logs the choice and its reason on every run.

Every runner is a ``Runner``: the engine loop hands it batches of windows and
never asks which runtime it is.  Loading (``load_model``, ``model_for_runtime``)
gives each runtime the model it runs: torch a checkpoint, the ONNX runtimes the
checkpoint's ONNX export, exported and checked against torch once
(``ensure_onnx``) and cached by the checkpoint's sha256.
"""
from __future__ import annotations

import importlib.util
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import numpy as np

from ..files import file_sha256
from ..model import channels as ch
from ...options import PRECISIONS, RUNTIMES  # noqa: F401 (re-exported)
from ..model.flips import mean_over_flips
from .onnx_model import OnnxModel, find_cached, need_for, read_onnx_model, writable_cache_path

if TYPE_CHECKING:  # torch is imported where torch runs, never at import
    import torch

PYPI_NAME = {"onnxruntime": "onnxruntime", "openvino": "openvino", "torch": "torch"}


class RuntimeChoiceError(ValueError):
    """A runtime that cannot run this model here; the message says what to do."""


class TorchRequired(RuntimeChoiceError):
    """The step needs torch and this Python has none (e.g. a checkpoint never exported to ONNX)."""


class ModelRuntimeError(ValueError):
    """ONNX Runtime or OpenVINO could not load or run a model file; the message gives the runtime's whole
    reason on one line (their own exceptions are no ValueError: ONNX Runtime's are not even RuntimeError)."""


#: Longest runtime reason quoted (cut at a space, marked '…'); OpenVINO's longest seen are ~700 characters.
MAX_REASON = 2000


def runtime_reason(exc: BaseException) -> str:
    """A runtime's error as its reason on one line, whole: without ONNX Runtime's ``[ONNXRuntimeError] : 2 :
    INVALID_ARGUMENT : Load model from PATH failed:`` frame, without OpenVINO's source locations
    (``Exception from src/....cpp:84:``, ``Check '...' failed at src/....cpp:47:``), never cut mid-word."""
    text = " ".join(str(exc).split())
    framed = re.match(r"\[ONNXRuntimeError\] : \d+ : \w+ : (.*)", text)
    if framed:
        text = re.sub(r"^Load model from .*? failed: ?", "", framed.group(1))
    text = re.sub(r"Exception from \S+:\d+: ?", "", text)
    text = re.sub(r"Check '[^']*' failed at \S+:\d+: ?", "", text).strip()
    if len(text) > MAX_REASON:
        text = text[:MAX_REASON].rsplit(" ", 1)[0] + " …"
    return text or type(exc).__name__


def _runtime_failure(runner, doing: str, exc: BaseException) -> ModelRuntimeError:
    return ModelRuntimeError(f"{runner.runtime} {runner.version()} could not {doing} {Path(runner.model.path).name}: "
                             f"{runtime_reason(exc)}")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def torch_importable() -> bool:
    """torch present and importable (a blocked or broken install counts as absent)."""
    if not installed("torch"):
        return False
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_sees_cuda() -> bool:
    if not torch_importable():
        return False
    import torch
    return bool(torch.cuda.is_available())


def default_threads() -> int:
    """CPU threads for a runtime when the user sets none: every core this process may use.
    (Measured in python -m benchmarks.bench --threads-sweep; see docs/performance.md.)"""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# --- precision on the CPU ------------------------------------------------------------
#: CPU flags (as /proc/cpuinfo spells them) of native bf16 dot products, and their usual names.
BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512_BF16"}
#: The widest vector extension, named in the log when the CPU has no bf16 (best first).
SIMD_FLAGS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"), ("neon", "NEON"),
              ("asimd", "NEON"))


def cpu_features() -> frozenset:
    """This CPU's feature flags: /proc/cpuinfo's on Linux; elsewhere what OpenVINO reports
    (its ``BF16`` capability, which it grants for AVX512_BF16 or AMX, stands for ``avx512_bf16``)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    if installed("openvino"):
        import openvino as ov
        if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            return frozenset({"avx512_bf16"})
    return frozenset()


def auto_cpu_precision(runtime: str, features) -> Tuple[str, str]:
    """(precision, why) that ``auto`` runs on the CPU, a rule of the CPU's features: bf16 where
    OpenVINO runs the model and the CPU computes bf16 natively (AVX512_BF16 or AMX-BF16; on a
    2-core AVX512_BF16 EPYC, issue 24: 2.2x torch fp32 end to end against OpenVINO fp32's 1.4x,
    0.006 % of pixels changing class), fp32 otherwise (OpenVINO refuses bf16 it would have to
    emulate, and ONNX Runtime runs fp32 on x86)."""
    native = [name for flag, name in BF16_FLAGS.items() if flag in features]
    if native and runtime == "openvino":
        return "bf16", f"this CPU has {' and '.join(native)}"
    if native:
        return "fp32", f"{runtime} runs fp32 on the CPU (this CPU's {native[0]} is used by OpenVINO)"
    simd = next((name for flag, name in SIMD_FLAGS if flag in features), "")
    return "fp32", "this CPU has no bf16 instructions" + (f" ({simd})" if simd else "")


def cpu_precision(runtime: str, requested: str, features=None) -> Tuple[str, str]:
    """(precision, why) for ``requested`` ('auto', 'fp32', 'bf16') on the CPU in ``runtime``."""
    requested = (requested or "auto").lower()
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return requested, "asked for"
    return auto_cpu_precision(runtime, cpu_features() if features is None else features)


# --- choosing ----------------------------------------------------------------------
def model_kind(model) -> str:
    """'onnx' (an exported model), 'file' (a checkpoint loaded from disk) or 'memory'."""
    if isinstance(model, OnnxModel):
        return "onnx"
    return "file" if getattr(model, "path", None) else "memory"


def choose_runtime(requested: str, device: str, kind: str) -> Tuple[str, str]:
    """(runtime, why) for a model of ``kind`` on ``device`` ('auto', 'cuda', 'cpu')."""
    requested = (requested or "auto").lower()
    device = (device or "auto").lower()
    if requested not in RUNTIMES:
        raise RuntimeChoiceError(f"runtime must be one of {', '.join(RUNTIMES)}, got {requested!r}")
    onnx_runtimes = [r for r in ("openvino", "onnxruntime") if installed(r)]
    if requested == "torch":
        if kind == "onnx":
            raise RuntimeChoiceError("an .onnx model runs with onnxruntime or openvino, not torch: "
                                     "give the .pt checkpoint for torch")
        if not torch_importable():
            raise RuntimeChoiceError("runtime torch was asked for but torch is not installed "
                                     "(pip install torch torchvision, or use onnxruntime/openvino)")
        return "torch", "asked for"
    if requested in ("onnxruntime", "openvino"):
        if device == "cuda":
            raise RuntimeChoiceError(f"{requested} runs on the CPU here; use runtime torch for a CUDA GPU")
        if not installed(requested):
            raise RuntimeChoiceError(f"runtime {requested} was asked for but is not installed "
                                     f"(pip install {PYPI_NAME[requested]})")
        return requested, "asked for"
    # auto
    if kind != "onnx" and device != "cpu" and torch_sees_cuda():
        return "torch", "auto: torch sees a CUDA GPU"
    if device == "cuda":
        if kind == "onnx":
            raise RuntimeChoiceError("an .onnx model runs on the CPU here; give the .pt checkpoint for a CUDA GPU")
        return "torch", "auto: the CUDA device was asked for"
    if kind == "memory":
        return "torch", "auto: an in-memory model (the ONNX runtimes need a checkpoint file to export)"
    why = ("the CPU was asked for" if device == "cpu" else
           "no CUDA GPU visible to torch" if torch_importable() else "torch is not installed")
    if onnx_runtimes:
        which = "OpenVINO is installed" if onnx_runtimes[0] == "openvino" else \
            "OpenVINO is not installed, onnxruntime is"
        return onnx_runtimes[0], f"auto: {why}; {which}"
    if kind == "onnx":
        raise RuntimeChoiceError("an .onnx model needs onnxruntime or openvino (pip install onnxruntime)")
    return "torch", f"auto: {why}; neither OpenVINO nor onnxruntime installed"


def check_model_fits(model, runtime: str, device: str, stages: Sequence[str]) -> Tuple[str, str]:
    """(runtime, why) for ``model``; raises before any work if the runtime cannot run it as asked."""
    name, why = choose_runtime(runtime, device, model_kind(model))
    if isinstance(model, OnnxModel) and stages and not model.has_stages:
        raise ValueError(f"{Path(model.path).name} holds no stage maps: export the model with stages "
                         "(python -m menet_qgis export --stages)")
    return name, why


# --- turning raw windows into model input -----------------------------------------------------
def prepare_batch(raw: "torch.Tensor", valid: "torch.Tensor", bundle, plan) -> "torch.Tensor":
    """(N, bands, H, W) raw values + (N, H, W) validity -> normalised (N, 11, H, W).

    Runs on whatever device ``raw`` is on.  Invalid pixels become exactly 0
    after normalisation (the training mean), so no-data never spreads as NaN.
    ``prepare_batch_numpy`` is its numpy twin.
    """
    import torch
    x = raw
    if plan.kind == "sentinel2":
        x = ch.compute_channels((x + plan.offset) * plan.scale, bundle.pca, bundle.recipe)
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


def prepare_batch_numpy(raw: np.ndarray, valid: np.ndarray, model, plan) -> np.ndarray:
    """numpy twin of ``prepare_batch``: (N, bands, H, W) raw + (N, H, W) validity ->
    normalised (N, 11, H, W) float32, exactly 0 at invalid pixels (the training mean)."""
    x = np.asarray(raw, np.float32)
    if plan.kind == "sentinel2":
        x = ch.compute_channels_numpy((x + np.float32(plan.offset)) * np.float32(plan.scale), model.pca,
                                     recipe=model.recipe)
    else:
        x = x.copy()
    mean = np.asarray(model.norm_mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(model.norm_std, np.float32).reshape(1, -1, 1, 1)
    x -= mean
    x /= std
    x *= valid[:, None]                  # invalid pixels -> 0 (NaN * 0 stays NaN: cleared next)
    np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return x


def compact_stage_numpy(features: np.ndarray) -> np.ndarray:
    """(N, C, h, w) -> (N, 3, h, w): mean, max and (unbiased, as torch) std over channels."""
    return np.stack([features.mean(1), features.max(1), features.std(1, ddof=1)], axis=1).astype(np.float32)


# --- the runners: one interface, whichever runtime --------------------------------------------
class Runner:
    """What the engine loop asks of a runtime: run one batch of windows (channels + model) and say what it
    runs on.  ``open_runner`` picks and opens one; the loop never asks which."""

    runtime = ""             # "torch", "onnxruntime" or "openvino"
    device_type = "cpu"      # "cuda" or "cpu" (how many reader threads feed it)
    description = ""         # the device, as the log names it
    precision = "fp32"
    precision_why = ""
    why = ""                 # why this runtime (set by open_runner)
    tta = False              # test-time flips: the probability is the mean over the 8 flips of each window

    def auto_batch_size(self, window: int) -> int:
        """Windows per batch when the user sets none."""
        raise NotImplementedError

    def prepare(self, batch_size: int, window: int) -> None:
        """Load/compile what the first batch would, so timing starts with the mapping."""

    def run(self, batch, plan, batch_size: int, reporter) -> Tuple[Dict[str, np.ndarray], int]:
        """Channels + model for ``batch`` [(y0, x0, data, valid), ...]: ({output name: (N, C, h, w) values,
        numpy or still on the device}, the batch size to go on with)."""
        raise NotImplementedError


class TorchRunner(Runner):
    """The torch path: channels on the device, channels_last, bf16 autocast on CUDA, out-of-memory halving."""

    runtime = "torch"

    def __init__(self, bundle, stages: Sequence[str] = (), stage_mode: str = "compact", threads: int = 0,
                 precision: str = "auto", device: str = "auto"):
        import torch
        from .device import auto_batch_size, choose_device
        if threads:
            torch.set_num_threads(threads)
        self.device, self.description = choose_device(device)
        self.device_type = self.device.type
        self.fast = use_bf16(precision, self.device)
        self.precision = "bf16" if self.fast else "fp32"
        self.precision_why = ("asked for" if precision != "auto" else
                              "auto on the CUDA GPU" if self.fast else
                              "torch runs fp32 on the CPU (OpenVINO runs bf16 where the CPU has it)")
        self.precision_why += (" (bf16 autocast, channels_last memory format)" if self.fast
                               else " (channels_last memory format)")
        self._auto_batch_size = auto_batch_size
        self.bundle, self.stages, self.stage_mode = bundle, list(stages), stage_mode
        # channels_last suits both cuDNN and oneDNN: +13 % windows/s on the 2-core CPU, more on GPUs
        self.model = bundle.model.to(self.device).eval().to(memory_format=torch.channels_last)

    def auto_batch_size(self, window: int) -> int:
        return self._auto_batch_size(self.device, window)

    def run(self, batch, plan, batch_size, reporter):
        return _run_batch(self.model, self.bundle, plan, batch, self.stages, self.stage_mode, self.device,
                          self.fast, batch_size, reporter, self.tta)


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


class OnnxRunner(Runner):
    """Runs an exported model on the CPU: numpy channels in, probability (and stages) out."""

    def __init__(self, model: OnnxModel, stages: Sequence[str], stage_mode: str, threads: int, precision: str):
        missing = [s for s in stages if s not in model.outputs]
        if missing:
            raise ValueError(f"{Path(model.path).name} was exported without the stage maps "
                             f"{', '.join(missing)}: export it with stages (python -m menet_qgis export --stages)")
        self.model, self.stages, self.stage_mode = model, list(stages), stage_mode
        self.threads = threads or default_threads()
        self.precision, self.precision_why = cpu_precision(self.runtime, precision)
        self.output_names = ["probability"] + self.stages

    @property
    def description(self) -> str:
        return f"CPU, {self.runtime} {self.version()}, {self.threads} threads, {self.precision}"

    def version(self) -> str:
        return ""

    def auto_batch_size(self, window: int) -> int:
        """4 windows of 256² per call (as torch on the CPU); fewer for larger windows."""
        return max(1, int(round(4 / (window / 256.0) ** 2)))

    def run(self, batch, plan, batch_size: int, reporter):
        raw = np.stack([b[2] for b in batch])
        valid = np.stack([b[3] for b in batch])
        x = prepare_batch_numpy(raw, valid, self.model, plan)
        out = self.infer(x, batch_size)
        result = {"probability": out["probability"]}
        if self.tta:
            result["probability"] = mean_over_flips(
                lambda view: self.infer(np.ascontiguousarray(view), batch_size)["probability"], x, first=out["probability"])
        for name in self.stages:
            result[name] = out[name] if self.stage_mode == "all" else compact_stage_numpy(out[name])
        return result, batch_size

    def infer(self, x: np.ndarray, batch_size: int = 0) -> Dict[str, np.ndarray]:
        """The model on normalised input; ``batch_size`` is the size batches usually have."""
        raise NotImplementedError


#: Sessions / compiled models kept between runs in one process (a batch of inputs,
#: the worker): loading ResNet-101 costs seconds.  Keyed by file, runtime and settings.
_CACHE: "OrderedDict" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 2


def _cached(key, make):
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    value = make()
    with _CACHE_LOCK:
        _CACHE[key] = value
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return value


class OnnxRuntimeRunner(OnnxRunner):
    runtime = "onnxruntime"

    def __init__(self, model, stages, stage_mode, threads, precision):
        super().__init__(model, stages, stage_mode, threads, precision)
        if self.precision != "fp32":
            raise RuntimeChoiceError("onnxruntime runs fp32 on the CPU; bf16 needs runtime openvino "
                                     "(on a CPU with bf16 instructions) or torch")
        import onnxruntime as ort
        self.ort = ort

        def make():
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            return ort.InferenceSession(model.path, options, providers=["CPUExecutionProvider"])

        try:
            self.session = _cached((model.path, self.runtime, self.threads), make)
        except Exception as exc:  # noqa: BLE001 (onnxruntime's errors are plain Exceptions of many types)
            raise _runtime_failure(self, "load", exc) from None
        self.input_name = self.session.get_inputs()[0].name

    def version(self) -> str:
        return self.ort.__version__

    def infer(self, x, batch_size=0):
        try:
            values = self.session.run(self.output_names, {self.input_name: x})
        except Exception as exc:  # noqa: BLE001 (as above)
            raise _runtime_failure(self, "run", exc) from None
        return dict(zip(self.output_names, values))


def openvino_bf16_supported() -> bool:
    """Whether OpenVINO runs bf16 on this CPU (it refuses to emulate it)."""
    import openvino as ov
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoRunner(OnnxRunner):
    """OpenVINO on the CPU, compiled for a fixed (batch, 11, window, window) input:
    static shapes let it pick its fastest kernels; a short last batch is padded."""

    runtime = "openvino"

    def __init__(self, model, stages, stage_mode, threads, precision):
        super().__init__(model, stages, stage_mode, threads, precision)
        import openvino as ov
        self.ov = ov
        if self.precision == "bf16" and not openvino_bf16_supported():
            caps = ", ".join(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
            raise RuntimeChoiceError(f"bf16 needs a CPU with bf16 instructions (AVX512-BF16 or AMX); "
                                     f"this CPU offers {caps}: use fp32")
        self.compiled = {}

    def version(self) -> str:
        return self.ov.__version__.split("-")[0]

    def _request(self, shape):
        def make():
            core = self.ov.Core()
            net = core.read_model(self.model.path)
            if len(net.outputs) > len(self.output_names):  # only the outputs read: no stage map copied out
                net = self.ov.Model([net.output(name) for name in self.output_names], net.get_parameters(),
                                    net.get_friendly_name())
            net.reshape({net.inputs[0].get_any_name(): list(shape)})
            config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                      # explicit: on a bf16-capable CPU OpenVINO's default would be bf16
                      "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32"}
            return core.compile_model(net, "CPU", config)

        try:
            compiled = _cached((self.model.path, self.runtime, self.threads, self.precision, tuple(shape),
                                tuple(self.output_names)), make)
            return compiled.create_infer_request(), compiled
        except RuntimeError as exc:  # OpenVINO's reading, reshaping and compiling errors
            raise _runtime_failure(self, "load", exc) from None

    def prepare(self, batch_size, window):
        self._compiled_for((batch_size, ch.N_CHANNELS, window, window))

    def _compiled_for(self, shape):
        if shape not in self.compiled:
            self.compiled[shape] = self._request(shape)
        return self.compiled[shape]

    def infer(self, x, batch_size=0):
        n = x.shape[0]
        size = max(n, batch_size)
        request, compiled = self._compiled_for((size,) + x.shape[1:])
        if n < size:
            x = np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)])
        try:
            result = request.infer({0: x})
        except RuntimeError as exc:
            raise _runtime_failure(self, "run", exc) from None
        return {name: np.array(result[compiled.output(name)][:n]) for name in self.output_names}


RUNNERS = {"onnxruntime": OnnxRuntimeRunner, "openvino": OpenVinoRunner}


def open_onnx_runner(runtime: str, model: OnnxModel, stages, stage_mode, threads, precision) -> OnnxRunner:
    return RUNNERS[runtime](model, stages, stage_mode, threads, precision)


def open_runner(model, options, stages: Sequence[str], reporter=None) -> Runner:
    """The runner for ``options.runtime`` (auto: see ``choose_runtime``), with ``model`` as that runtime runs it
    (``model_for_runtime``); ``.why`` says why this runtime.  ``options``: the engine's (runtime, device,
    precision, threads, stage_mode, tta)."""
    name, why = check_model_fits(model, options.runtime, options.device, stages)
    if options.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {options.precision!r}")
    model = model_for_runtime(model, name, stages, reporter)
    if name == "torch":
        runner = TorchRunner(model, stages, options.stage_mode, options.threads, options.precision, options.device)
    else:
        runner = open_onnx_runner(name, model, stages, options.stage_mode, options.threads, options.precision)
    runner.why, runner.tta = why, options.tta
    return runner


# --- loading: the model as a runtime runs it --------------------------------------------------------
def load_model(path, runtime: str = "auto", device: str = "auto", stages: Sequence[str] = (), reporter=None):
    """The model ready for the chosen runtime: an ``OnnxModel`` for .onnx files and, for the ONNX runtimes,
    for checkpoints (their export: cached, else made now where torch is installed); else the checkpoint
    loaded with torch."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return read_onnx_model(path)
    if not path.is_file():
        raise ValueError(f"model file not found: {path}")
    name, _why = choose_runtime(runtime, device, "file")
    if name != "torch":
        cached = find_cached(path, file_sha256(path), need_for(stages))
        if cached is not None:
            return read_onnx_model(cached)
        if not torch_importable():
            raise TorchRequired(torch_required_message(path))
    from ..model.checkpoint import load
    return model_for_runtime(load(path), name, stages, reporter)


def model_for_runtime(model, runtime: str, stages: Sequence[str] = (), reporter=None):
    """``model`` as ``runtime`` runs it: torch runs the checkpoint, the ONNX runtimes its export (with the
    stage maps when ``stages`` asks for them), exported and checked once (``ensure_onnx``)."""
    if runtime == "torch" or isinstance(model, OnnxModel):
        return model
    return ensure_onnx(model, need_for(stages), reporter)


def ensure_onnx(bundle, need: str = "probability", reporter=None) -> OnnxModel:
    """The cached export of ``bundle``'s checkpoint for ``need``; exported and checked the first time."""
    if not bundle.path:
        raise ValueError("the ONNX runtimes need a model saved to a file (the export is cached by its sha256)")
    checkpoint = Path(bundle.path)
    sha = file_sha256(checkpoint)
    cached = find_cached(checkpoint, sha, need)
    if cached is not None:
        return read_onnx_model(cached)
    target = writable_cache_path(checkpoint, sha, need)
    if reporter:
        reporter.info(f"exporting {checkpoint.name} to ONNX ({need}) once; cached as {target}")
    from .export import export  # a checkpoint in memory means torch is here
    export(bundle, target, need, sha)
    model = read_onnx_model(target)
    try:
        diff = check_against_torch(bundle, model, check_input(bundle, bundle.window_size))
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    if reporter:
        reporter.info(f"ONNX export checked against torch: max probability difference {diff:.1e}")
    return model


#: Largest |torch - exported| probability difference accepted (fp32 on the CPU).
TOLERANCE = 1e-4


def check_against_torch(bundle, onnx_model: OnnxModel, x: np.ndarray, runtime: str = "") -> float:
    """Max |probability difference| between torch and the exported model on input ``x``
    (normalised, (N, 11, H, W)); raises if it exceeds TOLERANCE."""
    import torch
    runtime = runtime or ("onnxruntime" if installed("onnxruntime") else "openvino")
    runner = open_onnx_runner(runtime, onnx_model, [], "compact", 0, "fp32")
    got = runner.infer(x)["probability"]
    with torch.inference_mode():
        want = torch.sigmoid(bundle.model.float().cpu().eval()(torch.from_numpy(x))).numpy()
    diff = float(np.abs(got - want).max())
    if not diff <= TOLERANCE:
        raise RuntimeError(f"the ONNX export of {Path(bundle.path or 'the model').name} differs from torch "
                           f"by {diff:.2g} (> {TOLERANCE:g}) in {runtime}: use runtime torch")
    return diff


def check_input(bundle, window: int, seed: int = 0) -> np.ndarray:
    """Two windows of plausible model input: coastal reflectance through the recipe and normalisation."""
    from ..io.bands import InputPlan
    rng = np.random.default_rng(seed)
    classes = np.array([[0.03, 0.05, 0.03, 0.28, 0.13, 0.06], [0.06, 0.07, 0.05, 0.03, 0.02, 0.01],
                        [0.08, 0.10, 0.12, 0.18, 0.25, 0.20]], np.float32)
    blocks = rng.integers(0, len(classes), (2, window // 32, window // 32))
    refl = classes[blocks].transpose(0, 3, 1, 2).repeat(32, 2).repeat(32, 3)
    refl = (refl + rng.normal(0, 0.01, refl.shape)).clip(0.001, 1).astype(np.float32)
    refl = refl[:, [ch.RECIPE_V1.source_bands.index(b) for b in bundle.recipe.source_bands]]
    plan = InputPlan(kind="sentinel2", band_indexes=list(range(1, refl.shape[1] + 1)))
    return prepare_batch_numpy(refl, np.ones((2, window, window), bool), bundle, plan)


def torch_required_message(checkpoint: Path) -> str:
    """Why a ``.pt`` cannot run in this Python, and which file to use instead: for the default
    model its ``.onnx`` asset (what a Python without torch installs)."""
    from ...resources import DEFAULT_MODEL_BASE
    name = Path(checkpoint).name
    if Path(checkpoint).stem == DEFAULT_MODEL_BASE:
        asset = f"{DEFAULT_MODEL_BASE}.onnx"
        return (f"{name} is the torch checkpoint of the default model (for training and fine-tuning); "
                f"without torch install its ONNX asset {asset} instead: 'Install model' in QGIS, or "
                f"`python -m menet_qgis install-model dist/{asset}` (it runs with onnxruntime or OpenVINO)")
    return (f"{name} is a torch checkpoint and has not been exported to ONNX: export it once where torch "
            f"is installed (`python -m menet_qgis export {name} --stages --out {Path(name).stem}.onnx`) "
            f"and give that .onnx here, or install torch")
