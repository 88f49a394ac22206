"""Sentinel-2 L2A from an area and a date range: a STAC API search, windowed COG reads, a clear composite.

``search`` asks a STAC API (``pystac-client``; default Earth Search, collection ``sentinel-2-l2a``) for the
items over an area (a WGS 84 bounding box) in a date range whose scene cloud cover (``eo:cloud_cover``) is at
most a limit; ``read_observations`` reads, for each sensing day, only the window of each band's cloud-optimised
GeoTIFF that covers the area (rasterio windows over GDAL's ``/vsicurl/``: HTTP range requests for the header
and the tiles the window touches, never the whole file) plus the scene classification (SCL), on one 10 m grid;
``clear_composite`` (``composite.py``) keeps per pixel only the observations the SCL calls clear
(``clouds.scl_quality``).  The composite is then mapped like any raster (``jobs.stac_map`` -> ``jobs.extract``).

Why rasterio windows and not odc-stac or stackstac: both pull in xarray and dask arrays (and stackstac
pyproj and more) for what is here one window per asset on one grid; the windows are the whole of the
reading, GDAL does the HTTP range requests and the 20 m -> 10 m resampling, and nothing new has to be
installed into the light engine environment besides pystac-client.

Hrefs are untrusted: every request pystac-client makes (links, next pages, redirects) and every asset href
goes through ``batch.inputs.resolve_href`` with the API's URL as the document: an API may point only at
http(s) URLs on public hosts, or on its own network scope (an API on 127.0.0.1 may point at 127.0.0.1), never
at local files or cloud buckets.

Asset keys: Earth Search names them ``blue green red nir swir16 swir22 scl``, Microsoft Planetary Computer
``B02 B03 B04 B08 B11 B12 SCL`` (its hrefs need a SAS-token signature: see docs/guide/map-from-stac.md).
numpy, rasterio and pystac-client; no torch.
"""
from __future__ import annotations

import collections
import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urljoin

import numpy as np

from ...batch.inputs import UnsafeHrefError, gdal_path, is_remote, resolve_href
from ...options import STAC_COLLECTION as DEFAULT_COLLECTION
from .bands import DN_SCALE
#: Sentinel-2 band -> asset keys that carry it (Earth Search first, then Planetary Computer / ESA names).
ASSET_KEYS: Dict[str, Tuple[str, ...]] = {
    "B2": ("blue", "B02"), "B3": ("green", "B03"), "B4": ("red", "B04"), "B8": ("nir", "B08"),
    "B11": ("swir16", "B11"), "B12": ("swir22", "B12"), "SCL": ("scl", "SCL")}
BANDS = ("B2", "B3", "B4", "B8", "B11", "B12")
REQUIRED = ("B2", "B3", "B4", "B8", "B11")
#: The grid the composite is made on (m); Sentinel-2 tiles of one UTM zone share it.
PIXEL_M = 10.0
#: Largest area read (pixels of the 10 m grid): every date's six bands are held in memory for the composite.
MAX_AREA_PX = 4000 * 4000
#: GDAL's HTTP settings for the COG reads: no directory listing on open (one request less per file, and a
#: server need not list folders), only .tif/.tiff fetched, merged range requests, retries on 429/5xx.
GDAL_HTTP_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_TIMEOUT": "60",
    "VSI_CACHE": "TRUE",
}
HTTP_TIMEOUT_S = 60


class StacSearchError(ValueError):
    """A search or read that cannot give a composite; one line saying why and what to change."""


# --- the search ---------------------------------------------------------------------------------------------
def _checked_io(api_url: str):
    """pystac-client's HTTP layer with every request and redirect held to ``resolve_href`` (document = the
    API), so a landing page, a next-page link or a redirect cannot reach files or this machine's services."""
    from pystac_client.stac_api_io import StacApiIO

    class CheckedStacApiIO(StacApiIO):
        def read_text(self, source, *args, **kwargs):
            href = source.href if hasattr(source, "href") else str(source)
            if not is_remote(href):
                raise UnsafeHrefError(f"{href!r} from the STAC API {api_url} is not an http(s) URL")
            return super().read_text(source, *args, **kwargs)

        def request(self, href, method=None, headers=None, parameters=None):
            resolve_href(href, api_url)
            return super().request(href, method=method, headers=headers, parameters=parameters)

    io = CheckedStacApiIO(timeout=HTTP_TIMEOUT_S, max_retries=2)
    get_target = io.session.get_redirect_target

    def checked_redirect(response):
        target = get_target(response)
        if target:
            resolve_href(urljoin(response.url, target), api_url)
        return target

    io.session.get_redirect_target = checked_redirect
    io.session.headers["User-Agent"] = "menet_qgis-stac"
    return io


