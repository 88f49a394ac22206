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


# --- Sentinel-2 products in their delivered layout (issue 27) -------------------------------------------------
#: Band order of the pixels ``write_l2a_product`` takes, and their ``band_id`` in the product metadata.
PRODUCT_BANDS = ["B2", "B3", "B4", "B8", "B11", "B12"]
_BAND_IDS = {"B1": 0, "B2": 1, "B3": 2, "B4": 3, "B5": 4, "B6": 5, "B7": 6, "B8": 7, "B8A": 8, "B9": 9,
             "B10": 10, "B11": 11, "B12": 12}
_FILE_BAND = {"B2": "B02", "B3": "B03", "B4": "B04", "B8": "B08", "B11": "B11", "B12": "B12"}
_NATIVE = {"B2": 10, "B3": 10, "B4": 10, "B8": 10, "B11": 20, "B12": 20}


def _block_mean(dn: np.ndarray, factor: int) -> np.ndarray:
    """uint16 DN averaged over factor x factor blocks, DN 0 (no data) left out; all-0 blocks stay 0."""
    h, w = dn.shape[-2] // factor, dn.shape[-1] // factor
    blocks = dn[..., :h * factor, :w * factor].reshape(*dn.shape[:-2], h, factor, w, factor).astype(np.float64)
    valid = blocks > 0
    count = valid.sum(axis=(-3, -1))
    total = (blocks * valid).sum(axis=(-3, -1))
    return np.where(count > 0, np.round(total / np.maximum(count, 1)), 0).astype(np.uint16)


