"""From a Sentinel-2 product as delivered to rasters the ME-Net pipeline reads.

``open_product`` finds a product's six bands, DN offset, level, sensing time
and scene classification (SCL, L2A) from whatever the user has: the ``.SAFE``
folder (or a flat folder of per-band JP2/GeoTIFF files named like the
product's), its ``.zip`` (read in place through GDAL's ``/vsizip/``), its
``MTD_MSIL*.xml``, or a GDAL SENTINEL2 subdataset name.  ``ProductReader``
reads its bands on the 10 m grid (``RasterInput`` uses it, so Extract maps a
product directly); ``product_vrt`` writes them as one 6-band VRT.  The files
made from products (Prepare's stack, channel exports) are written by ``stack``.
Nothing here imports torch (the light engine opens products too).

Sentinel-2 facts used here: reflectance = (DN + offset) / 10000; the offset is
-1000 from processing baseline 04.00 (products after 25 Jan 2022) and 0
before; DN 0 is no data.
"""
from __future__ import annotations

import contextlib
import math
import re
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from .bands import ALIASES, OFFSET_KEYS, band_label, checked_dn_offset
from ..model.channels import SOURCE_BANDS

#: Resolution (m) each needed band has in the product; finer copies are preferred.
NATIVE_RESOLUTION = {"B2": 10, "B3": 10, "B4": 10, "B8": 10, "B11": 20, "B12": 20}
#: ``band_id`` 0..12 in product metadata is B1..B12 with B8A after B8: the order of ``bands.ALIASES``.
METADATA_BAND_ORDER: List[str] = list(ALIASES)
RESAMPLING = {"bilinear": Resampling.bilinear, "nearest": Resampling.nearest}
#: Band file names: L2A ``T17MPN_20230105T153621_B11_20m.jp2``, L1C ``T17MPN_20200101T153619_B02.jp2``.
BAND_FILE = re.compile(r"_(?P<band>B(?:\d{1,2}|8A))(?:_(?P<res>\d+)m)?\.(?:jp2|tiff?)$", re.IGNORECASE)


@dataclass
class Sentinel2Product:
    """The six band files ME-Net needs from one product, and its radiometric metadata.

    ``band_files`` and ``scl`` are what rasterio/GDAL opens: paths for a folder, ``/vsizip/...`` names for
    bands read in place from a zip."""

    name: str
    band_files: Dict[str, Union[Path, str]]
    offset: Optional[float] = None
    offset_key: str = "BOA_ADD_OFFSET"
    baseline: Optional[str] = None
    metadata: Optional[Union[Path, str]] = None
    #: "L2A", "L1C", or None where no product metadata names it.
    level: Optional[str] = None
    #: The scene classification (SCL, L2A: 20 m, classes 0-11) as a GDAL name; None where the product has none.
    scl: Optional[str] = None
    #: Sensing start (ISO 8601, UTC) from the metadata; None where unknown.
    sensing: Optional[str] = None
    #: What the user gave (folder, zip, MTD_MSIL*.xml or subdataset name).
    source: Optional[str] = None

    @property
    def crs(self):
        with rasterio.open(self.band_files["B2"]) as ds:
            return ds.crs

    @property
    def date(self) -> Optional[str]:
        """The sensing date, YYYY-MM-DD."""
        return self.sensing[:10] if self.sensing else None

    def tags(self) -> Dict[str, str]:
        """Dataset tags of the stack: ``bands.plan_input`` reads the offset from them."""
        tags = {"SOURCE_PRODUCT": self.name}
        if self.offset is not None:
            tags[self.offset_key] = f"{self.offset:g}"
        if self.baseline:
            tags["PROCESSING_BASELINE"] = self.baseline
        if self.level:
            tags["PROCESSING_LEVEL"] = self.level
        if self.sensing:
            tags["SENSING_TIME"] = self.sensing
        return tags

    def describe(self) -> str:
        level = ""
        if self.level == "L1C":
            level = (" Level-1C: top-of-atmosphere reflectance (the model learned surface reflectance, Level-2A; "
                     "expect a poorer map) and no scene classification;")
        if self.offset is not None:
            baseline = f", processing baseline {self.baseline}" if self.baseline else ""
            return (f"{self.name}:{level} DN offset {self.offset:+g} ({self.offset_key} in "
                    f"{_basename(self.metadata)}{baseline})")
        source = _basename(self.metadata) if self.metadata else "no product metadata (MTD_MSIL*.xml) found"
        return (f"{self.name}:{level} no DN offset known ({source}), none stored; set the DN offset when extracting "
                "(-1000 for processing baseline 04.00 and later)")