def cloud_cover(item) -> Optional[float]:
    value = item.properties.get("eo:cloud_cover")
    try:
        return float(value) if value is not None and math.isfinite(float(value)) else None
    except (TypeError, ValueError):
        return None


def search(api_url: str, bbox: Sequence[float], start: str, end: str, cloud_limit: float,
           collection: str = DEFAULT_COLLECTION, max_items: int = 10,
           log: Callable[[str], None] = lambda _m: None) -> Tuple[List, str]:
    """(items, the search URL they came from): the least cloudy items (at most ``max_items``) over ``bbox``
    (WGS 84 lon/lat) from ``start`` to ``end`` (dates, inclusive) whose ``eo:cloud_cover`` is at most
    ``cloud_limit`` (%).  The limit goes to the API as a query (or CQL2 filter) where it says it takes one, and
    is applied here again either way (an item without a cloud cover is left out).  A search that finds nothing
    is a one-line ``StacSearchError``."""
    from pystac_client import Client
    from pystac_client.exceptions import APIError
    if not is_remote(api_url):
        raise StacSearchError(f"the STAC API must be an http(s) URL, got {api_url!r} (for a static catalogue file, "
                              "use batch)")
    first, last = _date(start, "start"), _date(end, "end")
    if last < first:
        raise StacSearchError(f"the date range ends ({last}) before it starts ({first})")
    when = f"{first.isoformat()}T00:00:00Z/{last.isoformat()}T23:59:59Z"
    try:
        client = Client.open(api_url, stac_io=_checked_io(api_url))
        kwargs = dict(collections=[collection], bbox=list(bbox), datetime=when, max_items=max(200, 20 * max_items))
        if client.conforms_to("QUERY"):
            kwargs["query"] = {"eo:cloud_cover": {"lte": cloud_limit}}
        elif client.conforms_to("FILTER"):
            kwargs["filter"] = {"op": "<=", "args": [{"property": "eo:cloud_cover"}, cloud_limit]}
            kwargs["filter_lang"] = "cql2-json"
        found = list(client.search(**kwargs).items())
        document = client.get_search_link().href if client.get_search_link() else urljoin(api_url + "/", "search")
    except UnsafeHrefError:
        raise
    except (APIError, OSError, NotImplementedError, ValueError, KeyError, TypeError) as exc:
        raise StacSearchError(f"the STAC search at {api_url} failed ({' '.join(str(exc).split())[:200]})") from None
    kept = [item for item in found if cloud_cover(item) is not None and cloud_cover(item) <= cloud_limit]
    if len(kept) < len(found):
        log(f"{len(found) - len(kept)} item(s) left out: scene cloud cover above {cloud_limit:g} % or not given")
    if not kept:
        more = f" ({len(found)} with more cloud)" if found else ""
        raise StacSearchError(f"no {collection} item at {api_url} over {_bbox_text(bbox)} from {first} to {last} "
                              f"with at most {cloud_limit:g} % cloud{more}: widen the dates, the area or the cloud "
                              "limit")
    kept.sort(key=lambda item: (cloud_cover(item), item.id))
    if len(kept) > max_items:
        log(f"{len(kept)} items found; the {max_items} least cloudy are read")
    return kept[:max_items], document


def _date(text: str, what: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(text).strip()[:10])
    except ValueError:
        raise StacSearchError(f"the {what} date must be YYYY-MM-DD, got {text!r}") from None


def _bbox_text(bbox: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in bbox) + ")"


# --- assets -------------------------------------------------------------------------------------------------
@dataclass
class ItemAssets:
    """The GDAL names of one item's band and SCL assets (each href checked) and its DN offset."""
    id: str
    day: dt.date
    cloud: Optional[float]
    paths: Dict[str, str]                  # B2..B12, SCL -> /vsicurl/... (or a local path for local APIs)
    dn_offset: float
    epsg: Optional[int] = None


