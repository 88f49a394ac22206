"""What a batch runs on: rasters, globs, a manifest CSV or a STAC catalog -> a list of scenes.

Each ``Scene`` is one output (``<name>_probability.tif``).  Everything that can
be checked without touching pixels is checked here, before any cluster starts:
a missing file, a glob that matches nothing, two scenes that would write the
same output, a STAC item whose assets do not give the six bands.

STAC is read with ``pystac``: it resolves relative asset and link hrefs of
static catalogs (catalog -> collections -> items) and ItemCollections the same
way every STAC tool does; a hand-written reader would have to re-implement
that link walking.  Assets may be local paths or URLs GDAL reads
(``https://`` -> ``/vsicurl/``, ``s3://`` -> ``/vsis3/``, ``gs://`` -> ``/vsigs/``).
A STAC item becomes a small VRT (one band per Sentinel-2 band, descriptions
``B2`` ... ``B12`` and the DN offset from ``raster:bands`` as the product-metadata
tag), so the engine's own band mapping and DN handling apply unchanged.
"""
from __future__ import annotations

import csv
import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..core.files import atomic_path
from ..core.io.bands import DN_SCALE, band_label
from ..core.model.channels import RECIPE_V1, RECIPE_V2

#: Bands a scene must have (every recipe reads them) and the full set picked when present (B12: recipe v1).
REQUIRED_BANDS = list(RECIPE_V2.source_bands)
SOURCE_BANDS = list(RECIPE_V1.source_bands)

#: STAC ``eo:common_name`` of each Sentinel-2 band ME-Net reads.
COMMON_NAMES = {"blue": "B2", "green": "B3", "red": "B4", "nir": "B8", "swir16": "B11", "swir22": "B12"}
STAC_SUFFIXES = (".json", ".geojson")
MANIFEST_SUFFIXES = (".csv",)
URL_PREFIXES = {"http://": "/vsicurl/", "https://": "/vsicurl/", "s3://": "/vsis3/", "gs://": "/vsigs/"}


class BatchInputError(ValueError):
    """An input list that cannot be run; the message names the file (and line or item)."""


@dataclass(frozen=True)
class Scene:
    """One input raster (or STAC item) and the output name it gets."""

    name: str                                   # output stem: <name>_probability.tif
    path: str                                   # what GDAL opens (file, /vsi… URL or VRT)
    sources: Tuple[str, ...] = ()               # the files its pixels come from (fingerprinted for resume)
    date: str = ""
    region: str = ""
    band_numbers: Optional[Tuple[int, ...]] = None
    dn_offset: Optional[float] = None
    origin: str = ""                            # where it was listed, for messages

    def __post_init__(self):
        if not self.sources:
            object.__setattr__(self, "sources", (self.path,))


def gdal_path(href: str) -> str:
    """A path or URL as GDAL opens it."""
    for prefix, vsi in URL_PREFIXES.items():
        if href.startswith(prefix):
            return vsi + (href if vsi == "/vsicurl/" else href[len(prefix):])
    if href.startswith("file://"):
        return href[len("file://"):]
    return href


def is_virtual(path: str) -> bool:
    """GDAL names that are not local files (URLs, /vsi…, DRIVER:…)."""
    return path.startswith("/vsi") or "://" in path or bool(re.match(r"^[A-Z0-9_]+:", path))