def _basename(name) -> str:
    return str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


# --- finding the product's pieces ---------------------------------------------
#: GDAL's SENTINEL2 subdataset names: ``SENTINEL2_L2A:/path/MTD_MSIL2A.xml:10m:EPSG_32717`` (the path
#: possibly quoted, the EPSG part absent for some).
SUBDATASET = re.compile(r'^SENTINEL2_(?P<level>L1B|L1C|L2A)(?:_TILE)?:(?P<path>"[^"]+"|.+?)'
                        r'(?::(?P<what>\d+m|TCI|PREVIEW|RGB|ALL))?(?::EPSG_\d+)?$', re.IGNORECASE)
METADATA_FILE = re.compile(r"^MTD_MSIL(1C|2A)\.xml$", re.IGNORECASE)
SCL_FILE = re.compile(r"_SCL_(?P<res>\d+)m\.(?:jp2|tiff?)$", re.IGNORECASE)


def _choose_bands(entries: Sequence[str], where: str) -> Dict[str, str]:
    """B2, B3, B4, B8, B11, B12 among ``entries`` (paths, ``/``-separated), the finest resolution of each."""
    candidates: Dict[str, Dict[int, List[str]]] = {}
    for entry in entries:
        parts = entry.replace("\\", "/").split("/")
        match = BAND_FILE.search(parts[-1])
        if not match or parts[-1].upper().startswith("MSK_") or "QI_DATA" in parts:
            continue
        band = band_label(match["band"], {})
        if band is None:
            continue
        resolution = int(match["res"]) if match["res"] else NATIVE_RESOLUTION.get(band, 0)
        candidates.setdefault(band, {}).setdefault(resolution, []).append(entry)
    missing = [b for b in SOURCE_BANDS if b not in candidates]
    if missing:
        found = ", ".join(f"{b} ({'/'.join(f'{r} m' for r in sorted(rs))})"
                          for b, rs in sorted(candidates.items(), key=lambda kv: METADATA_BAND_ORDER.index(kv[0])))
        raise ValueError(f"no {', '.join(missing)} band file in {where} (found {found or 'no band files'}); "
                         f"ME-Net needs {', '.join(SOURCE_BANDS)} as files named like "
                         "T17MPN_20230105T153621_B02_10m.jp2 (L2A) or T17MPN_20200101T153619_B02.jp2 (L1C)")
    chosen = {}
    for band in SOURCE_BANDS:
        resolution = min(candidates[band])
        files = candidates[band][resolution]
        if len(files) > 1:
            names = ", ".join(_basename(f) for f in files)
            raise ValueError(f"several {band} files at {resolution} m in {where} ({names}); "
                             "give a folder holding one product")
        chosen[band] = files[0]
    return chosen


def _choose_scl(entries: Sequence[str]) -> Optional[str]:
    """The finest scene classification file among ``entries`` (L2A keeps it at 20 and 60 m)."""
    hits = sorted((int(m["res"]), e) for e in entries for m in [SCL_FILE.search(_basename(e))]
                  if m and "QI_DATA" not in e.replace("\\", "/").split("/"))
    return hits[0][1] if hits else None


def find_band_files(folder) -> Dict[str, Path]:
    """B2, B3, B4, B8, B11, B12 files under ``folder`` (searched recursively).

    Where a band exists at several resolutions (L2A keeps B2 at 10, 20 and
    60 m) the finest is taken.  Quality masks (``QI_DATA``, ``MSK_*``) are skipped.
    """
    folder = Path(folder)
    if folder.is_file() and folder.suffix.lower() == ".zip":
        raise ValueError(f"{folder.name} is a zip archive: open it with open_product (read in place)")
    if not folder.is_dir():
        raise ValueError(f"Sentinel-2 product folder not found: {folder}")
    files = [str(p) for p in sorted(folder.rglob("*")) if p.is_file()]
    return {band: Path(path) for band, path in _choose_bands(files, str(folder)).items()}


