"""What a batch runs on: rasters, globs, a manifest CSV or a STAC catalog -> a list of scenes.

Each ``Scene`` is one output (``<name>_probability.tif``).  Everything that can
be checked without touching pixels is checked here, before any cluster starts:
a missing file, a glob that matches nothing, two scenes that would write the
same output, a STAC item whose assets do not give the six bands.

Hrefs in manifests and catalogues are untrusted: every one goes through
``resolve_href`` (one rule for manifests, STAC links and STAC assets) before
anything is opened or fetched.  A local catalogue may list files inside its
own folder (or ``--data-root``) and URLs; a remote one only http(s) URLs on
public hosts, or on its own network scope (a catalogue on 127.0.0.1 may point
at 127.0.0.1).  STAC documents are parsed with ``pystac``; their ``child`` and
``item`` links are followed here, each checked first (pystac would follow them
unchecked), so a catalogue can neither read local files nor reach this
machine's services through its links.  Assets may be local paths or URLs GDAL
reads (``https://`` -> ``/vsicurl/``, ``s3://`` -> ``/vsis3/``, ``gs://`` -> ``/vsigs/``).
A STAC item becomes a small VRT (one band per Sentinel-2 band, descriptions
``B2`` ... ``B12`` and the DN offset from ``raster:bands`` as the product-metadata
tag), so the engine's own band mapping and DN handling apply unchanged.

A glob leaves out what a batch writes (its outputs, summary, manifest and work
folder), so a batch into its own input folder can be run again to resume.
"""
from __future__ import annotations

import csv
import functools
import glob
import ipaddress
import json
import os
import re
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple
from urllib.parse import urljoin, urlsplit

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
#: What a batch writes into its output folder (besides <name>_probability[_stageN].tif).
WORK_FOLDER = ".menet-batch"
RUN_FILES = ("batch_summary.csv", "batch_manifest.json")
OUTPUT_NAME = re.compile(r".+_probability(_stage[0-9]+)?\.tif$")
#: The tag every batch output carries (the resume key); a raster with it is a map, not a scene.
RESULT_KEY_TAG = "MENET_RESULT_KEY"
#: Largest STAC document read (a catalogue is kilobytes; a hostile server could send gigabytes).
MAX_DOCUMENT_BYTES = 64 * 2**20
HTTP_TIMEOUT_S = 60


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
    """A path or URL (as ``resolve_href`` returns it) as GDAL opens it."""
    for prefix, vsi in URL_PREFIXES.items():
        if href.startswith(prefix):
            return vsi + (href if vsi == "/vsicurl/" else href[len(prefix):])
    return href


# --- hrefs: where a manifest or catalogue may point -------------------------------------
class UnsafeHrefError(BatchInputError):
    """An href a manifest or catalogue may not point at; the message says why and how to proceed."""


REMOTE_SCHEMES = ("http", "https")
CLOUD_SCHEMES = ("s3", "gs")


def is_remote(location: str) -> bool:
    """An http(s) URL (a remote document), as opposed to a local path."""
    return urlsplit(str(location)).scheme.lower() in REMOTE_SCHEMES


def resolve_href(href: str, document: str, root=None) -> str:
    """Where ``href``, listed in ``document``, points, once it is checked to be a place the
    document may point at; raises ``UnsafeHrefError`` (one line, saying how to proceed) otherwise.

    ``document`` is the manifest or STAC file (a local path) or the http(s) URL it was read from.

    * Local documents: a relative path, an absolute path or a ``file://`` URL must land, after
      ``..`` and symlinks are resolved, inside ``root`` (default: the document's folder); the
      real path is returned.  http(s), s3 and gs URLs are returned as they are (the file is the
      user's own, like a URL on the command line).  GDAL's own names (``/vsi…``, ``DRIVER:…``)
      and other schemes are refused: they reach files and hosts past these checks.
    * Remote documents: relative hrefs are joined to the document's URL; the result must be an
      http(s) URL (never a local file, ``file://`` or a cloud bucket with the user's credentials)
      whose host is public, or in the document's own scope (``address_scope``: a catalogue served
      from 127.0.0.1 may point at 127.0.0.1, a public one may not).

    The one resolver for manifests, STAC links and STAC assets (and STAC API results).
    """
    try:
        return _resolve_href(href, document, root)
    except UnsafeHrefError:
        raise
    except ValueError as exc:  # a NUL byte in a path, an unclosed IPv6 bracket, …
        raise UnsafeHrefError(f"{href!r} in {_short(document)} is not a valid path or URL "
                              f"({' '.join(str(exc).split())})") from None


