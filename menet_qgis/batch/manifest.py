"""What makes a batch resumable and auditable: fingerprints, result tags, COGs, the run manifest.

A scene is done when its probability COG exists and carries the tag
``MENET_RESULT_KEY`` = sha256 of (input fingerprint, model sha256, result
parameters).  The key lives in the output itself, so it can never disagree
with the pixels it describes (a sidecar file could), and outputs are renamed
into place only when complete, so an existing file is a whole one.

Input fingerprint (per source file): size, modification time (ns) and the
sha256 of the first and last MiB — what changes when a file is rewritten,
re-downloaded or truncated, without reading whole 1 GB scenes on every
re-run; VRTs (built from STAC items on every run) by their content.  For URLs: size and modification time as GDAL's /vsi layer reports them.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from ..core.files import atomic_write_text, file_sha256
from .inputs import RESULT_KEY_TAG, Scene, is_virtual  # noqa: F401 (RESULT_KEY_TAG: used by scene_task)

EDGE_BYTES = 2**20
#: Engine options that change how fast a map is made, not the map: they do not invalidate a result.
#: The runtime is one: torch, onnxruntime and OpenVINO give the same probability within 1e-4 in fp32
#: (tests/test_runtimes.py).
PERFORMANCE_OPTIONS = ("batch_size", "readers", "threads", "device", "runtime")
SUMMARY_COLUMNS = ("scene", "status", "mangrove_ha", "threshold", "seconds", "worker", "attempts", "model_sha256",
                   "windows", "date", "region", "input", "output", "note")


def _product_files(path: str) -> Optional[str]:
    """What a Sentinel-2 product name reads from: its local folder or zip (a SENTINEL2 subdataset or an
    MTD_MSIL*.xml names them), else None."""
    from ..core.io import sentinel2_product as s2
    text = str(path).strip()
    match = s2.SUBDATASET.match(text)
    if match:
        text = match["path"].strip('"')
    if text.lower().startswith("/vsizip/"):
        parts = s2._split_vsizip(text)
        return str(parts[0]) if parts else None
    if s2.METADATA_FILE.match(Path(text).name):
        return str(Path(text).parent)
    return text if match or Path(text).is_dir() else None


def file_fingerprint(path: str) -> Dict:
    """Size, mtime and the hash of both ends of a local file; size and mtime of a /vsi… one; for a
    Sentinel-2 product (its folder, zip, MTD_MSIL*.xml or subdataset) those of every file it holds."""
    product = _product_files(path)
    if product is not None and Path(product).is_dir():
        return {"product": [[p.relative_to(product).as_posix(), _fingerprint(str(p))]
                            for p in sorted(Path(product).rglob("*")) if p.is_file()]}
    return {"product": _fingerprint(product)} if product is not None and product != path else _fingerprint(path)


def _fingerprint(path: str) -> Dict:
    if is_virtual(path):
        from osgeo import gdal
        from ..core.compat import osgeo_exceptions
        with osgeo_exceptions():  # stated, not GDAL's default (GDAL >= 3.9 warns on stderr otherwise)
            try:
                stat = gdal.VSIStatL(path)
            except RuntimeError:
                stat = None
        if stat is None:
            raise OSError(f"cannot stat {path}")
        return {"path": path, "size": stat.size, "mtime": stat.mtime}
    if path.lower().endswith(".vrt"):  # rebuilt on every run from a STAC item: its content is what counts
        return {"sha256": file_sha256(path)}
    st = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(EDGE_BYTES))
        if st.st_size > EDGE_BYTES:
            fh.seek(max(EDGE_BYTES, st.st_size - EDGE_BYTES))
            digest.update(fh.read(EDGE_BYTES))
    # no path: the same bytes moved elsewhere (or an out-dir copied with its STAC VRTs) are still done
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges_sha256": digest.hexdigest()}


def scene_fingerprint(scene: Scene) -> Dict:
    """Fingerprint of everything a scene's pixels and band plan come from."""
    return {"sources": [file_fingerprint(p) for p in scene.sources],
            "band_numbers": list(scene.band_numbers) if scene.band_numbers else None,
            "dn_offset": scene.dn_offset}


def result_parameters(engine_options: Dict) -> Dict:
    """The engine options that define the map (window, overlap, stages, precision, …).

    Precision counts when it is asked for (bf16 moves probabilities by up to ~0.02); ``auto`` is
    left out, so maps made before the option existed (all with auto) keep their result keys."""
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(engine_options.items())
            if k not in PERFORMANCE_OPTIONS and not (k == "precision" and v == "auto")}


