"""Which runtime runs the model: torch, ONNX Runtime or OpenVINO — and the two ONNX runners.

Most QGIS users map on a CPU.  There the same network exported to ONNX runs
faster in ONNX Runtime or OpenVINO than in torch eager mode (1.3–1.7× on a quiet
2-core AVX2 CPU, 2–4× when the CPU is busy: docs/performance.md), and neither
needs torch's 5 GB: this module imports torch only to ask whether it sees a
CUDA GPU.  The channels are built in numpy (``channels.compute_channels_numpy``)
and the model's record (recipe, PCA, normalisation, window) travels in the ONNX
file's metadata, so an ``.onnx`` file alone is a complete model.

``auto`` picks CUDA torch when torch sees a GPU, else OpenVINO if installed,
else ONNX Runtime, else torch; ``choose_runtime`` says why in one line.  On the
CPU ``auto`` precision is a rule of the CPU's flags (``auto_cpu_precision``):
bf16 in OpenVINO where the CPU computes bf16 natively, fp32 otherwise; the
engine logs the choice and its reason on every run.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..model import channels as ch
from ...options import PRECISIONS, RUNTIMES  # noqa: F401 (re-exported)
from ..model.flips import mean_over_flips
from ..model.stages import STAGE_NAMES

#: The ONNX file's metadata_props key holding the model record (JSON).
METADATA_KEY = "menet_qgis"
ONNX_FORMAT = "menet_qgis.onnx"
ONNX_FORMAT_VERSION = 1
#: Graph variants: the probability alone (lean, the usual run) or with every stage map.
NEEDS = ("probability", "stages")
PYPI_NAME = {"onnxruntime": "onnxruntime", "openvino": "openvino", "torch": "torch"}


class RuntimeChoiceError(ValueError):
    """A runtime that cannot run this model here; the message says what to do."""


class TorchRequired(RuntimeChoiceError):
    """The step needs torch and this Python has none (e.g. a checkpoint never exported to ONNX)."""


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
    (Measured in scripts/bench.py --threads-sweep; see docs/performance.md.)"""
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


# --- the model as the ONNX runtimes see it -------------------------------------
@dataclass
class OnnxModel:
    """An exported model plus what the pipeline needs to feed it (no torch inside).

    Duck-types the fields of ``checkpoint.ModelBundle`` the engine reads."""

    path: str
    norm_mean: List[float]
    norm_std: List[float]
    pca: ch.PCABasis
    outputs: List[str]
    window_size: int = 256
    training: Dict = field(default_factory=dict)
    source: Optional[str] = None          # the checkpoint it was exported from
    source_sha256: Optional[str] = None
    recipe: ch.Recipe = ch.RECIPE_V1

    @property
    def trained(self) -> bool:
        return bool(self.training.get("trained", False))

    @property
    def threshold(self) -> float:
        from ...model_records import decision_threshold
        return decision_threshold(self.training)

    @property
    def has_stages(self) -> bool:
        return all(name in self.outputs for name in STAGE_NAMES)


def model_record(bundle, outputs: Sequence[str], source_sha256: Optional[str]) -> Dict:
    """The JSON stored in an exported file: everything but the weights (plain types only)."""
    from ..model.checkpoint import model_description  # a bundle to export means torch is there
    return {
        "format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, **model_description(bundle),
        "training": {k: v for k, v in bundle.training.items() if k != "val_names"},
        "outputs": list(outputs),
        "source": Path(bundle.path).name if bundle.path else None,
        "source_sha256": source_sha256,
    }


def read_onnx_model(path) -> OnnxModel:
    """Load an exported model's record (from the file's metadata, else its ``.json`` sidecar) and check it.
    The record is read by ``model_records.onnx_record`` (the standard library, the weights skipped): no runtime
    session is built just to read 5 kB of JSON, and a Python without any runtime can read it too."""
    from ...model_records import ModelRecordError, onnx_record
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file not found: {path}")
    try:
        record = onnx_record(path)
    except ModelRecordError as exc:
        raise ValueError(f"{exc}: export it with `python -m menet_qgis export`") from None
    if record.get("format_version") != ONNX_FORMAT_VERSION:
        raise ValueError(f"{path.name}: ME-Net ONNX format {record.get('format')} v{record.get('format_version')}, "
                         f"this plugin reads {ONNX_FORMAT} v{ONNX_FORMAT_VERSION}")
    try:
        recipe = ch.recipe_for(record.get("recipe", {}))
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from None
    norm = record["normalisation"]
    return OnnxModel(str(path), list(norm["mean"]), list(norm["std"]), ch.PCABasis.from_record(record["pca"]),
                     list(record["outputs"]), int(record.get("window_size", 256)), dict(record.get("training", {})),
                     record.get("source"), record.get("source_sha256"), recipe)