def _resolve_href(href: str, document: str, root) -> str:
    href = (href or "").strip()
    if not href:
        raise UnsafeHrefError(f"an empty href in {document}")
    if re.search(r"[\x00-\x1f\x7f]", href):  # urlsplit drops some, C and GDAL stop at a NUL
        raise ValueError("control characters")
    if is_remote(document):
        target = urljoin(document, href)
        scheme = urlsplit(target).scheme.lower()
        if scheme not in REMOTE_SCHEMES:
            what = "a local file" if scheme in ("", "file") else f"a {scheme}:// URL"
            raise UnsafeHrefError(f"{href!r} in the remote catalogue {document} is {what}: a remote catalogue may "
                                  "only point at http(s) URLs (download it and its files to use it locally)")
        check_remote_target(target, document)
        return target
    parts = urlsplit(href)
    scheme = parts.scheme.lower()
    if scheme in REMOTE_SCHEMES + CLOUD_SCHEMES:
        return href
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UnsafeHrefError(f"{href!r} in {Path(document).name} names another host ({parts.netloc}); a "
                                  "file:// href must be a local file")
        local = urllib.request.url2pathname(parts.path)
    elif href.startswith("/vsi") or re.match(r"^[A-Za-z0-9_]+:", href):
        raise UnsafeHrefError(f"{href!r} in {Path(document).name} is not a path or an http(s), s3:// or gs:// URL "
                              "(GDAL special names and other schemes reach past a manifest's checks): list the file "
                              "itself")
    else:
        local = href
    folder = os.path.dirname(os.path.abspath(document))
    target = os.path.realpath(os.path.join(folder, local))
    allowed = os.path.realpath(root if root is not None else folder)
    if os.path.commonpath([target, allowed]) != allowed or target.startswith("/vsi"):
        raise UnsafeHrefError(f"{href!r} in {Path(document).name} points outside {allowed} (to {target}): a "
                              "manifest or catalogue may only list local files inside its folder; move it beside "
                              "its data or give --data-root FOLDER (the folder that holds them)")
    return target


def address_scope(address: str) -> str:
    """``public``, ``loopback`` (this machine), ``link-local`` (cloud metadata services live there)
    or ``private`` (RFC 1918, carrier-grade NAT, unique-local, reserved, multicast)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:  # 0.0.0.0 connects to this machine on Linux
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    return "public" if ip.is_global and not ip.is_multicast else "private"


@functools.lru_cache(maxsize=256)
def host_scopes(host: str) -> Tuple[Tuple[str, str], ...]:
    """(address, scope) of every address ``host`` resolves to here."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeHrefError(f"cannot resolve the host {host!r} ({exc})") from None
    addresses = dict.fromkeys(str(info[4][0]) for info in infos)
    return tuple((a, address_scope(a)) for a in addresses)