def result_key(fingerprint: Dict, model_sha256: str, parameters: Dict) -> str:
    text = json.dumps({"input": fingerprint, "model_sha256": model_sha256, "parameters": parameters},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_tags(path) -> Optional[Dict[str, str]]:
    """The dataset tags of a raster, or None when it is missing or unreadable."""
    import rasterio
    if not Path(path).is_file():
        return None
    try:
        with rasterio.open(path) as ds:
            return ds.tags()
    except Exception:  # unreadable = not done
        return None


def is_done(outputs: Iterable[Path], key: str) -> Optional[Dict[str, str]]:
    """The probability output's tags when every output exists and carries ``key``, else None."""
    first = None
    for path in outputs:
        tags = read_tags(path)
        if tags is None or tags.get(RESULT_KEY_TAG) != key:
            return None
        first = first or tags
    return first


# --- outputs --------------------------------------------------------------------------
def mangrove_hectares(path, threshold: float) -> Optional[float]:
    """Area at or above ``threshold`` in hectares, block by block; None for a geographic CRS."""
    import numpy as np
    import rasterio
    with rasterio.open(path) as ds:
        if not ds.crs or not ds.crs.is_projected:
            return None
        metres = ds.crs.linear_units_factor[1]
        pixel_ha = abs(ds.transform.a * ds.transform.e) * metres ** 2 / 10000.0
        count = 0
        for _, window in ds.block_windows(1):
            values = ds.read(1, window=window)
            count += int(np.count_nonzero(values >= threshold))  # NaN compares False: no-data never counts
    return round(count * pixel_ha, 4)


def write_cog(source: Path, target: Path, tags: Dict[str, str], threads: int = 1) -> Path:
    """GeoTIFF -> Cloud-Optimized GeoTIFF with ``tags``.

    The engine streams strips into a tiled GeoTIFF; GDAL's COG driver can only
    *copy* a finished raster (it puts the overviews before the full-resolution
    data), so the COG is made after the engine's atomic write, from the
    complete file.  Overviews are averaged (probabilities), deflate with the
    floating-point predictor like the engine's own output.
    """
    from osgeo import gdal
    gdal.UseExceptions()
    options = gdal.TranslateOptions(format="COG", creationOptions=[
        "COMPRESS=DEFLATE", "PREDICTOR=YES", "BIGTIFF=IF_SAFER", "RESAMPLING=AVERAGE", "OVERVIEWS=AUTO",
        f"NUM_THREADS={max(1, int(threads))}"],
        metadataOptions=[f"{k}={v}" for k, v in tags.items()])
    ds = gdal.Translate(str(target), str(source), options=options)
    if ds is None:
        raise RuntimeError(f"GDAL could not write the COG {target.name}")
    ds = None
    return target


# --- the run manifest and summary -----------------------------------------------------
@dataclass
class SceneRecord:
    scene: str
    input: str
    output: str
    status: str = "pending"           # ok, skipped, failed, cancelled, pending
    date: str = ""
    region: str = ""
    result_key: str = ""
    mangrove_ha: Optional[float] = None
    seconds: Optional[float] = None
    worker: str = ""
    windows: Optional[int] = None
    attempts: List[Dict] = field(default_factory=list)   # one per try: worker, outcome, error
    error: str = ""
    requeued: int = 0                 # times it was queued on a worker that died before it started
    log: List[str] = field(default_factory=list)

    def note(self) -> str:
        failed = [a for a in self.attempts if a.get("outcome") != "ok"]
        parts = [f"attempt {i} on {a.get('worker') or '?'}: {a.get('outcome')}"
                 + (f" ({a['error']})" if a.get("error") else "")
                 for i, a in enumerate(self.attempts, 1) if a in failed]
        if self.status == "skipped":
            parts.insert(0, "output already up to date")
        return "; ".join(parts)


class RunManifest:
    """``batch_manifest.json`` (everything, per scene and per attempt) and ``batch_summary.csv``
    (one row per scene), rewritten atomically whenever a scene finishes."""

    def __init__(self, out_dir: Path, run: Dict, records: Sequence[SceneRecord], threshold: float):
        self.out_dir = Path(out_dir)
        self.run = run
        self.records = list(records)
        self.threshold = threshold

    @property
    def json_path(self) -> Path:
        return self.out_dir / "batch_manifest.json"

    @property
    def csv_path(self) -> Path:
        return self.out_dir / "batch_summary.csv"

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for r in self.records:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def summary_rows(self) -> List[Dict]:
        return [{"scene": r.scene, "status": r.status, "mangrove_ha": "" if r.mangrove_ha is None else r.mangrove_ha,
                 "threshold": self.threshold, "seconds": "" if r.seconds is None else round(r.seconds, 2),
                 "worker": r.worker, "attempts": len(r.attempts), "model_sha256": self.run["model_sha256"],
                 "windows": "" if r.windows is None else r.windows, "date": r.date, "region": r.region,
                 "input": r.input, "output": r.output, "note": (r.note() + ("; " + r.error if r.error and r.error not in r.note() else "")).strip("; ")}
                for r in self.records]

    def save(self) -> None:
        self.run["counts"] = self.counts()
        self.run["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data = dict(self.run, scenes=[asdict(r) for r in self.records])
        atomic_write_text(self.json_path, json.dumps(data, indent=2, default=str))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(self.summary_rows())
        atomic_write_text(self.csv_path, buffer.getvalue())

    def table(self) -> str:
        """The summary as an aligned text table for the terminal."""
        cols = ("scene", "status", "mangrove_ha", "seconds", "worker", "attempts")
        rows = [[str(row[c]) for c in cols] for row in self.summary_rows()]
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)
