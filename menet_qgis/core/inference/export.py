"""Export a checkpoint's network to ONNX once, check it against torch, cache it by sha256.

Needs torch (and the ``onnx`` package to write the model record into the
file's metadata); running the exported file does not.  The legacy TorchScript
exporter (``dynamo=False``) is used: it exports every op of the network with
dynamic batch/height/width in a few seconds, matches torch within 1e-5, and
needs no ``onnxscript``.  Two graph variants exist per checkpoint:
``probability`` (lean, the usual run) and ``stages`` (the probability plus
every stage map as extra outputs; the shipped model asset is this one).

Weights are stored in fp16 wherever that is exact, each behind a Cast to fp32:
checkpoints are saved in fp16 (``checkpoint.save(half=True)``), so a shipped
model's every weight is exact and the file is as small as its ``.pt`` while the
runtimes compute in fp32 with the very same values.  ONNX Runtime folds the
Casts at session creation and OpenVINO decompresses the constants when it
compiles (neither keeps a Cast or Convert in its optimised graph).  For the
same reason batch normalisation is exported unfused (``TrainingMode.PRESERVE``
on a model in eval mode): folded into the convolutions its weights would no
longer be fp16 values; both runtimes fuse it themselves when they load.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..model import channels as ch
from ..files import atomic_path, file_sha256
from .onnx_model import METADATA_KEY, NEEDS, model_record
from ..model.stages import STAGE_NAMES

OPSET = 17
#: How the weights are stored, recorded in the file's model record.
WEIGHT_STORAGE = "fp16 where exact (Cast to fp32), else fp32"


class _Exported(torch.nn.Module):
    def __init__(self, model, with_stages: bool):
        super().__init__()
        self.model, self.with_stages = model, with_stages

    def forward(self, x):
        logits, stages = self.model.forward_with_stages(x)
        prob = torch.sigmoid(logits)
        return (prob, *[stages[name] for name in STAGE_NAMES]) if self.with_stages else prob


def store_fp16(graph) -> int:
    """Store every fp32 initializer that fp16 holds exactly as fp16, read through a Cast to fp32
    (lossless by construction); returns how many were converted."""
    from onnx import TensorProto, helper, numpy_helper
    casts = []
    for tensor in graph.initializer:
        if tensor.data_type != TensorProto.FLOAT:
            continue
        value = numpy_helper.to_array(tensor)
        half = value.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), value):
            continue
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(half, f"{name}.fp16"))
        casts.append(helper.make_node("Cast", [f"{name}.fp16"], [name], name=f"{name}.to_fp32",
                                      to=TensorProto.FLOAT))
    nodes = casts + list(graph.node)  # the Casts first: the graph stays topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    return len(casts)


def export(bundle, path, need: str = "probability", source_sha256: Optional[str] = None, window: int = 0) -> Path:
    """Write ``bundle``'s network as ONNX to ``path`` (atomically), the model record in its metadata.

    The same checkpoint and versions give the same bytes (no time or path inside), so a
    release's hash can be checked.  ``source_sha256`` defaults to the checkpoint file's."""
    if need not in NEEDS:
        raise ValueError(f"need must be one of {', '.join(NEEDS)}")
    import onnx
    if source_sha256 is None and bundle.path and Path(bundle.path).is_file():
        source_sha256 = file_sha256(bundle.path)
    window = window or bundle.window_size
    outputs = ["probability"] + (list(STAGE_NAMES) if need == "stages" else [])
    wrapper = _Exported(bundle.model.float().cpu().eval(), need == "stages").eval()
    example = torch.zeros(1, ch.N_CHANNELS, window, window)
    dynamic = {name: {0: "batch", 2: f"{name}_height", 3: f"{name}_width"} for name in outputs}
    dynamic["x"] = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its own deprecation
        torch.onnx.export(wrapper, (example,), buffer, input_names=["x"], output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE)  # the model is in eval mode: BN unfused
    proto = onnx.load_from_string(buffer.getvalue())
    store_fp16(proto.graph)
    onnx.checker.check_model(proto)
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps({**model_record(bundle, outputs, source_sha256), "weights": WEIGHT_STORAGE},
                             separators=(",", ":"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path