def check_remote_target(target: str, document: str) -> None:
    """Refuse a URL listed in a remote document whose host is on this machine or a private network
    (any of its addresses), unless the document's own host is in that same scope."""
    host = urlsplit(target).hostname
    if not host:
        raise UnsafeHrefError(f"{target!r} in {document} has no host")
    own = {scope for _a, scope in host_scopes(urlsplit(document).hostname or "")}
    for address, scope in host_scopes(host):
        if scope != "public" and scope not in own:
            where = address if address == host else f"{host} ({address})"
            raise UnsafeHrefError(
                f"{target} is on {where}, a {scope} address, and its catalogue {document} is not: a remote "
                "catalogue may not reach this machine or its network; download the catalogue and the files it "
                "lists and give the local copy if you trust them")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Each redirect of a STAC document is held to the same rule as a link (a public server may
    not send the reader to 127.0.0.1 or a file)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        resolve_href(newurl, req.full_url)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def read_document(location: str) -> Dict:
    """A JSON document from a local file or an http(s) URL (redirects checked, size capped)."""
    if is_remote(location):
        opener = urllib.request.build_opener(_CheckedRedirects)
        request = urllib.request.Request(location, headers={"User-Agent": "menet_qgis-batch"})
        try:
            with opener.open(request, timeout=HTTP_TIMEOUT_S) as response:
                body = response.read(MAX_DOCUMENT_BYTES + 1)
        except UnsafeHrefError:
            raise
        except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts
            raise BatchInputError(f"cannot read {location} ({' '.join(str(exc).split())[:200]})") from None
        if len(body) > MAX_DOCUMENT_BYTES:
            raise BatchInputError(f"{location} is larger than {MAX_DOCUMENT_BYTES // 2**20} MiB: not a STAC document")
        text = body.decode("utf-8", errors="replace")
    else:
        with open(location, encoding="utf-8") as fh:  # the user's own file: no cap
            text = fh.read()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BatchInputError(f"{_short(location)} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BatchInputError(f"{_short(location)} is not a STAC ItemCollection, Item or Catalog (not a JSON object)")
    return data


def _short(location: str) -> str:
    return location if is_remote(location) else Path(location).name


def _input_stem(text: str) -> str:
    """A file's stem; a Sentinel-2 product's name for its folder, zip, MTD_MSIL*.xml or subdataset."""
    from ..core.io.raster_io import input_stem
    return input_stem(text)


def _is_product_folder(path: str) -> bool:
    """A Sentinel-2 product folder (``.SAFE``, or one holding MTD_MSIL*.xml): a scene, read as a product."""
    return Path(path).is_dir() and (Path(path).suffix.upper() == ".SAFE" or any(Path(path).glob("MTD_MSIL*.xml")))


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
                   dn_offset: Optional[float] = None, data_root=None, out_dir=None,
                   log: Optional[Callable[[str], None]] = None) -> List[Scene]:
    """Expand every input (raster, glob, manifest CSV, STAC JSON or URL) into scenes, in order.

    ``band_numbers``/``dn_offset`` apply to scenes that do not set their own.
    ``vrt_dir`` receives the VRTs built for STAC items.  ``data_root``: the folder local files
    listed in manifests and local catalogues must lie in (default: each one's own folder).
    ``out_dir``: the batch's output folder; globs leave out what a batch writes there (and any
    batch output elsewhere), ``log`` says what was left out.
    """
    scenes: List[Scene] = []
    for text in inputs:
        suffix = Path(urlsplit(text).path if is_remote(text) else text).suffix.lower()
        if suffix in MANIFEST_SUFFIXES and not is_remote(text):
            scenes += read_manifest_csv(text, data_root)
        elif suffix in STAC_SUFFIXES:
            scenes += read_stac(text, vrt_dir, data_root)
        elif any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise BatchInputError(f"no file matches {text}")
            kept = [m for m in matches if not is_batch_output(m, out_dir)]
            if len(kept) < len(matches) and log is not None:
                left = [Path(m).name for m in matches if m not in kept]
                log(f"input {text}: left out {len(left)} file(s) a batch wrote ({', '.join(left[:3])}"
                    f"{', …' if len(left) > 3 else ''})")
            if not kept:
                raise BatchInputError(f"{text} matches only files a batch wrote (maps, its summary or manifest), "
                                      "no scene")
            scenes += [Scene(safe_name(Path(m).stem), str(Path(m).resolve()), origin=text) for m in kept]
        else:
            scenes.append(Scene(safe_name(_input_stem(text)), text if is_virtual(text) else str(Path(text).resolve()),
                                origin="command line"))
    if not scenes:
        raise BatchInputError("no input scenes")
    for s in scenes:
        if not is_virtual(s.path) and not Path(s.path).is_file() and not _is_product_folder(s.path):
            raise BatchInputError(f"input raster not found: {s.path} (listed in {s.origin})")
        if not is_virtual(s.path) and s.path == s.sources[0] and _has_result_key(s.path):
            raise BatchInputError(f"{s.path} (listed in {s.origin}) is a probability map a batch wrote (it carries "
                                  f"{RESULT_KEY_TAG}), not a Sentinel-2 scene")
    scenes = _unique(scenes)
    if band_numbers or dn_offset is not None:
        scenes = [Scene(s.name, s.path, s.sources, s.date, s.region,
                        s.band_numbers or (tuple(band_numbers) if band_numbers else None),
                        s.dn_offset if s.dn_offset is not None else dn_offset, s.origin) for s in scenes]
    return scenes


def is_batch_output(path, out_dir=None) -> bool:
    """A file a batch wrote, not a scene: in ``out_dir`` its maps (``*_probability.tif``, stage
    layers), summary, manifest and anything in its work folder; anywhere, a raster carrying the
    result key.  Names are checked first (no file is opened for them)."""
    real = Path(os.path.realpath(path))
    if out_dir is not None:
        out = Path(os.path.realpath(out_dir))
        if out / WORK_FOLDER in real.parents:
            return True
        if real.parent == out and (real.name in RUN_FILES or OUTPUT_NAME.match(real.name)):
            return True
    return real.suffix.lower() in (".tif", ".tiff") and _has_result_key(str(real))


def _has_result_key(path: str) -> bool:
    """Whether a GeoTIFF carries the batch result key (tags only; unreadable = no)."""
    if not path.lower().endswith((".tif", ".tiff")):
        return False
    import rasterio
    try:
        with rasterio.open(path) as ds:
            return bool(ds.tags().get(RESULT_KEY_TAG))
    except (rasterio.errors.RasterioError, OSError):
        return False


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


