"""The encoder's stage table: which torchvision ResNet-101 node is ME-Net's stageN.

ME-Net names six encoder stages.  In torchvision's ``ResNet`` they are the
graph nodes below (read off ``torchvision/models/resnet.py``: ``forward`` runs
conv1 -> bn1 -> relu -> maxpool -> layer1 ... layer4).  Strides and channel
counts are those of stock ResNet-101; a 256 x 256 window gives the map sizes
in the last column.  The paper's figure shows 8x8x1024 and 4x4x2048 for the
two deepest stages, one more 2x downsampling than stock ResNet-101 has; no
public code says where it comes from, so we keep the stock network, whose
``layer3`` is 16x16x1024 and ``layer4`` 8x8x2048 at 256 x 256.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Tuple


@dataclass(frozen=True)
class Stage:
    name: str
    node: str
    stride: int
    channels: int
    description: str

    def map_size(self, window: int) -> int:
        return window // self.stride


STAGES: Tuple[Stage, ...] = (
    Stage("stage0", "relu", 2, 64, "conv1 -> bn1 -> relu"),
    Stage("stage1", "maxpool", 4, 64, "3x3 max pooling"),
    Stage("stage2", "layer1", 4, 256, "layer1: 3 bottleneck blocks"),
    Stage("stage3", "layer2", 8, 512, "layer2: 4 bottleneck blocks"),
    Stage("stage4", "layer3", 16, 1024, "layer3: 23 bottleneck blocks"),
    Stage("stage5", "layer4", 32, 2048, "layer4: 3 bottleneck blocks"),
)
STAGE_BY_NAME: Dict[str, Stage] = {s.name: s for s in STAGES}
STAGE_NAMES: List[str] = [s.name for s in STAGES]
#: Window origins and overlaps are multiples of this so every stage grid lines up.
MAX_STRIDE = max(s.stride for s in STAGES)


def return_nodes() -> Dict[str, str]:
    """Mapping for ``create_feature_extractor``: torchvision node -> stage name."""
    return {s.node: s.name for s in STAGES}


def parse_stage_names(names: Iterable[str]) -> List[str]:
    """Validate user-given stage names, keep table order, drop duplicates."""
    wanted = set()
    for name in names:
        key = name.strip().lower()
        if key not in STAGE_BY_NAME:
            raise ValueError(f"unknown stage {name!r}; choose from {', '.join(STAGE_NAMES)}")
        wanted.add(key)
    return [n for n in STAGE_NAMES if n in wanted]


def stage_table(window: int = 256) -> str:
    """The stage table as aligned text (CLI ``stages``, algorithm help, README)."""
    header = ("stage", "torchvision node", "stride", "channels", f"map at {window}²")
    rows = [header] + [
        (s.name, f"{s.node} ({s.description})", str(s.stride), str(s.channels),
         f"{s.map_size(window)}×{s.map_size(window)}×{s.channels}")
        for s in STAGES
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: The largest window accepted anywhere (dialog, CLI, batch, engine jobs, a model file's recorded window).
#: Memory grows with the window's square (a 2048 px window is 64 of the 256 px the models are trained on and
#: peaks at several GB on the CPU); a larger one only risks running out of memory (a 100000 px window would
#: ask for terabytes), and a raster larger than a window is tiled anyway.
MAX_WINDOW = 2048


def check_window(window: int, overlap: int) -> None:
    """Windows and overlaps in whole cells of the deepest stage, so every stage map tiles without seams, and
    windows no larger than ``MAX_WINDOW`` (standard library: the QGIS process checks a dialog's values with it;
    every front end and every model file's recorded window reach this check before anything is allocated)."""
    if window < 2 * MAX_STRIDE or window % MAX_STRIDE or window > MAX_WINDOW:
        raise ValueError(f"window size must be a multiple of {MAX_STRIDE} from {2 * MAX_STRIDE} to {MAX_WINDOW} px, "
                         f"got {window}")
    if overlap < 0 or overlap % MAX_STRIDE or overlap > window // 2:
        raise ValueError(f"overlap must be a multiple of {MAX_STRIDE} between 0 and half the window ({window // 2}), "
                         f"got {overlap}")
