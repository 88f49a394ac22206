"""Option values shared by the CLI, the Processing layer and the engine — stdlib only,
so argument parsers and dialogs can list them without importing numpy or a runtime."""

#: Inference runtimes; "auto" = torch on a CUDA GPU, else OpenVINO, else ONNX Runtime, else torch.
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
#: Numeric precision; "auto" = bf16 autocast on CUDA; on the CPU bf16 in OpenVINO where the CPU has
#: AVX512_BF16 or AMX-BF16, else fp32 (``runtimes.auto_cpu_precision``).
PRECISIONS = ("auto", "fp32", "bf16")
#: Overlap of neighbouring windows when the user sets none (px).  32 rather than 64: 24 % fewer
#: windows on the Jambelí scene for the same validation F1 (0.9305 vs 0.9309) and 0.29 % of pixels
#: changing class; 0 saves 43 % but leaves seams (max |Δp| 0.90 at window edges).  scripts/overlap_study.py.
DEFAULT_OVERLAP = 32


def decision_threshold(training) -> float:
    """The probability at which a model calls a pixel mangrove: chosen on validation when it was
    trained and stored with it (``training["threshold"]``), 0.5 for models from before that."""
    value = training.get("threshold", 0.5)
    return float(value) if isinstance(value, (int, float)) and 0.0 < value < 1.0 else 0.5