def find_metadata_file(folder, band_files: Dict[str, Path]) -> Optional[Path]:
    """The product metadata ``MTD_MSIL*.xml`` in ``folder`` or in the ``.SAFE`` root above it or its bands."""
    folder = Path(folder).resolve()
    ancestors = [folder, *folder.parents] + [p for f in band_files.values() for p in Path(f).resolve().parents]
    roots = [folder] + [p for p in ancestors if p.suffix.upper() == ".SAFE"]
    for root in dict.fromkeys(roots):
        hits = sorted(root.glob("MTD_MSIL*.xml"))
        if hits:
            return hits[0]
    return None


def read_metadata(xml_path, text: Optional[bytes] = None) -> Tuple[Optional[float], str, Optional[str], Optional[str]]:
    """(DN offset of the six bands, its key, processing baseline, product URI) from MTD_MSIL1C/2A.xml.

    Products before processing baseline 04.00 carry no offset elements: their offset is 0.
    ``text``: the file's bytes where it is not a local file (a zip member).
    """
    offset, key, baseline, uri, _ = _read_metadata(xml_path, text)
    return offset, key, baseline, uri


def _read_metadata(xml_path, text: Optional[bytes] = None):
    name = _basename(xml_path)
    try:
        root = ET.fromstring(text) if text is not None else ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"cannot read product metadata {name}: {exc}") from None
    offsets: Dict[str, float] = {}
    key = "RADIO_ADD_OFFSET" if "MSIL1C" in name.upper() else "BOA_ADD_OFFSET"
    baseline, uri, sensing = None, None, None
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        text_value = (element.text or "").strip()
        band_id = element.get("band_id", "")
        if tag in OFFSET_KEYS and band_id.isdigit() and int(band_id) < len(METADATA_BAND_ORDER):
            band = METADATA_BAND_ORDER[int(band_id)]
            if band in SOURCE_BANDS:
                offsets[band] = checked_dn_offset(text_value, f"{name} ({tag} of {band})",
                                                  "the product metadata is damaged; download the product again")
                key = tag
        elif tag == "PROCESSING_BASELINE" and baseline is None:
            baseline = text_value
        elif tag == "PRODUCT_URI" and uri is None:
            uri = text_value
        elif tag in ("PRODUCT_START_TIME", "DATATAKE_SENSING_START", "SENSING_TIME") and sensing is None:
            sensing = text_value or None
    if len(set(offsets.values())) > 1:
        raise ValueError(f"{name} gives different DN offsets per band "
                         f"({', '.join(f'{b}={v:g}' for b, v in offsets.items())}); ME-Net applies one offset")
    if offsets:
        return next(iter(offsets.values())), key, baseline, uri, sensing
    return (0.0 if _baseline_number(baseline) < 4.0 else None), key, baseline, uri, sensing


def _baseline_number(baseline: Optional[str]) -> float:
    """'02.14' -> 2.14; unknown or unreadable -> inf (never taken for a pre-offset product)."""
    try:
        return float(baseline)
    except (TypeError, ValueError):
        return math.inf


def _level(metadata_name) -> Optional[str]:
    match = METADATA_FILE.match(_basename(metadata_name or ""))
    return f"L{match.group(1).upper()}" if match else None


def find_product(folder) -> Sentinel2Product:
    """Band files and metadata of the product in ``folder``; ValueError naming what is missing."""
    folder = Path(folder)
    band_files = find_band_files(folder)
    metadata = find_metadata_file(folder, band_files)
    safe_root = next((p for p in band_files["B2"].resolve().parents if p.suffix.upper() == ".SAFE"), None)
    name = safe_root.name if safe_root else folder.resolve().name
    files = [str(p) for p in sorted((safe_root or folder).rglob("*")) if p.is_file()]
    level = _level(metadata)
    scl = _choose_scl(files) if level != "L1C" else None
    if metadata is None:
        return Sentinel2Product(name, band_files, scl=scl, source=str(folder))
    offset, key, baseline, uri, sensing = _read_metadata(metadata)
    return Sentinel2Product(uri or name, band_files, offset, key, baseline, metadata, level, scl, sensing,
                            str(folder))