# --- the export cache ------------------------------------------------------------
def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def need_for(stages: Sequence[str]) -> str:
    return "stages" if stages else "probability"


def cache_dirs(checkpoint: Path) -> List[Path]:
    """Where exports are looked for, in order: beside the checkpoint, then ``<menet home>/onnx``."""
    from ...user_paths import menet_home
    return [Path(checkpoint).resolve().parent, menet_home() / "onnx"]


def cache_name(checkpoint: Path, sha256: str, need: str) -> str:
    return f"{Path(checkpoint).stem}.{sha256[:16]}.{need}.onnx"


def find_cached(checkpoint: Path, sha256: str, need: str) -> Optional[Path]:
    """An export of this very checkpoint: a cached one, or the ``.onnx`` of the same name beside it
    (the model asset installed with its ``.pt``) when its record names the checkpoint's sha256."""
    for folder in cache_dirs(checkpoint):
        for candidate_need in (need, "stages"):  # the stages graph also serves the probability alone
            candidate = folder / cache_name(checkpoint, sha256, candidate_need)
            if candidate.is_file():
                return candidate
    sibling = Path(checkpoint).with_suffix(".onnx")
    if sibling.is_file():
        try:
            model = read_onnx_model(sibling)
        except (ValueError, KeyError, ImportError):
            return None
        if model.source_sha256 == sha256 and (need == "probability" or model.has_stages):
            return sibling
    return None


def writable_cache_path(checkpoint: Path, sha256: str, need: str) -> Path:
    """Beside the checkpoint when that folder is writable, else ``<menet home>/onnx``."""
    for folder in cache_dirs(checkpoint):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder / cache_name(checkpoint, sha256, need)
    raise OSError(f"no writable folder for the ONNX export of {Path(checkpoint).name} "
                  f"(tried {', '.join(str(d) for d in cache_dirs(checkpoint))})")


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


def prepare_batch_numpy(raw: np.ndarray, valid: np.ndarray, model, plan) -> np.ndarray:
    """numpy twin of ``engine.prepare_batch``: (N, bands, H, W) raw + (N, H, W) validity ->
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


# --- the ONNX runners --------------------------------------------------------------
class OnnxRunner:
    """Runs an exported model on the CPU: numpy channels in, probability (and stages) out."""

    runtime = ""
    tta = False  # test-time flips (see flips.py), set by the engine

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

    def prepare(self, batch_size: int, window: int) -> None:
        """Load/compile what the first batch would, so timing starts with the mapping."""

    def run(self, batch, plan, batch_size: int, reporter):
        """Channels + model for one batch; returns ({name: array}, batch size)."""
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

        self.session = _cached((model.path, self.runtime, self.threads), make)
        self.input_name = self.session.get_inputs()[0].name

    def version(self) -> str:
        return self.ort.__version__

    def infer(self, x, batch_size=0):
        values = self.session.run(self.output_names, {self.input_name: x})
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

        compiled = _cached((self.model.path, self.runtime, self.threads, self.precision, tuple(shape),
                            tuple(self.output_names)), make)
        return compiled.create_infer_request(), compiled

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
        result = request.infer({0: x})
        return {name: np.array(result[compiled.output(name)][:n]) for name in self.output_names}


RUNNERS = {"onnxruntime": OnnxRuntimeRunner, "openvino": OpenVinoRunner}


def open_onnx_runner(runtime: str, model: OnnxModel, stages, stage_mode, threads, precision) -> OnnxRunner:
    return RUNNERS[runtime](model, stages, stage_mode, threads, precision)


def load_model(path, runtime: str = "auto", device: str = "auto", stages: Sequence[str] = (), reporter=None):
    """The model ready for the chosen runtime: an ``OnnxModel`` for .onnx files and for
    checkpoints already exported (no torch needed), else the checkpoint loaded with torch."""
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
    return load(path)


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