def safe_name(text: str) -> str:
    """An output stem from a file stem or STAC item id (no path separators or odd characters)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    if not name:
        raise BatchInputError(f"cannot make an output name from {text!r}")
    return name


def collect_scenes(inputs: Sequence[str], vrt_dir: Path, band_numbers: Optional[Sequence[int]] = None,
                   dn_offset: Optional[float] = None) -> List[Scene]:
    """Expand every input (raster, glob, manifest CSV, STAC JSON) into scenes, in order.

    ``band_numbers``/``dn_offset`` apply to scenes that do not set their own.
    ``vrt_dir`` receives the VRTs built for STAC items.
    """
    scenes: List[Scene] = []
    for text in inputs:
        suffix = Path(text).suffix.lower()
        if suffix in MANIFEST_SUFFIXES:
            scenes += read_manifest_csv(text)
        elif suffix in STAC_SUFFIXES:
            scenes += read_stac(text, vrt_dir)
        elif any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise BatchInputError(f"no file matches {text}")
            scenes += [Scene(safe_name(Path(m).stem), str(Path(m).resolve()), origin=text) for m in matches]
        else:
            scenes.append(Scene(safe_name(Path(text).stem), text if is_virtual(text) else str(Path(text).resolve()),
                                origin="command line"))
    if not scenes:
        raise BatchInputError("no input scenes")
    for s in scenes:
        if not is_virtual(s.path) and not Path(s.path).is_file():
            raise BatchInputError(f"input raster not found: {s.path} (listed in {s.origin})")
    scenes = _unique(scenes)
    if band_numbers or dn_offset is not None:
        scenes = [Scene(s.name, s.path, s.sources, s.date, s.region,
                        s.band_numbers or (tuple(band_numbers) if band_numbers else None),
                        s.dn_offset if s.dn_offset is not None else dn_offset, s.origin) for s in scenes]
    return scenes


def _unique(scenes: List[Scene]) -> List[Scene]:
    """The same file listed twice runs once; two different scenes with one output name are refused
    (their outputs would overwrite each other)."""
    by_name: Dict[str, Scene] = {}
    for s in scenes:
        other = by_name.get(s.name)
        if other is None:
            by_name[s.name] = s
        elif (other.path, other.band_numbers, other.dn_offset) != (s.path, s.band_numbers, s.dn_offset):
            raise BatchInputError(f"two scenes would both write {s.name}_probability.tif: {other.path} "
                                  f"({other.origin}) and {s.path} ({s.origin}); rename one or give a 'name' "
                                  "column in a manifest CSV")
    return list(by_name.values())


# --- manifest CSV -----------------------------------------------------------------
MANIFEST_COLUMNS = ("path", "date", "region", "name", "bands", "dn_offset")


def read_manifest_csv(path) -> List[Scene]:
    """A CSV with a header: ``path`` (required; relative to the CSV's folder), optional ``date``,
    ``region``, ``name`` (output stem), ``bands`` ("1,2,3,4,5,6") and ``dn_offset``."""
    path = Path(path)
    if not path.is_file():
        raise BatchInputError(f"manifest CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
        if "path" not in header:
            raise BatchInputError(f"{path.name}: the first line must be a header with a 'path' column "
                                  f"(optional: {', '.join(MANIFEST_COLUMNS[1:])}); found {', '.join(header) or 'nothing'}")
        scenes = []
        for line, row in enumerate(reader, 2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            if not row.get("path"):
                continue
            where = f"{path.name} line {line}"
            raster = row["path"] if is_virtual(gdal_path(row["path"])) else str((path.parent / row["path"]).resolve())
            try:
                bands = tuple(int(v) for v in row["bands"].split(",")) if row.get("bands") else None
                offset = float(row["dn_offset"]) if row.get("dn_offset") else None
            except ValueError as exc:
                raise BatchInputError(f"{where}: {exc}") from None
            scenes.append(Scene(safe_name(row.get("name") or Path(row["path"]).stem), gdal_path(raster),
                                date=row.get("date", ""), region=row.get("region", ""), band_numbers=bands,
                                dn_offset=offset, origin=where))
    if not scenes:
        raise BatchInputError(f"{path.name} lists no rasters")
    return scenes


# --- STAC -------------------------------------------------------------------------
def read_stac(path, vrt_dir: Path) -> List[Scene]:
    """Scenes from a STAC ItemCollection, a single Item, or a static Catalog/Collection (walked recursively)."""
    import pystac
    path = Path(path)
    if not path.is_file():
        raise BatchInputError(f"STAC file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            kind = json.load(fh).get("type")
        if kind == "FeatureCollection":
            obj = pystac.ItemCollection.from_file(str(path.resolve()))
        else:
            obj = pystac.read_file(str(path.resolve()))
    except Exception as exc:  # pystac raises several types for non-STAC JSON
        raise BatchInputError(f"{path.name} is not a STAC ItemCollection, Item or Catalog "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    if isinstance(obj, pystac.Item):
        items = [obj]
    elif isinstance(obj, pystac.ItemCollection):
        items = list(obj.items)
    elif isinstance(obj, pystac.Catalog):
        items = list(obj.get_items(recursive=True))
    else:
        raise BatchInputError(f"{path.name}: unsupported STAC object {type(obj).__name__}")
    if not items:
        raise BatchInputError(f"{path.name} holds no STAC items")
    return [_scene_from_item(item, path, vrt_dir) for item in items]


def _asset_bands(key: str, asset: Dict) -> List[Optional[str]]:
    """Sentinel-2 band of each band of an asset: from ``eo:bands`` (STAC 1.0) or ``bands``
    (STAC 1.1) names and common names, else from the asset key (``B02``, ``blue``, ``swir16``)."""
    listed = asset.get("eo:bands") or asset.get("bands") or []
    if listed:
        out = []
        for b in listed:
            common = b.get("common_name") or b.get("eo:common_name")
            out.append(band_label(b.get("name", ""), {}) or COMMON_NAMES.get(common or ""))
        return out
    label = band_label(key, {})
    return [label] if label else []


def _is_data(asset: Dict) -> bool:
    roles = asset.get("roles") or ["data"]
    return "data" in roles or "reflectance" in roles


def _dn_offset(asset: Dict, where: str) -> Optional[float]:
    """DN offset from the ``raster:bands`` scale/offset (Earth Search: scale 0.0001, offset -0.1 -> -1000)."""
    info = (asset.get("raster:bands") or asset.get("bands") or [{}])[0]
    scale, offset = info.get("scale"), info.get("offset")
    if scale is None and offset is None:
        return None
    scale = 1.0 if scale is None else float(scale)
    if abs(scale - DN_SCALE) > 1e-9:
        raise BatchInputError(f"{where}: scale {scale} is not Sentinel-2's {DN_SCALE} (DN / 10000)")
    return float(offset or 0.0) / scale


def _asset_href(item, asset, stac_file: Path) -> str:
    """Absolute asset href: pystac resolves it against the item's own location; items of an
    ItemCollection have none, so relative hrefs there are taken relative to the collection file."""
    href = asset.get_absolute_href() or asset.href
    if not is_virtual(gdal_path(href)) and not Path(href).is_absolute():
        href = str((stac_file.parent / href).resolve())
    return gdal_path(href)


def _scene_from_item(item, stac_file: Path, vrt_dir: Path) -> Scene:
    where = f"STAC item {item.id} in {stac_file.name}"
    chosen: Dict[str, Tuple[str, int, Dict]] = {}   # S2 band -> (href, band index in asset, asset dict)
    for key, asset in item.assets.items():
        record = asset.to_dict()
        if not _is_data(record):
            continue
        for index, band in enumerate(_asset_bands(key, record), 1):
            if band in SOURCE_BANDS:
                candidate = (_asset_href(item, asset, stac_file), index, record)
                # prefer GeoTIFF/COG assets over others (Earth Search also lists JP2 copies)
                current = chosen.get(band)
                if current is None or ("tiff" in (record.get("type") or "") and "tiff" not in (current[2].get("type") or "")):
                    chosen[band] = candidate
    missing = [b for b in REQUIRED_BANDS if b not in chosen]
    if missing:
        raise BatchInputError(f"{where}: no asset for {', '.join(missing)} (ME-Net needs {', '.join(REQUIRED_BANDS)}, "
                              f"and B12 for models of channel recipe v1; assets are matched by eo:bands names/common "
                              f"names or keys like B02, blue, swir16)")
    names = [b for b in SOURCE_BANDS if b in chosen]
    picks = [chosen[b] for b in names]
    offsets = {_dn_offset(rec, where) for _h, _i, rec in picks}
    if len(offsets) > 1:
        raise BatchInputError(f"{where}: assets carry different DN offsets {sorted(o for o in offsets if o is not None)}")
    name = safe_name(item.id)
    vrt = build_band_vrt(Path(vrt_dir) / f"{name}.vrt", [(h, i) for h, i, _ in picks], offsets.pop(), where, names)
    date = item.datetime.date().isoformat() if item.datetime else ""
    sources = tuple(dict.fromkeys(h for h, _i, _r in picks))
    return Scene(name, str(vrt), sources=(str(vrt),) + sources, date=date,
                 region=str(item.properties.get("region", item.properties.get("mgrs:utm_zone", "")) or ""),
                 origin=where)


def build_band_vrt(path: Path, bands: Sequence[Tuple[str, int]], dn_offset: Optional[float], where: str,
                   names: Sequence[str] = SOURCE_BANDS) -> Path:
    """One VRT band per (source, band index), described as ``names`` (B2, B3, B4, B8, B11[, B12]), on the finest grid of the
    sources (20 m bands resampled bilinearly, as *Prepare Sentinel-2 stack* does), described by band name."""
    from osgeo import gdal
    path.parent.mkdir(parents=True, exist_ok=True)
    gdal.UseExceptions()
    with atomic_path(path) as tmp:  # a partial file beside it, renamed onto it only when complete
        try:
            if len({h for h, _ in bands}) == 1:  # one multi-band asset: pick its bands
                opts = gdal.BuildVRTOptions(bandList=[i for _, i in bands], strict=True)
                ds = gdal.BuildVRT(str(tmp), [bands[0][0]], options=opts)
            else:
                if any(i != 1 for _, i in bands):
                    raise BatchInputError(f"{where}: bands must be in single-band assets or all in one asset")
                opts = gdal.BuildVRTOptions(separate=True, resolution="highest", resampleAlg="bilinear",
                                            strict=True)
                ds = gdal.BuildVRT(str(tmp), [h for h, _ in bands], options=opts)
        except RuntimeError as exc:
            raise BatchInputError(f"{where}: GDAL cannot open its assets "
                                  f"({str(exc).splitlines()[0][:200]})") from None
        if ds is None:
            raise BatchInputError(f"{where}: GDAL could not build a VRT of its assets")
        for i, band in enumerate(names, 1):
            ds.GetRasterBand(i).SetDescription(band)
        if dn_offset is not None:
            ds.SetMetadataItem("BOA_ADD_OFFSET", f"{dn_offset:g}")
        ds = None
    return path