def _write_jp2(path: Path, data: np.ndarray, crs, transform, nodata=0) -> None:
    """Lossless JPEG 2000 (GDAL's JP2OpenJPEG), as ESA delivers the bands."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="JP2OpenJPEG", width=data.shape[-1], height=data.shape[-2], count=1,
                       dtype=data.dtype.name, crs=crs, transform=transform, nodata=nodata,
                       QUALITY=100, REVERSIBLE="YES", RESOLUTIONS=1) as ds:
        ds.write(data, 1)


def write_l2a_product(folder, reflectance_or_dn: np.ndarray, scl: Optional[np.ndarray] = None, transform=None,
                      crs=UTM17S, date="2020-06-15T15:36:21", zip: bool = False, level: str = "L2A",
                      baseline: str = "05.09", tile: str = "17MPN", spacecraft: str = "S2B",
                      bands: Sequence[str] = tuple(PRODUCT_BANDS)) -> Path:
    """Write a Sentinel-2 product in ESA's SAFE layout from real pixels; returns the ``.SAFE`` folder (or,
    with ``zip``, the ``<name>.SAFE.zip`` holding it, the folder removed).

    ``reflectance_or_dn``: (6, h, w) B2, B3, B4, B8, B11, B12 on one 10 m grid (``transform``, default
    ``ORIGIN``), h and w even.  Float values are reflectance (NaN = no data) turned into DN as the product
    stores them: reflectance x 10000 - offset, the offset being -1000 from processing baseline 04.00 (so
    DN = 10000 x reflectance + 1000) and 0 before; integer values are DN as stored.  B11 and B12 are written
    at 20 m, the mean of each 2 x 2 block (no-data pixels left out), as the instrument sees them; the L2A
    layout also keeps B2, B3, B4 at 20 m (block means) as ESA's products do.
    ``scl``: the L2A scene classification (uint8 classes: 0 no data, 3 cloud shadow, 8/9 cloud, 10 cirrus,
    4 vegetation, 6 water...), at 20 m (h/2, w/2) or at 10 m (h, w; then each 2 x 2 block's top-left
    value is kept); ``None``: 0 where the pixels have no data, 4 elsewhere.
    ``level`` "L1C" writes MTD_MSIL1C.xml, bands at native resolution without a resolution suffix
    (``IMG_DATA/T17MPN_20200615T153621_B02.jp2``), RADIO_ADD_OFFSET, and no SCL (``scl`` is ignored).
    ``bands``: which of the six to write (leave out B11/B12 to make a product ME-Net must refuse).
    GDAL's SENTINEL2 driver opens what this writes (MTD_MSIL*.xml, its subdatasets, the zip)."""
    import datetime as _dt
    import shutil
    import zipfile
    from xml.sax.saxutils import escape

    level = level.upper()
    assert level in ("L1C", "L2A"), level
    data = np.asarray(reflectance_or_dn)
    assert data.ndim == 3 and data.shape[0] == 6, "6 bands: B2, B3, B4, B8, B11, B12"
    _, height, width = data.shape
    assert height % 2 == 0 and width % 2 == 0, "even height and width (B11/B12 are written at 20 m)"
    transform = transform or from_origin(*ORIGIN, 10, 10)
    offset = -1000 if float(baseline) >= 4.0 else 0
    if np.issubdtype(data.dtype, np.floating):
        dn = np.where(np.isfinite(data), np.round(data * 10000) - offset, 0).clip(0, 65535).astype(np.uint16)
        dn[:, ~np.isfinite(data).all(axis=0)] = 0
    else:
        dn = data.astype(np.uint16)
    when = date if isinstance(date, _dt.datetime) else _dt.datetime.fromisoformat(str(date))
    stamp = when.strftime("%Y%m%dT%H%M%S")
    kind = "MSIL2A" if level == "L2A" else "MSIL1C"
    name = f"{spacecraft}_{kind}_{stamp}_N{baseline.replace('.', '')}_R068_T{tile}_{stamp[:8]}T180000"
    safe = Path(folder) / f"{name}.SAFE"
    if safe.exists():
        shutil.rmtree(safe)
    granule = f"{level}_T{tile}_A017123_{stamp}"
    ten = {b: dn[i] for i, b in enumerate(PRODUCT_BANDS)}
    twenty = {b: _block_mean(dn[i], 2) for i, b in enumerate(PRODUCT_BANDS)}
    from affine import Affine
    t20 = transform * Affine.scale(2)
    files = []  # (relative path without extension, array, transform)
    for band in bands:
        code = _FILE_BAND[band]
        if level == "L1C":
            array, tr = (ten[band], transform) if _NATIVE[band] == 10 else (twenty[band], t20)
            files.append((f"GRANULE/{granule}/IMG_DATA/T{tile}_{stamp}_{code}", array, tr))
            continue
        if _NATIVE[band] == 10:
            files.append((f"GRANULE/{granule}/IMG_DATA/R10m/T{tile}_{stamp}_{code}_10m", ten[band], transform))
        if band != "B8":  # ESA keeps no B08 at 20 m (B8A takes its place)
            files.append((f"GRANULE/{granule}/IMG_DATA/R20m/T{tile}_{stamp}_{code}_20m", twenty[band], t20))
    if level == "L2A":
        if scl is None:
            scl20 = np.where((twenty["B2"] > 0), 4, 0).astype(np.uint8)
        else:
            scl = np.asarray(scl, np.uint8)
            scl20 = scl[::2, ::2] if scl.shape == (height, width) else scl
            assert scl20.shape == (height // 2, width // 2), f"scl must be {height // 2} x {width // 2} (20 m)"
        files.append((f"GRANULE/{granule}/IMG_DATA/R20m/T{tile}_{stamp}_SCL_20m", scl20, t20))
    for rel, array, tr in files:
        _write_jp2(safe / f"{rel}.jp2", array, crs, tr)
    for junk in safe.rglob("*.aux.xml"):
        junk.unlink()

    epsg = rasterio.crs.CRS.from_user_input(crs).to_epsg()
    sizes = "".join(f'<Size resolution="{r}"><NROWS>{height * 10 // r}</NROWS><NCOLS>{width * 10 // r}</NCOLS></Size>'
                    for r in (10, 20, 60))
    geopos = "".join(f'<Geoposition resolution="{r}"><ULX>{transform.c:g}</ULX><ULY>{transform.f:g}</ULY>'
                     f'<XDIM>{r}</XDIM><YDIM>-{r}</YDIM></Geoposition>' for r in (10, 20, 60))
    tile_xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<n1:Level-{level[1:]}_Tile_ID xmlns:n1="https://psd-14.'
                f'sentinel2.eo.esa.int/PSD/S2_PDI_Level-{level[1:]}_Tile_Metadata.xsd">\n<n1:General_Info>'
                f'<SENSING_TIME>{when.isoformat()}.000Z</SENSING_TIME></n1:General_Info>\n<n1:Geometric_Info>'
                f'<Tile_Geocoding><HORIZONTAL_CS_NAME>WGS84 / UTM</HORIZONTAL_CS_NAME>'
                f'<HORIZONTAL_CS_CODE>EPSG:{epsg}</HORIZONTAL_CS_CODE>{sizes}{geopos}</Tile_Geocoding>'
                f'</n1:Geometric_Info>\n</n1:Level-{level[1:]}_Tile_ID>\n')
    (safe / "GRANULE" / granule / "MTD_TL.xml").write_text(tile_xml)

    offset_tag = "BOA_ADD_OFFSET" if level == "L2A" else "RADIO_ADD_OFFSET"
    offsets = ""
    if float(baseline) >= 4.0:
        offsets = (f"<{offset_tag}_VALUES_LIST>" +
                   "".join(f'<{offset_tag} band_id="{i}">{offset}</{offset_tag}>' for i in range(13)) +
                   f"</{offset_tag}_VALUES_LIST>")
    quant = "BOA_QUANTIFICATION_VALUE" if level == "L2A" else "QUANTIFICATION_VALUE"
    resolutions = {"B1": 60, "B5": 20, "B6": 20, "B7": 20, "B8A": 20, "B9": 60, "B10": 60, **_NATIVE}
    spectral = "".join(f'<Spectral_Information bandId="{i}" physicalBand="{b}"><RESOLUTION>{resolutions[b]}'
                       f'</RESOLUTION></Spectral_Information>' for b, i in _BAND_IDS.items())
    image_files = "".join(f"<IMAGE_FILE>{escape(rel)}</IMAGE_FILE>" for rel, _, _ in files)
    root = "Level-2A_User_Product" if level == "L2A" else "Level-1C_User_Product"
    mtd = (f'<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n<n1:{root} xmlns:n1="https://psd-14.'
           f'sentinel2.eo.esa.int/PSD/User_Product_{root[:8]}.xsd">\n<n1:General_Info>\n<Product_Info>'
           f'<PRODUCT_START_TIME>{when.isoformat()}.024Z</PRODUCT_START_TIME>'
           f'<PRODUCT_STOP_TIME>{when.isoformat()}.024Z</PRODUCT_STOP_TIME>'
           f'<PRODUCT_URI>{name}.SAFE</PRODUCT_URI><PROCESSING_LEVEL>Level-{level[1:]}</PROCESSING_LEVEL>'
           f'<PRODUCT_TYPE>S2MSI{level[1:]}</PRODUCT_TYPE><PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE>'
           f'<Datatake datatakeIdentifier="G{spacecraft}_{stamp}_017123_N{baseline}">'
           f'<SPACECRAFT_NAME>Sentinel-{spacecraft[1:]}</SPACECRAFT_NAME>'
           f'<DATATAKE_SENSING_START>{when.isoformat()}.024Z</DATATAKE_SENSING_START>'
           f'<SENSING_ORBIT_NUMBER>68</SENSING_ORBIT_NUMBER></Datatake>'
           f'<Query_Options completeSingleTile="true"><PRODUCT_FORMAT>SAFE_COMPACT</PRODUCT_FORMAT></Query_Options>'
           f'<Product_Organisation><Granule_List><Granule datastripIdentifier="DS_{stamp}" '
           f'granuleIdentifier="{granule}" imageFormat="JPEG2000">{image_files}</Granule></Granule_List>'
           f'</Product_Organisation></Product_Info>\n<Product_Image_Characteristics>'
           f'<Special_Values><SPECIAL_VALUE_TEXT>NODATA</SPECIAL_VALUE_TEXT><SPECIAL_VALUE_INDEX>0'
           f'</SPECIAL_VALUE_INDEX></Special_Values><Special_Values><SPECIAL_VALUE_TEXT>SATURATED'
           f'</SPECIAL_VALUE_TEXT><SPECIAL_VALUE_INDEX>65535</SPECIAL_VALUE_INDEX></Special_Values>'
           f'<QUANTIFICATION_VALUES_LIST><{quant} unit="none">10000</{quant}></QUANTIFICATION_VALUES_LIST>'
           f'{offsets}<Reflectance_Conversion><U>0.97</U></Reflectance_Conversion>'
           f'<Spectral_Information_List>{spectral}</Spectral_Information_List>'
           f'</Product_Image_Characteristics>\n</n1:General_Info>\n</n1:{root}>\n')
    (safe / f"MTD_{kind}.xml").write_text(mtd)
    if not zip:
        return safe
    archive = Path(folder) / f"{name}.SAFE.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(safe.rglob("*")):
            zf.write(path, path.relative_to(safe.parent).as_posix())
    shutil.rmtree(safe)
    return archive


def write_l1c_product(folder, reflectance_or_dn: np.ndarray, **kw) -> Path:
    """``write_l2a_product`` for a Level-1C product (top-of-atmosphere DN, RADIO_ADD_OFFSET, no SCL)."""
    return write_l2a_product(folder, reflectance_or_dn, level="L1C", **kw)