def item_assets(item, document: str) -> ItemAssets:
    """An item's assets as ME-Net reads them; ``document`` is the URL the item came from (the API's search),
    the place every href is checked against (``resolve_href``)."""
    paths: Dict[str, str] = {}
    offsets = set()
    for band, keys in ASSET_KEYS.items():
        key = next((k for k in keys if k in item.assets), None)
        if key is None:
            continue
        asset = item.assets[key]
        try:
            paths[band] = gdal_path(resolve_href(asset.href, document))
        except UnsafeHrefError as exc:
            raise UnsafeHrefError(f"STAC item {item.id}, asset {key}: {exc}") from None
        if band != "SCL":
            offsets.add(_dn_offset(item, asset.to_dict()))
    missing = [b for b in REQUIRED if b not in paths]
    if missing:
        raise StacSearchError(f"STAC item {item.id} has no asset for {', '.join(missing)} (looked for keys "
                              f"{', '.join(k for b in missing for k in ASSET_KEYS[b])})")
    if len(offsets) > 1:
        raise StacSearchError(f"STAC item {item.id}: its band assets carry different DN offsets {sorted(offsets)}")
    epsg = item.properties.get("proj:epsg")
    if epsg is None and str(item.properties.get("proj:code", "")).upper().startswith("EPSG:"):
        epsg = item.properties["proj:code"].split(":", 1)[1]
    day = (item.datetime or dt.datetime.fromisoformat(
        str(item.properties.get("start_datetime", "1970-01-01")).replace("Z", "+00:00"))).date()
    return ItemAssets(item.id, day, cloud_cover(item), paths, offsets.pop(), int(epsg) if epsg else None)


def _dn_offset(item, asset: Dict) -> float:
    """reflectance = (DN + offset) / 10000: the offset from the asset's ``raster:bands`` scale and offset (Earth
    Search: 0.0001 and -0.1 -> -1000), else from the processing baseline (04.00 and later: -1000; Planetary
    Computer), else 0."""
    info = (asset.get("raster:bands") or [{}])[0]
    if info.get("scale") is not None or info.get("offset") is not None:
        scale = float(info.get("scale") or 1.0)
        if abs(scale - DN_SCALE) > 1e-9:
            raise StacSearchError(f"STAC item {item.id}: scale {scale} is not Sentinel-2's {DN_SCALE} (DN / 10000)")
        return round(float(info.get("offset") or 0.0) / scale, 6)
    if item.properties.get("earthsearch:boa_offset_applied") is True:
        return 0.0
    baseline = item.properties.get("s2:processing_baseline")
    try:
        return -1000.0 if baseline is not None and float(baseline) >= 4.0 else 0.0
    except (TypeError, ValueError):
        return 0.0


# --- the grid and the windows -------------------------------------------------------------------------------
@dataclass
class Grid:
    crs: object                 # rasterio CRS
    transform: object           # affine
    width: int
    height: int

    @property
    def bounds(self) -> Tuple[float, float, float, float]:
        t = self.transform
        return t.c, t.f + t.e * self.height, t.c + t.a * self.width, t.f


def area_grid(bounds: Sequence[float], bounds_crs, crs) -> Grid:
    """The 10 m grid (pixel edges on multiples of 10 m, as Sentinel-2's) in ``crs`` covering ``bounds`` (given in
    ``bounds_crs``; the same CRS keeps the area's own rectangle)."""
    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from rasterio.warp import transform_bounds
    if CRS.from_user_input(bounds_crs) == CRS.from_user_input(crs):
        xmin, ymin, xmax, ymax = bounds
    else:
        xmin, ymin, xmax, ymax = transform_bounds(bounds_crs, crs, *bounds, densify_pts=21)
    x0, y1 = math.floor(xmin / PIXEL_M) * PIXEL_M, math.ceil(ymax / PIXEL_M) * PIXEL_M
    width, height = int(math.ceil((xmax - x0) / PIXEL_M)), int(math.ceil((y1 - ymin) / PIXEL_M))
    if width * height > MAX_AREA_PX:
        raise StacSearchError(f"the area is {width} x {height} px at 10 m, more than {MAX_AREA_PX // 10**6} million "
                              "pixels: map it in parts")
    return Grid(crs, from_origin(x0, y1, PIXEL_M, PIXEL_M), max(width, 1), max(height, 1))


def read_on_grid(path: str, grid: Grid, resampling: str, fill: float = 0) -> np.ndarray:
    """Band 1 of ``path`` on ``grid`` (float32, ``fill`` where the file does not reach): a window read
    (only the tiles it touches travel) on the file's own CRS, resampled by GDAL where its pixels are not 10 m
    (20 m SWIR and SCL); through a WarpedVRT where the file is in another CRS (another UTM zone)."""
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioIOError
    try:
        return _read_on_grid(path, grid, Resampling[resampling], fill)
    except RasterioIOError as exc:
        raise StacSearchError(f"cannot read {gdal_url(path)} ({' '.join(str(exc).split())[:200]})") from None


