"""ME-Net: torchvision ResNet-101 stage extractor (11-channel conv1) + ME-Net head.

Stages come from ``torchvision.models.feature_extraction.create_feature_extractor``
(torch.fx) rather than slicing ``children()`` into Sequentials: that gives the
feature maps themselves, by node name, and keeps the backbone's own forward.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torchvision.models import ResNet101_Weights, resnet101
from torchvision.models.feature_extraction import create_feature_extractor

from .channels import N_CHANNELS
from .head import MENetHead
from .stages import STAGES, return_nodes

ARCHITECTURE = "menet-resnet101"
#: v2 = v1 + the image-guided refinement; a model without it is still written as v1,
#: so plugins that only know v1 keep reading it.
ARCHITECTURE_VERSION = 2
ARCHITECTURE_VERSIONS = (1, 2)
DEFAULT_HEAD_WIDTH = 64


def imagenet_weight_candidates() -> list:
    """Where torchvision would have cached its ImageNet ResNet-101 weights (never downloaded here)."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return [hub / os.path.basename(w.url) for w in (ResNet101_Weights.IMAGENET1K_V2, ResNet101_Weights.IMAGENET1K_V1)]


def find_imagenet_weights(path: Optional[str] = None) -> Optional[Path]:
    """The user's file if given (must exist), else the first cached torchvision file, else None."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"ImageNet weight file not found: {p}")
        return p
    return next((p for p in imagenet_weight_candidates() if p.is_file()), None)


def mean_rgb_conv1(rgb_weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """11-channel conv1 kernel from a pretrained (64, 3, 7, 7) RGB kernel.

    Every new input channel gets the arithmetic mean of the pretrained R, G and
    B kernels, scaled by 3 / in_channels: a conv over ``in_channels`` equal
    inputs then responds exactly as the pretrained conv over a grey RGB image,
    so activations keep the magnitude the rest of the pretrained network expects.
    """
    if rgb_weight.ndim != 4 or rgb_weight.shape[1] != 3:
        raise ValueError(f"expected a (out, 3, k, k) RGB kernel, got {tuple(rgb_weight.shape)}")
    mean = rgb_weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (3.0 / in_channels)


def build_backbone(in_channels: int = N_CHANNELS,
                   imagenet_state: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
    """torchvision resnet101 with conv1 for ``in_channels``; ImageNet weights if given."""
    net = resnet101(weights=None)
    if imagenet_state is not None:
        state = {k: v for k, v in imagenet_state.items() if not k.startswith("fc.")}
        rgb = state.pop("conv1.weight")
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"conv1.weight", "fc.weight", "fc.bias"}:
            raise ValueError(f"ImageNet state dict does not fit ResNet-101 (missing {missing[:3]}, unexpected {unexpected[:3]})")
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if imagenet_state is not None:
        with torch.no_grad():
            net.conv1.weight.copy_(mean_rgb_conv1(rgb, in_channels))
    return net


class MENet(nn.Module):
    """Stage-extracting ResNet-101 encoder + ME-Net head; one logit per input pixel."""

    def __init__(self, in_channels: int = N_CHANNELS, head_width: int = DEFAULT_HEAD_WIDTH,
                 imagenet_state: Optional[Dict[str, torch.Tensor]] = None, refine_width: int = 0,
                 label_styles: int = 1):
        super().__init__()
        self.in_channels = in_channels
        self.head_width = head_width
        self.refine_width = refine_width
        self.encoder = create_feature_extractor(build_backbone(in_channels, imagenet_state), return_nodes())
        self.head = MENetHead({s.name: s.channels for s in STAGES}, head_width, in_channels, refine_width,
                              label_styles)

    def forward_with_stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        stages = self.encoder(x)
        return self.head(stages, x), stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_stages(x)[0]

    def architecture_record(self) -> Dict:
        if self.head.label_styles != 1:
            raise ValueError("a model with several label-style outputs is a training-time model: "
                             "keep one style (head.keep_label_style) before saving or exporting it")
        if not self.refine_width:
            return {"name": ARCHITECTURE, "version": 1, "in_channels": self.in_channels, "head_width": self.head_width}
        return {"name": ARCHITECTURE, "version": 2, "in_channels": self.in_channels, "head_width": self.head_width,
                "refine_width": self.refine_width}
