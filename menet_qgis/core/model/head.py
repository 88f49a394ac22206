"""ME-Net's segmentation head: the three modules the paper names and a decoder.

Guo et al. (Remote Sensing 2021, 13(7), 1292) name a multiscale context
embedding, a global attention module and a boundary fitting unit; the full
text and code were not available to us, so each class says what the paper
states and what we chose.  Everything is sized for speed: stage maps are first
projected to ``width`` channels so the head costs a few percent of the encoder.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn
import torch.nn.functional as F


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MultiscaleContextEmbedding(nn.Module):
    """Multiscale context embedding (MCE) on the deepest stage.

    Paper: parallel convolutions with different kernel sizes whose outputs are
    concatenated along the channel axis.  Our choice: 1x1, 3x3, 5x5 and a 3x3
    with dilation 2 branches of ``width`` channels each, concatenated and fused
    back to ``width`` channels by a 1x1 convolution.
    """

    def __init__(self, cin: int, width: int):
        super().__init__()
        self.branches = nn.ModuleList([
            conv_bn_relu(cin, width, 1),
            conv_bn_relu(cin, width, 3),
            conv_bn_relu(cin, width, 5),
            conv_bn_relu(cin, width, 3, dilation=2),
        ])
        self.fuse = conv_bn_relu(4 * width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))


class GlobalAttentionModule(nn.Module):
    """Global attention module (GAM) between two adjacent stages.

    Paper: features of adjacent stages are concatenated to compute a weight
    vector that re-weights the lower stage's map, like the channel attention
    block of DFN (Yu et al., CVPR 2018).  Our choice, following DFN: global
    average pooling of the concatenated [upsampled higher, lower] maps, 1x1
    conv -> ReLU -> 1x1 conv -> sigmoid gives per-channel weights for the lower
    map; the higher map is added back so semantics flow downward.
    """

    def __init__(self, width: int):
        super().__init__()
        self.weights = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(2 * width, width, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 1),
            nn.Sigmoid(),
        )
        self.refine = conv_bn_relu(width, width, 3)

    def forward(self, higher: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        higher = F.interpolate(higher, size=lower.shape[-2:], mode="bilinear", align_corners=False)
        weight = self.weights(torch.cat([higher, lower], dim=1))
        return self.refine(lower * weight + higher)


class BoundaryFittingUnit(nn.Module):
    """Boundary fitting unit (BFU) on the score map.

    Paper: refines the boundary of the output map, like the boundary
    refinement block of GCN (Peng et al., CVPR 2017).  Our choice, as in GCN:
    a residual branch conv3x3 -> ReLU -> conv3x3 added to its input, applied at
    full resolution so it can move edges by single pixels.
    """

    def __init__(self, channels: int, groups: int = 1):
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=groups),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, groups=groups),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


class ImageGuidedRefinement(nn.Module):
    """Full-resolution refinement: lets the input pixels move the score map's edges.

    The decoder's finest map (stage0) is at half the input resolution, so without
    this every boundary is bilinearly interpolated; most errors lie within 2 px of
    a boundary.  A shallow 3x3 stem reads the model input at full resolution, a
    1x1 squeezes the decoder map, and a 3x3 over [image, decoder, coarse logit]
    predicts a correction added to the coarse logit.  The last conv starts at
    zero, so a model fine-tuned from one without refinement starts out equal to it.
    At ``width`` 16 a training epoch took 12 % longer.  Tried on the default model's
    recipe (``studies/ablate_coasts.sh refine16``, docs/experiments/rounds-1-3.md): no gain on validation, lower on
    the held-out coasts, so it is an option (``train --refine-width``), not the default.
    """

    def __init__(self, image_channels: int, decoder_channels: int, width: int):
        super().__init__()
        self.image_stem = conv_bn_relu(image_channels, width, 3)
        self.squeeze = conv_bn_relu(decoder_channels, width, 1)
        self.fuse = conv_bn_relu(2 * width + 1, width, 3)
        self.correction = nn.Conv2d(width, 1, 1)
        nn.init.zeros_(self.correction.weight)
        nn.init.zeros_(self.correction.bias)

    def forward(self, image: torch.Tensor, decoder: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        decoder = F.interpolate(self.squeeze(decoder), size=logit.shape[-2:], mode="bilinear", align_corners=False)
        return logit + self.correction(self.fuse(torch.cat([self.image_stem(image), decoder, logit], dim=1)))


class MENetHead(nn.Module):
    """Decoder: MCE on stage5, then GAM stage by stage up to stage0, then BFU.

    Each stage map is projected to ``width`` channels (1x1 conv), the MCE
    output is walked up through stage4, stage3, stage2 and stage0 (stage1 has
    stage2's resolution and only pooled stage0 features, so it is not fused),
    upsampled x2 to the input grid, turned into one logit, corrected from the
    input pixels when ``refine_width`` > 0 (``ImageGuidedRefinement``) and refined
    by the BFU.  ``forward`` returns logits; apply ``sigmoid`` for probability.

    ``label_styles`` > 1 (training only) gives each label style its own classifier and BFU
    (one output channel each, the BFU grouped so styles do not mix): sources whose labels draw a
    mangrove's edge differently (hand-drawn polygons against Global Mangrove Watch's coarse map)
    need not share one output.  ``keep_label_style`` cuts the head back to one style's output
    before a model is saved, so a saved model always has one output, as before.  Tried with
    MagSet-2 as a second style: lower than one shared output (docs/experiments/rounds-5-7.md, sixth round).
    """

    decoder_stages: Sequence[str] = ("stage4", "stage3", "stage2", "stage0")

    def __init__(self, stage_channels: Dict[str, int], width: int = 64, image_channels: int = 0,
                 refine_width: int = 0, label_styles: int = 1):
        super().__init__()
        if label_styles < 1 or (label_styles > 1 and refine_width):
            raise ValueError(f"label styles must be >= 1 and cannot be combined with the refinement "
                             f"(got {label_styles} styles, refinement width {refine_width})")
        self.width = width
        self.label_styles = label_styles
        self.context = MultiscaleContextEmbedding(stage_channels["stage5"], width)
        self.lateral = nn.ModuleDict({
            name: conv_bn_relu(stage_channels[name], width, 1) for name in self.decoder_stages
        })
        self.attention = nn.ModuleDict({name: GlobalAttentionModule(width) for name in self.decoder_stages})
        self.classifier = nn.Conv2d(width, label_styles, 1)
        self.refinement = ImageGuidedRefinement(image_channels, width, refine_width) if refine_width else None
        self.boundary = BoundaryFittingUnit(label_styles, groups=label_styles)

    def keep_label_style(self, style: int) -> None:
        """Keep one label style's classifier and BFU (a one-output head, as every saved model has)."""
        if not 0 <= style < self.label_styles:
            raise ValueError(f"label style {style} out of range (the head has {self.label_styles})")
        if self.label_styles == 1:
            return
        with torch.no_grad():
            for conv in (self.classifier, self.boundary.residual[0], self.boundary.residual[2]):
                conv.weight = nn.Parameter(conv.weight[style:style + 1].clone())
                conv.bias = nn.Parameter(conv.bias[style:style + 1].clone())
                conv.out_channels = 1
                if conv is not self.classifier:
                    conv.in_channels, conv.groups = 1, 1
        self.label_styles = 1

    def forward(self, stages: Dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        x = self.context(stages["stage5"])
        for name in self.decoder_stages:
            x = self.attention[name](x, self.lateral[name](stages[name]))
        logit = self.classifier(F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False))
        if self.refinement is not None:
            logit = self.refinement(image, x, logit)
        return self.boundary(logit)