def _read_on_grid(path: str, grid: Grid, method, fill: float) -> np.ndarray:
    import rasterio
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window, from_bounds
    out = np.full((grid.height, grid.width), fill, dtype=np.float32)
    with rasterio.open(path) as src:
        if src.crs != grid.crs:
            with WarpedVRT(src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                           resampling=method, src_nodata=src.nodata if src.nodata is not None else 0,
                           nodata=fill) as vrt:
                return vrt.read(1, out_dtype="float32")
        gx0, gy0, gx1, gy1 = grid.bounds
        sx0, sy0, sx1, sy1 = src.bounds
        x0, x1 = max(gx0, sx0), min(gx1, sx1)
        y0, y1 = max(gy0, sy0), min(gy1, sy1)
        # whole grid pixels inside the file
        c0 = int(math.ceil(round((x0 - gx0) / PIXEL_M, 6)))
        c1 = int(math.floor(round((x1 - gx0) / PIXEL_M, 6)))
        r0 = int(math.ceil(round((gy1 - y1) / PIXEL_M, 6)))
        r1 = int(math.floor(round((gy1 - y0) / PIXEL_M, 6)))
        if c1 <= c0 or r1 <= r0:
            return out
        bounds = (gx0 + c0 * PIXEL_M, gy1 - r1 * PIXEL_M, gx0 + c1 * PIXEL_M, gy1 - r0 * PIXEL_M)
        window = from_bounds(*bounds, transform=src.transform)
        window = Window(round(window.col_off, 6), round(window.row_off, 6), round(window.width, 6),
                        round(window.height, 6))
        out[r0:r1, c0:c1] = src.read(1, window=window, out_shape=(r1 - r0, c1 - c0), resampling=method,
                                     out_dtype="float32")
    return out


def item_crs(assets: ItemAssets):
    """The item's CRS: ``proj:epsg`` / ``proj:code``, else its blue asset's header."""
    from rasterio.crs import CRS
    if assets.epsg:
        return CRS.from_epsg(assets.epsg)
    import rasterio
    with rasterio.open(assets.paths["B2"]) as src:
        return src.crs


@dataclass
class Observation:
    """One sensing day on the grid: reflectance (bands, h, w) float32 (NaN = no data) and quality codes."""
    day: dt.date
    items: List[str]
    reflectance: np.ndarray
    quality: np.ndarray
    bands: Tuple[str, ...]
    notes: List[str] = field(default_factory=list)


def read_observations(items: Sequence[ItemAssets], grid: Grid, bands: Sequence[str] = BANDS,
                      log: Callable[[str], None] = lambda _m: None,
                      cancelled: Callable[[], bool] = lambda: False) -> List[Observation]:
    """One observation per sensing day (tiles of one day merged, first item first), on ``grid``: DN -> reflectance
    with each item's offset, DN 0 -> no data; quality from the SCL (``clouds.scl_quality``), NO_DATA where no
    item of the day has data; without an SCL asset, the day's data pixels count as clear (said in the log)."""
    import rasterio

    from .clouds import CLEAR, NO_DATA, scl_quality
    from ..reporting import Cancelled
    by_day: Dict[dt.date, List[ItemAssets]] = collections.OrderedDict()
    for item in sorted(items, key=lambda i: (i.day, i.cloud if i.cloud is not None else 101, i.id)):
        by_day.setdefault(item.day, []).append(item)
    observations = []
    with rasterio.Env(**GDAL_HTTP_OPTIONS):
        for day, day_items in by_day.items():
            reflectance = np.full((len(bands), grid.height, grid.width), np.nan, dtype=np.float32)
            quality = np.full((grid.height, grid.width), NO_DATA, dtype=np.uint8)
            filled = np.zeros((grid.height, grid.width), dtype=bool)
            notes = []
            for item in day_items:
                if cancelled():
                    raise Cancelled()
                missing_band = [b for b in bands if b not in item.paths]
                if missing_band:
                    raise StacSearchError(f"STAC item {item.id} has no asset for {', '.join(missing_band)}")
                dn = [read_on_grid(item.paths[b], grid, "nearest" if b in ("B2", "B3", "B4", "B8") else "bilinear")
                      for b in bands]
                dn = np.stack(dn)
                valid = (dn > 0).all(axis=0) & ~filled   # DN 0 = no data, in any band
                if "SCL" in item.paths:
                    scl = read_on_grid(item.paths["SCL"], grid, "nearest").astype(np.uint8)
                    item_quality = scl_quality(scl)
                else:
                    item_quality = np.full(valid.shape, CLEAR, dtype=np.uint8)
                    notes.append(f"{item.id} has no SCL asset: its pixels count as clear")
                reflectance[:, valid] = (dn[:, valid] + item.dn_offset) / 10000.0
                quality[valid] = item_quality[valid]
                filled |= valid
            for note in notes:
                log(note)
            observations.append(Observation(day, [i.id for i in day_items], reflectance, quality, tuple(bands), notes))
    return observations


def gdal_url(path: str) -> str:
    """The URL behind a ``/vsicurl/`` name, for messages."""
    return path[len("/vsicurl/"):] if path.startswith("/vsicurl/") else path
