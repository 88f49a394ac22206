"""Test helpers: real GeoTIFFs with real georeferencing, written with rasterio."""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "jambeli"
SCENE = SHARED / "scene_2020.tif"
TRAIN = SHARED / "train"
S2_NAMES = ["Blue", "Green", "Red", "NIR", "SWIR1", "SWIR2"]
UTM17S = "EPSG:32717"
ORIGIN = (611840.0, 9623040.0)
QGIS_PROCESS = "/usr/bin/qgis_process.bin"


def write_raster(path, data: np.ndarray, descriptions: Optional[Sequence[str]] = None, crs=UTM17S,
                 transform=None, nodata=None, tags=None) -> Path:
    """(bands, h, w) array -> GeoTIFF on a 10 m UTM grid (or the given one)."""
    data = np.asarray(data)
    count, height, width = data.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name,
                   transform=transform or from_origin(*ORIGIN, 10, 10), nodata=nodata)
    if crs is not None:
        profile["crs"] = crs
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        for i, text in enumerate(descriptions or [], 1):
            ds.set_band_description(i, text)
        if tags:
            ds.update_tags(**tags)
    return path


def s2_reflectance(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Plausible 6-band reflectance: a vegetated left half, water on the right."""
    rng = np.random.default_rng(seed)
    base = np.array([0.04, 0.06, 0.04, 0.30, 0.15, 0.07], np.float32)[:, None, None]
    water = np.array([0.06, 0.07, 0.05, 0.03, 0.02, 0.01], np.float32)[:, None, None]
    data = np.where(np.arange(width)[None, None, :] < width // 2, base, water)
    data = np.broadcast_to(data, (6, height, width)).copy()
    return (data + rng.normal(0, 0.005, data.shape)).clip(0.001, 1).astype(np.float32)


def write_s2(path, height: int, width: int, seed: int = 0, **kw) -> Path:
    return write_raster(path, s2_reflectance(height, width, seed), S2_NAMES, **kw)


def crop_scene(path, row: int, col: int, height: int, width: int) -> Path:
    """A real GeoTIFF cut from the 2020 scene, keeping its georeferencing and NaN nodata."""
    with rasterio.open(SCENE) as src:
        win = Window(col, row, width, height)
        data = src.read(window=win)
        profile = src.profile.copy()
        profile.update(width=width, height=height, transform=src.window_transform(win), tiled=False,
                       compress="deflate")
        profile.pop("blockxsize", None)
        profile.pop("blockysize", None)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
            for i, d in enumerate(src.descriptions, 1):
                dst.set_band_description(i, d)
    return Path(path)


def qgis_process(args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([QGIS_PROCESS, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def run_in_fresh_qgis(script: Path, body: str, env: dict, gui: bool = False, timeout: int = 600) -> dict:
    """Runs ``body`` in a new Python with its own QgsApplication (a GUI one if ``gui``), Processing and this
    checkout's provider loaded: what the pytest process imported or set up stays out of it.  The body prints
    one JSON line last; returns it."""
    script.write_text(textwrap.dedent(f"""\
        import json, sys
        from qgis.core import QgsApplication
        app = QgsApplication([], {gui})
        app.initQgis()
        sys.path.append("/usr/share/qgis/python/plugins")
        from processing.core.Processing import Processing
        Processing.initialize()
        import processing
        sys.path.insert(0, {str(ROOT)!r})
        from menet_qgis.plugin import MENetPlugin
        plugin = MENetPlugin(None)
        plugin.initProcessing()
        """) + textwrap.dedent(body))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def raster_profile(path) -> dict:
    """A raster's grid and format: CRS, transform, size, band count, no-data and dtype."""
    with rasterio.open(path) as ds:
        return {"crs": ds.crs, "transform": ds.transform, "width": ds.width, "height": ds.height,
                "count": ds.count, "nodata": ds.nodata, "dtype": ds.dtypes[0]}


def refined_bundle(width: int = 8):
    """An untrained model with the image-guided refinement, its correction made non-zero as training would."""
    import torch
    from menet_qgis.core.model import checkpoint
    refined = checkpoint.new_bundle(seed=2, refine_width=width)
    torch.nn.init.normal_(refined.model.head.refinement.correction.weight, std=0.5)
    return refined


def predict_reference(bundle, source, window: int = 256, overlap: int = 64) -> np.ndarray:
    """The engine's map the plain way, to check the engine against: one window at a time, fp32 on the CPU,
    whole-raster accumulators.  Returns the (height, width) probability with NaN where the input has no data."""
    import torch
    from menet_qgis.core.inference.runtimes import prepare_batch
    from menet_qgis.core.inference.tiling import WindowGrid, blend_weights
    source.use_recipe(bundle.recipe)
    grid = WindowGrid(source.height, source.width, window, overlap)
    weights = blend_weights(window, overlap)
    H, W = grid.row_origins[-1] + window, grid.col_origins[-1] + window
    acc, wsum = np.zeros((H, W), np.float64), np.zeros((H, W), np.float64)
    valid_all = np.zeros((H, W), bool)
    model = bundle.model.cpu().eval()
    for _, y0, x0 in grid:
        data, valid = source.read(y0, x0, window)
        valid_all[y0:y0 + window, x0:x0 + window] |= valid
        if not valid.any():
            continue
        with torch.inference_mode():
            x = prepare_batch(torch.from_numpy(data[None]), torch.from_numpy(valid[None]), bundle, source.plan)
            prob = torch.sigmoid(model(x))[0, 0].numpy()
        acc[y0:y0 + window, x0:x0 + window] += prob * weights
        wsum[y0:y0 + window, x0:x0 + window] += weights
    source.close()
    out = np.full((H, W), np.nan, np.float32)
    ok = valid_all & (wsum > 0)
    out[ok] = (acc[ok] / wsum[ok]).astype(np.float32)
    return out[:grid.height, :grid.width]


def release_toolchain() -> bool:
    """Whether this Python exports with the torch and onnx the release pins (the Makefile's), whose export
    gives the shipped hash; a distribution's torch (the Debian CI chroot) exports other bytes."""
    import onnx
    import torch
    makefile = (ROOT / "Makefile").read_text()
    return all(re.search(rf"(?<![\w-]){name}=={re.escape(version)}(?![\w.])", makefile)
               for name, version in (("torch", torch.__version__.split("+")[0]), ("onnx", onnx.__version__)))


@contextmanager
def serve_folder(folder):
    """A quiet loopback HTTP server (127.0.0.1, a free port) for the files under ``folder``; yields its base URL."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def cli_process(*args, timeout=300):
    """``python -m menet_qgis`` in its own process (signals, GDAL's own stderr, real exit status)."""
    return subprocess.run([sys.executable, "-m", "menet_qgis", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