def read_manifest_csv(path, data_root=None) -> List[Scene]:
    """A CSV with a header: ``path`` (required; relative to the CSV's folder), optional ``date``,
    ``region``, ``name`` (output stem), ``bands`` ("1,2,3,4,5,6") and ``dn_offset``.  Local paths
    must lie inside the CSV's folder or ``data_root`` (``resolve_href``)."""
    path = Path(path)
    if not path.is_file():
        raise BatchInputError(f"manifest CSV not found: {path}")
    document = str(path.resolve())
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
            try:
                raster = resolve_href(row["path"], document, data_root)
                bands = tuple(int(v) for v in row["bands"].split(",")) if row.get("bands") else None
                offset = float(row["dn_offset"]) if row.get("dn_offset") else None
            except ValueError as exc:
                raise BatchInputError(f"{where}: {exc}") from None
            listed = urlsplit(row["path"]).path if "://" in row["path"] else row["path"]
            scenes.append(Scene(safe_name(row.get("name") or Path(listed).stem),
                                gdal_path(raster), date=row.get("date", ""), region=row.get("region", ""),
                                band_numbers=bands, dn_offset=offset, origin=where))
    if not scenes:
        raise BatchInputError(f"{path.name} lists no rasters")
    return scenes


# --- STAC -------------------------------------------------------------------------
#: Catalogue link relations followed to find items.
FOLLOWED_LINKS = ("child", "item")


def read_stac(source, vrt_dir: Path, data_root=None) -> List[Scene]:
    """Scenes from a STAC ItemCollection, a single Item, or a static Catalog/Collection (its child
    and item links walked recursively), from a local file or an http(s) URL.  Every link and asset
    href is checked by ``resolve_href`` before it is read."""
    source = str(source)
    if not is_remote(source):
        if not Path(source).is_file():
            raise BatchInputError(f"STAC file not found: {source}")
        source = str(Path(source).resolve())
    # the folder of the catalogue the user named, not of each document it links to
    root = data_root if data_root is not None or is_remote(source) else os.path.dirname(source)
    items: List[Tuple[object, str]] = []
    _walk_stac(source, root, items, set(), _short(source))
    if not items:
        raise BatchInputError(f"{_short(source)} holds no STAC items")
    return [_scene_from_item(item, location, root, vrt_dir, _short(source)) for item, location in items]


def _walk_stac(location: str, root, items: List, seen: Set[str], top: str) -> None:
    """Items of the STAC document at ``location`` (already checked), each with where it was read from
    (its relative asset hrefs are relative to that, never to a self link it claims)."""
    import pystac
    if location in seen:  # catalogues may link in cycles
        return
    seen.add(location)
    data = read_document(location)
    try:
        kind = data.get("type")
        if kind == "FeatureCollection":
            found = list(pystac.ItemCollection.from_dict(data, preserve_dict=True).items)
        else:
            obj = pystac.read_dict(data)
            found = [obj] if isinstance(obj, pystac.Item) else []
            if not isinstance(obj, (pystac.Item, pystac.Catalog)):
                raise TypeError(f"unsupported STAC object {type(obj).__name__}")
    except UnsafeHrefError:
        raise
    except Exception as exc:  # pystac raises several types for non-STAC JSON
        raise BatchInputError(f"{_short(location)} is not a STAC ItemCollection, Item or Catalog "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    items += [(item, location) for item in found]
    if kind in ("Catalog", "Collection"):
        for link in data.get("links") or []:
            if isinstance(link, dict) and link.get("rel") in FOLLOWED_LINKS and isinstance(link.get("href"), str):
                try:
                    target = resolve_href(link["href"], location, root)
                except UnsafeHrefError as exc:
                    raise UnsafeHrefError(f"{link['rel']} link of {_short(location)} (in {top}): {exc}") from None
                _walk_stac(target, root, items, seen, top)


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


def _scene_from_item(item, location: str, root, vrt_dir: Path, top: str) -> Scene:
    where = f"STAC item {item.id} in {top}"
    chosen: Dict[str, Tuple[str, int, Dict]] = {}   # S2 band -> (href, band index in asset, asset dict)
    for key, asset in item.assets.items():
        record = asset.to_dict()
        if not _is_data(record):
            continue
        for index, band in enumerate(_asset_bands(key, record), 1):
            if band in SOURCE_BANDS:
                try:
                    href = gdal_path(resolve_href(asset.href, location, root))
                except UnsafeHrefError as exc:
                    raise UnsafeHrefError(f"{where}, asset {key}: {exc}") from None
                candidate = (href, index, record)
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