def _zip_product(archive: Path, inner: Optional[str] = None) -> Sentinel2Product:
    """The product inside a zip, read in place (``/vsizip/``): ``inner`` is its MTD_MSIL*.xml member, else
    the one MTD_MSIL*.xml the archive holds (at most two folders deep)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [i.filename for i in zf.infolist() if not i.is_dir()]
            if inner is None:
                xmls = [m for m in members if METADATA_FILE.match(m.rsplit("/", 1)[-1]) and m.count("/") <= 2]
                if not xmls:
                    raise ValueError(f"{archive.name} holds no Sentinel-2 product (no MTD_MSIL1C.xml or "
                                     "MTD_MSIL2A.xml in it)")
                if len(xmls) > 1:
                    raise ValueError(f"{archive.name} holds several products ({', '.join(xmls)}); "
                                     "give one product per zip, or its MTD_MSIL*.xml inside the zip as "
                                     f"/vsizip/{archive}/<product>.SAFE/MTD_MSIL2A.xml")
                inner = xmls[0]
            elif inner not in members:
                raise ValueError(f"{archive.name} has no member {inner}")
            text = zf.read(inner)
    except zipfile.BadZipFile:
        raise ValueError(f"{archive.name} is not a zip archive GDAL or Python can read (damaged or not a zip); "
                         "download the product again") from None
    except OSError as exc:
        raise ValueError(f"cannot read {archive.name}: {exc}") from None
    root = inner.rsplit("/", 1)[0] + "/" if "/" in inner else ""
    entries = [m for m in members if m.startswith(root)]
    vsi = f"/vsizip/{archive.resolve().as_posix()}/"
    where = f"{archive.name} ({root.rstrip('/') or 'top level'})"
    bands = {b: vsi + m for b, m in _choose_bands(entries, where).items()}
    level = _level(inner)
    scl = _choose_scl(entries) if level == "L2A" else None
    offset, key, baseline, uri, sensing = _read_metadata(inner, text)
    name = uri or root.rstrip("/").rsplit("/", 1)[-1] or archive.name
    return Sentinel2Product(name, bands, offset, key, baseline, vsi + inner, level, scl and vsi + scl, sensing,
                            str(archive))


def _split_vsizip(name: str) -> Optional[Tuple[Path, str]]:
    """``/vsizip/{archive.zip}/{member}`` -> (archive, member)."""
    match = re.match(r"^/vsizip/+(?P<archive>.+?\.zip)/(?P<member>.+)$", name, re.IGNORECASE)
    if not match:
        return None
    archive = match["archive"]
    return Path(archive if archive.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", archive) else "/" + archive
                if name.startswith("/vsizip//") else archive), match["member"]


def product_source_name(name) -> Optional[str]:
    """Whether ``name`` names a Sentinel-2 product as delivered (a ``.SAFE`` folder, a ``.zip``, an
    ``MTD_MSIL*.xml`` or a SENTINEL2 subdataset); returns the kind, else None.  Looks at names only."""
    text = str(name).strip()
    if SUBDATASET.match(text):
        return "subdataset"
    base = _basename(text)
    if METADATA_FILE.match(base):
        return "metadata"
    if base.lower().endswith(".zip"):
        return "zip"
    path = Path(text)
    if not text.startswith("/vsi") and path.is_dir():
        return "folder"
    return None


def open_product(name) -> Sentinel2Product:
    """The Sentinel-2 product a user has, as they have it: its ``.SAFE`` folder (or a folder of its band
    files), its ``.zip`` (read in place through ``/vsizip/``, not unpacked), its ``MTD_MSIL1C.xml`` or
    ``MTD_MSIL2A.xml``, or any GDAL SENTINEL2 subdataset name
    (``SENTINEL2_L2A:/path/MTD_MSIL2A.xml:10m:EPSG_32717``, the one QGIS opens, lacking B11): the other
    resolutions' bands, DN offset and scene classification are found from it.  ValueError in one line
    for what is not a product ME-Net can map."""
    text = str(name).strip()
    sub = SUBDATASET.match(text)
    if sub:
        if sub["level"].upper() == "L1B":
            raise ValueError(f"{text} is a Level-1B product (not orthorectified, no map grid); "
                             "use the Level-2A (or Level-1C) product")
        text = sub["path"].strip('"')
    vsizip = _split_vsizip(text) if text.lower().startswith("/vsizip/") else None
    if vsizip:
        archive, member = vsizip
        if not archive.is_file():
            raise ValueError(f"Sentinel-2 product zip not found: {archive}")
        if not METADATA_FILE.match(member.rsplit("/", 1)[-1]):
            return _zip_product(archive)
        return _zip_product(archive, member)
    path = Path(text)
    if not path.exists():
        raise ValueError(f"Sentinel-2 product not found: {text}")
    if path.is_file() and path.suffix.lower() == ".zip":
        return _zip_product(path)
    if path.is_file() and (METADATA_FILE.match(path.name) or (sub and path.suffix.lower() == ".xml")):
        # MTD_MSIL*.xml, or the granule's or an older layout's metadata a subdataset names: its folder
        product = find_product(path.parent)
        product.source = str(name)
        return product
    if path.is_dir():
        return find_product(path)
    raise ValueError(f"{path.name} is not a Sentinel-2 product: give its .SAFE folder, its .zip, its "
                     "MTD_MSIL2A.xml (or MTD_MSIL1C.xml), or one of its SENTINEL2 subdatasets")


def product_vrt(product: Sentinel2Product, path) -> Path:
    """Write a 6-band 10 m VRT of ``product`` (B2, B3, B4, B8, B11, B12 on B2's grid; B11 and B12
    resampled bilinearly from 20 m by GDAL's VRT resampling, DN 0 as no data) carrying the product's tags
    (the DN offset ``RasterInput`` applies).  Sources are absolute GDAL names (``/vsizip/`` for a zip),
    so the VRT can be written anywhere, ``/vsimem/`` included.  For the values ``build_stack`` writes
    (GDAL's warper) open the product itself with ``RasterInput``."""
    from xml.sax.saxutils import escape
    with contextlib.ExitStack() as stack:
        sources = {b: stack.enter_context(rasterio.open(gdal_name(p))) for b, p in product.band_files.items()}
        check_bands(sources)
        ref = sources["B2"]
        geo = ", ".join(f"{v!r}" for v in ref.transform.to_gdal())
        dtype = {"uint16": "UInt16", "int16": "Int16", "uint8": "Byte", "float32": "Float32"}.get(ref.dtypes[0],
                                                                                                   "UInt16")
        bands = []
        for i, band in enumerate(SOURCE_BANDS, 1):
            ds = sources[band]
            src = escape(gdal_name(product.band_files[band]))
            scale_x, scale_y = ds.transform.a / ref.transform.a, ds.transform.e / ref.transform.e
            box = (f'<SrcRect xOff="0" yOff="0" xSize="{ds.width}" ySize="{ds.height}"/>'
                   f'<DstRect xOff="{(ds.transform.c - ref.transform.c) / ref.transform.a:.10g}" '
                   f'yOff="{(ds.transform.f - ref.transform.f) / ref.transform.e:.10g}" '
                   f'xSize="{ds.width * scale_x:.10g}" ySize="{ds.height * scale_y:.10g}"/>')
            same = (ds.transform, ds.shape) == (ref.transform, ref.shape)
            kind = "SimpleSource" if same else 'ComplexSource resampling="bilinear"'
            close = kind.split()[0]
            nodata = "" if same else "<NODATA>0</NODATA>"
            bands.append(f'  <VRTRasterBand dataType="{dtype}" band="{i}">\n'
                         f'    <Description>{band}</Description>\n    <NoDataValue>0</NoDataValue>\n'
                         f'    <{kind}><SourceFilename relativeToVRT="0">{src}</SourceFilename>'
                         f'<SourceBand>1</SourceBand>{box}{nodata}</{close}>\n  </VRTRasterBand>\n')
        metadata = "".join(f'<MDI key="{escape(k)}">{escape(v)}</MDI>' for k, v in product.tags().items())
        xml = (f'<VRTDataset rasterXSize="{ref.width}" rasterYSize="{ref.height}">\n'
               f'  <SRS>{escape(ref.crs.to_wkt())}</SRS>\n  <GeoTransform>{geo}</GeoTransform>\n'
               f'  <Metadata>{metadata}</Metadata>\n' + "".join(bands) + "</VRTDataset>\n")
    path = str(path)
    if path.startswith("/vsimem/"):
        _write_vsimem(path, xml.encode())
        return Path(path)
    out = Path(path)
    out.write_text(xml)
    return out


def _write_vsimem(path: str, data: bytes) -> None:
    """Write ``data`` to GDAL's in-memory file system (``/vsimem/``), through osgeo where present."""
    from osgeo import gdal
    from ..compat import osgeo_exceptions
    with osgeo_exceptions():  # stated, not GDAL's default (GDAL >= 3.9 warns on stderr otherwise)
        handle = gdal.VSIFOpenL(path, "wb")
        gdal.VSIFWriteL(data, 1, len(data), handle)
        gdal.VSIFCloseL(handle)


def closed_by(stack: contextlib.ExitStack, dataset):
    """``dataset``, closed with ``stack`` through its ``close()`` rather than its context manager: rasterio >= 1.4
    ties a dataset's GDAL environment to the thread that opened it, and a ``ProductReader`` opened on a
    reader thread is closed on another (its ``__exit__`` there fails: "No GDAL environment exists")."""
    stack.callback(dataset.close)
    return dataset


def gdal_name(source) -> str:
    return source if isinstance(source, str) else str(Path(source).resolve())


class ProductReader:
    """Reads a product's six bands on B2's 10 m grid as ``build_stack`` writes them (10 m bands as they
    are, B11/B12 through GDAL's warper with the same options), like a rasterio dataset's ``read``."""

    def __init__(self, product: Sentinel2Product, resampling: str = "bilinear"):
        self.product = product
        self._stack = contextlib.ExitStack()
        try:
            sources = {b: closed_by(self._stack, rasterio.open(gdal_name(p)))
                       for b, p in product.band_files.items()}
            check_bands(sources)
            self.readers = band_readers(sources, self._stack, resampling)
            ref = sources["B2"]
            self.crs, self.transform, self.width, self.height = ref.crs, ref.transform, ref.width, ref.height
            self.dtype = ref.dtypes[0]
            self._scl = None
        except BaseException:
            self._stack.close()
            raise
        self.name = product.source or product.name
        self.count = len(SOURCE_BANDS)
        self.nodata = 0
        self.dtypes = [self.dtype] * self.count
        self.descriptions = tuple(SOURCE_BANDS)

    def tags(self, bidx: int = 0) -> Dict[str, str]:
        """The product's tags (DN offset, baseline, level, sensing time); none per band."""
        return dict(self.product.tags()) if not bidx else {}

    def read(self, indexes=None, window=None, out_dtype=None) -> np.ndarray:
        """Bands ``indexes`` (1-based, in ``SOURCE_BANDS`` order; default all) of ``window``."""
        if indexes is None:
            indexes = list(range(1, len(self.readers) + 1))
        single = isinstance(indexes, int)
        chosen = [indexes] if single else list(indexes)
        data = np.stack([self.readers[i - 1].read(1, window=window) for i in chosen])
        if out_dtype is not None:
            data = data.astype(out_dtype, copy=False)
        return data[0] if single else data

    def read_scl(self, window=None) -> Optional[np.ndarray]:
        """The scene classification (uint8 classes) of ``window`` on the 10 m grid (nearest: each 20 m
        class on its four 10 m pixels); None for a product without one (L1C)."""
        if self.product.scl is None:
            return None
        if self._scl is None:
            src = closed_by(self._stack, rasterio.open(gdal_name(self.product.scl)))
            self._scl = closed_by(self._stack,
                WarpedVRT(src, crs=self.crs, transform=self.transform, width=self.width, height=self.height,
                          resampling=Resampling.nearest, src_nodata=None, nodata=None))
        return self._scl.read(1, window=window).astype(np.uint8)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def band_readers(sources: Dict[str, "rasterio.DatasetReader"], stack: contextlib.ExitStack,
                  resampling: str = "bilinear") -> List:
    """One reader per band of ``SOURCE_BANDS`` on B2's grid: the 10 m files as they are, coarser ones
    through GDAL's warper (DN 0 no data, never blended into valid values)."""
    ref = sources["B2"]
    return [sources[b] if (sources[b].transform, sources[b].shape) == (ref.transform, ref.shape) else
            closed_by(stack, WarpedVRT(sources[b], crs=ref.crs, transform=ref.transform, width=ref.width,
                                          height=ref.height, resampling=RESAMPLING[resampling],
                                          src_nodata=0, nodata=0))
            for b in SOURCE_BANDS]


def check_bands(sources: Dict[str, rasterio.DatasetReader]) -> None:
    """All bands in one CRS and type, the 10 m bands on one grid."""
    ref = sources["B2"]
    for band, ds in sources.items():
        name = Path(ds.name).name
        if ds.crs != ref.crs:
            raise ValueError(f"{name} ({band}) is in {ds.crs}, B2 in {ref.crs}: the bands are not from one tile")
        if ds.dtypes[0] != ref.dtypes[0]:
            raise ValueError(f"{name} ({band}) holds {ds.dtypes[0]}, B2 holds {ref.dtypes[0]}")
        if NATIVE_RESOLUTION[band] == 10 and (ds.transform, ds.shape) != (ref.transform, ref.shape):
            raise ValueError(f"{name} ({band}) is not on the grid of B2 (transform or size differ)")
