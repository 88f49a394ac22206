"""`make run`: the main job through qgis_process on a default input, then a plain summary.

Input: ../shared/data/jambeli/scene_2020.tif when it exists (real Sentinel-2),
else a generated Sentinel-2-like raster (synthetic_s2.py, beside this script; said
so).  Model: the shipped default model, else an untrained checkpoint (said so:
its probabilities mean nothing).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import rasterio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from menet_qgis.model_store import default_model_path  # noqa: E402
from synthetic_s2 import generate  # noqa: E402

SCENE = ROOT.parent / "shared" / "data" / "jambeli" / "scene_2020.tif"
OUT = ROOT / "build" / "run"


def untrained_model(path: Path) -> Path:
    from menet_qgis.core.model import checkpoint
    checkpoint.save(checkpoint.new_bundle(seed=0), path, half=True)
    return path


def log_lines(result: dict) -> list:
    """qgis_process --json puts the algorithm's log under log.info, as a string or a list."""
    info = result.get("log", {}).get("info", "") if isinstance(result.get("log"), dict) else ""
    return info if isinstance(info, list) else info.splitlines()


def describe(path: Path, threshold: float = 0.5) -> str:
    with rasterio.open(path) as ds:
        data = ds.read(1)
        valid = np.isfinite(data)
        pixel_ha = abs(ds.transform.a * ds.transform.e) / 10000.0
        lines = [f"  {path}",
                 f"    {ds.width} x {ds.height} px, {ds.count} band(s) {ds.dtypes[0]}, {ds.crs}, "
                 f"pixel {ds.transform.a:g} m, origin ({ds.transform.c:.1f}, {ds.transform.f:.1f})",
                 f"    valid pixels {valid.mean():.1%}; band 1 range {np.nanmin(data):.3f}..{np.nanmax(data):.3f}"
                 if valid.any() else "    no valid pixels"]
        if ds.count == 1 and valid.any():
            mangrove = np.count_nonzero(data[valid] >= threshold)
            lines.append(f"    probability >= {threshold}: {mangrove} px = {mangrove * pixel_ha:.1f} ha "
                         f"({mangrove / valid.sum():.1%} of valid pixels)")
        return "\n".join(lines)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    notes = []
    if SCENE.is_file():
        source = SCENE
        notes.append(f"input: REAL Sentinel-2 scene {SCENE}")
    else:
        source = generate(OUT / "demo_input.tif", 640)
        notes.append(f"input: GENERATED demo raster {source} ({SCENE} not found) — not real imagery")
    model = default_model_path()
    if model.is_file():
        notes.append(f"model: default model {model}")
    else:
        model = untrained_model(OUT / "untrained.pt")
        notes.append(f"model: UNTRAINED checkpoint {model} (no default model shipped yet) — "
                     "the probability map is meaningless, this run only shows the pipeline")
    out = OUT / f"{source.stem}_probability.tif"
    cmd = ["/usr/bin/qgis_process.bin", "--json", "run", "menet:extractmangroves", "--", f"INPUT={source}",
           f"MODEL={model}", f"OUTPUT={out}", "STAGES=3", "STAGES=5", f"STAGE_FOLDER={OUT / 'stages'}"]
    print("running: " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if proc.returncode != 0:
        print(proc.stdout[-4000:] + proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    print("\n".join(line for line in log_lines(result)
                    if line.startswith(("input bands", "device", "windows", "ran the model"))))
    print("\n".join(notes))
    print("outputs:")
    print(describe(Path(result["results"]["OUTPUT"])))
    for stage in result["results"].get("STAGE_LAYERS", []):
        print(describe(Path(stage)) + "  (stage layer: mean / max / std of channels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
