"""Map from an area and a date range: a loopback STAC API, a range-request HTTP server, COGs cut from real pixels.

The world: a 1024 x 1024 px crop of the real Jambelí scene (``../shared/data/jambeli/scene_2020.tif``) as
Earth Search lays out Sentinel-2 L2A: one COG per band (B2-B8 at 10 m, B11/B12 at 20 m), uint16 DN with the
-1000 offset in ``raster:bands``, and a 20 m SCL COG; four dates, clouds from the real cloudy MagSet-2 tiles
(``tile_1_41``, ``tile_1_48``: their bright pixels, values and all, SCL 9 there), the fourth date a cloudy
scene above the cloud limit.  The API (``http.server`` on 127.0.0.1) answers the landing page, conformance
and GET/POST /search (bbox, datetime, collections, query on eo:cloud_cover); the COGs come from a second
server that honours Range and HEAD (GDAL's /vsicurl/ needs both) and counts the bytes it sends.
"""
from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pytest

from helpers import ROOT, cli_process

SHARED = ROOT.parent / "shared" / "data"
SCENE = SHARED / "jambeli" / "scene_2020.tif"
MAGSET = SHARED / "magset2" / "tiles"
MODEL = ROOT / "resources" / "models" / "menet_coasts_v2.pt"
pytestmark = pytest.mark.skipif(not (SCENE.is_file() and MAGSET.is_dir()),
                                reason="needs ../shared/data (jambeli scene and MagSet-2 tiles)")

#: The crop of the scene (row, col, size) and the mapped area inside it (rows, cols of the crop).
CROP = (768, 2304, 1024)
AREA = (272, 432, 272, 432)
BAND_FILES = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08", "swir16": "B11", "swir22": "B12"}
#: date -> (cloud tile, where its 256 x 256 cloud patch goes in the crop (row, col)) ; None = clear.
DATES = {"2020-03-05": ("tile_1_41", (200, 200)), "2020-03-15": ("tile_1_48", (330, 150)),
         "2020-03-25": None, "2020-04-04": "overcast"}
CONFORMS = ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search",
            "https://api.stacspec.org/v1.0.0/item-search#query"]


# --- servers ------------------------------------------------------------------------------------------------
class RangeFiles(BaseHTTPRequestHandler):
    """Files under ``server.root`` with HEAD and single-range GET (206), counting the body bytes sent per file."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):  # noqa: N802
        self._serve(head=True)

    def do_GET(self):  # noqa: N802
        self._serve(head=False)

    def _serve(self, head):
        root = self.server.root
        path = (root / unquote(urlsplit(self.path).path).lstrip("/")).resolve()
        if root not in path.parents or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end, status = 0, len(data) - 1, 200
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes="):
            first, _, last = wanted[6:].split(",")[0].partition("-")
            start = int(first) if first else max(0, len(data) - int(last))
            end = min(int(last), len(data) - 1) if first and last else len(data) - 1
            status = 206
        body = data[start:end + 1]
        self.send_response(status)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if not head:
            self.wfile.write(body)
            with self.server.lock:
                self.server.sent[path.relative_to(root).as_posix()] += len(body)


class StacApi(BaseHTTPRequestHandler):
    """A STAC API per catalogue name (/NAME/, /NAME/conformance, GET and POST /NAME/search)."""

    def log_message(self, *args):
        pass

    def _json(self, data, status=200):
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        parts = urlsplit(self.path)
        name, _, rest = parts.path.strip("/").partition("/")
        if name not in self.server.catalogues:
            return self._json({"code": "NotFound"}, 404)
        base = f"http://127.0.0.1:{self.server.server_address[1]}/{name}"
        if rest == "":
            return self._json({
                "type": "Catalog", "stac_version": "1.0.0", "id": name, "description": "loopback STAC API",
                "conformsTo": CONFORMS, "links": [
                    {"rel": "self", "href": f"{base}/", "type": "application/json"},
                    {"rel": "root", "href": f"{base}/", "type": "application/json"},
                    {"rel": "conformance", "href": f"{base}/conformance", "type": "application/json"},
                    {"rel": "search", "href": f"{base}/search", "type": "application/geo+json", "method": "GET"},
                    {"rel": "search", "href": f"{base}/search", "type": "application/geo+json", "method": "POST"}]})
        if rest == "conformance":
            return self._json({"conformsTo": CONFORMS})
        if rest == "search":
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            return self._search(name, {
                "bbox": [float(v) for v in query["bbox"].split(",")] if "bbox" in query else None,
                "datetime": query.get("datetime"), "collections": query.get("collections", "").split(",") or None,
                "query": json.loads(query["query"]) if "query" in query else None})
        return self._json({"code": "NotFound"}, 404)

    def do_POST(self):  # noqa: N802
        name, _, rest = urlsplit(self.path).path.strip("/").partition("/")
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if name not in self.server.catalogues or rest != "search":
            return self._json({"code": "NotFound"}, 404)
        return self._search(name, body)

    def _search(self, name, search):
        self.server.searches.append((name, search))
        items = self.server.catalogues[name]
        if search.get("collections"):
            items = [i for i in items if i["collection"] in search["collections"]]
        if search.get("bbox"):
            x0, y0, x1, y1 = search["bbox"]
            items = [i for i in items if not (i["bbox"][2] < x0 or i["bbox"][0] > x1 or i["bbox"][3] < y0
                                              or i["bbox"][1] > y1)]
        if search.get("datetime"):
            start, _, end = search["datetime"].partition("/")
            items = [i for i in items if (start in ("", "..") or i["properties"]["datetime"] >= start)
                     and (end in ("", "..") or i["properties"]["datetime"] <= end)]
        limit = ((search.get("query") or {}).get("eo:cloud_cover") or {}).get("lte")
        if limit is not None:
            items = [i for i in items if i["properties"]["eo:cloud_cover"] <= limit]
        links = list(self.server.extra_links.get(name, []))
        return self._json({"type": "FeatureCollection", "features": items, "links": links})


def _serve(handler, **attributes):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for key, value in attributes.items():
        setattr(httpd, key, value)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


# --- the world ----------------------------------------------------------------------------------------------
def _cloud_patch(tile):
    """The tile's real cloudy pixels (B2 DN > 1500) and their DN (B2, B3, B4, B8, B11, B11 for B12), 2x up."""
    import warnings

    import rasterio
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # MagSet-2 tiles have no grid
        with rasterio.open(MAGSET / f"{tile}.tif") as ds:
            dn = ds.read().astype(np.float32)
    bands = dn[[0, 1, 2, 3, 5, 5]]  # MagSet-2 has B8A in band 5 and no B12: B11 stands in
    up = np.kron(bands, np.ones((1, 2, 2), np.float32))
    return up[0] > 1500, up


def _write_cog(path, array, transform, crs, dtype):
    import rasterio
    from osgeo import gdal
    mem = path.with_suffix(".plain.tif")
    with rasterio.open(mem, "w", driver="GTiff", width=array.shape[1], height=array.shape[0], count=1, dtype=dtype,
                       crs=crs, transform=transform, nodata=0) as ds:
        ds.write(array.astype(dtype), 1)
    gdal.Translate(str(path), str(mem), format="COG", creationOptions=["COMPRESS=DEFLATE", "BLOCKSIZE=256"])
    mem.unlink()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import rasterio
    from rasterio.warp import transform_bounds
    from rasterio.windows import Window
    row, col, size = CROP
    with rasterio.open(SCENE) as ds:
        ground = ds.read(window=Window(col, row, size, size))
        transform = ds.window_transform(Window(col, row, size, size))
        crs = ds.crs
    folder = tmp_path_factory.mktemp("cogs")
    ground_dn = np.where(np.isfinite(ground), np.round(np.nan_to_num(ground) * 10000) + 1000, 0)
    ground_dn[:, ~np.isfinite(ground).all(axis=0)] = 0
    t20 = transform * transform.scale(2, 2)
    bbox = list(transform_bounds(crs, "EPSG:4326", *rasterio.transform.array_bounds(size, size, transform)))
    items, clouds = [], {}
    for date, cloud in DATES.items():
        dn = ground_dn.copy()
        scl = np.where(dn[0] > 0, 4, 0).astype(np.uint8)
        cloudy = np.zeros((size, size), bool)
        if cloud == "overcast":
            cloudy[:] = dn[0] > 0
            dn[:, cloudy] = 5000
        elif cloud:
            mask, values = _cloud_patch(cloud[0])
            r, c = cloud[1]
            cloudy[r:r + 256, c:c + 256] = mask
            region = dn[:, r:r + 256, c:c + 256]
            region[:, mask] = values[:, mask]
        scl[cloudy] = 9
        clouds[date] = cloudy
        day = folder / date
        day.mkdir()
        for key, name in BAND_FILES.items():
            band = dn[list(BAND_FILES).index(key)]
            if name in ("B11", "B12"):  # 20 m: the mean of each 2 x 2 block (no data stays 0)
                blocks = band.reshape(size // 2, 2, size // 2, 2)
                band = np.where((blocks > 0).all(axis=(1, 3)), blocks.mean(axis=(1, 3)), 0)
                _write_cog(day / f"{name}.tif", np.round(band), t20, crs, "uint16")
            else:
                _write_cog(day / f"{name}.tif", band, transform, crs, "uint16")
        _write_cog(day / "SCL.tif", scl.reshape(size // 2, 2, size // 2, 2).max(axis=(1, 3)), t20, crs, "uint8")
        cover = round(100 * float(cloudy.sum()) / float((dn[0] > 0).sum()), 2)
        items.append((date, cover))
    files = _serve(RangeFiles, root=folder.resolve(), sent=Counter(), lock=threading.Lock())
    file_url = f"http://127.0.0.1:{files.server_address[1]}"

    def item(date, cover, href=lambda date, name: f"{file_url}/{date}/{name}.tif"):
        raster = [{"nodata": 0, "data_type": "uint16", "scale": 0.0001, "offset": -0.1}]
        assets = {key: {"href": href(date, name), "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                        "roles": ["data"], "raster:bands": raster} for key, name in BAND_FILES.items()}
        assets["scl"] = {"href": href(date, "SCL"), "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                         "roles": ["data"], "raster:bands": [{"nodata": 0, "data_type": "uint8"}]}
        x0, y0, x1, y1 = bbox
        return {"type": "Feature", "stac_version": "1.0.0", "id": f"S2B_17MPN_{date.replace('-', '')}_0_L2A",
                "collection": "sentinel-2-l2a", "bbox": bbox,
                "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                "properties": {"datetime": f"{date}T15:36:21Z", "eo:cloud_cover": cover, "proj:epsg": 32717,
                               "s2:processing_baseline": "04.00"},
                "assets": assets, "links": []}

    good = [item(d, c) for d, c in items]
    catalogues = {
        "good": good,
        # hrefs that point outside: a local file from a remote catalogue
        "file": [item(d, c, href=lambda date, name: f"file:///etc/{name}.tif") for d, c in items[:1]],
        # a relative href climbing out of the API's folder resolves to the API's host: allowed (http on its own
        # host), so the path-escape case is the local file; and a next page on a link-local address
        "next": good[:1],
        # an asset the file server does not have
        "missing": [item(d, c, href=lambda date, name: f"{file_url}/{date}/{name}_gone.tif") for d, c in items[2:3]],
    }
    extra = {"next": [{"rel": "next", "href": "http://169.254.169.254/latest/meta-data/", "method": "GET"}]}
    api = _serve(StacApi, catalogues=catalogues, extra_links=extra, searches=[])
    api_url = f"http://127.0.0.1:{api.server_address[1]}"
    area_transform = transform * transform.translation(AREA[2], AREA[0])
    utm_area = list(rasterio.transform.array_bounds(AREA[1] - AREA[0], AREA[3] - AREA[2], area_transform))
    area = list(transform_bounds(crs, "EPSG:4326", *utm_area))  # what the search gets (WGS 84)
    yield {"api": api_url, "files": files, "folder": folder, "items": items, "area": area, "utm_area": utm_area,
           "ground": ground,
           "clouds": clouds, "crs": crs, "transform": transform, "searches": api.searches}
    api.shutdown()
    files.shutdown()


# --- tests --------------------------------------------------------------------------------------------------
def test_the_cloud_limit_filters_items(world):
    from menet_qgis.core.io import stac_search
    covers = dict(world["items"])
    assert covers["2020-03-25"] == 0 and covers["2020-04-04"] > 60 and 0 < covers["2020-03-05"] < 40
    for limit, expected in ((100, 4), (40, 3), (covers["2020-03-15"], 2), (0, 1)):
        items, document = stac_search.search(f"{world['api']}/good", world["area"], "2020-03-01", "2020-04-30",
                                              limit)
        assert len(items) == expected, limit
        assert all(stac_search.cloud_cover(i) <= limit for i in items)
        assert document == f"{world['api']}/good/search"
    # least cloudy first, and the limit went to the API as a query (not only filtered here)
    assert [stac_search.cloud_cover(i) for i in items] == sorted(stac_search.cloud_cover(i) for i in items)
    assert world["searches"][-1][1]["query"] == {"eo:cloud_cover": {"lte": 0}}
    items, _ = stac_search.search(f"{world['api']}/good", world["area"], "2020-03-01", "2020-04-30", 100, max_items=2)
    assert [i.properties["datetime"][:10] for i in items] == ["2020-03-25", "2020-03-15"]


def test_an_empty_search_says_so_in_one_line(world):
    from menet_qgis.core.io import stac_search
    with pytest.raises(stac_search.StacSearchError) as error:
        stac_search.search(f"{world['api']}/good", world["area"], "2019-01-01", "2019-02-01", 40)
    message = str(error.value)
    assert "\n" not in message and message.startswith("no sentinel-2-l2a item at http://127.0.0.1:")
    assert "widen the dates" in message
    with pytest.raises(stac_search.StacSearchError, match=r"ends \(2020-01-01\) before it starts"):
        stac_search.search(f"{world['api']}/good", world["area"], "2020-02-01", "2020-01-01", 40)
    with pytest.raises(stac_search.StacSearchError, match="must be an http"):
        stac_search.search("/etc", world["area"], "2020-01-01", "2020-02-01", 40)


def test_hrefs_pointing_outside_are_refused(world):
    from menet_qgis.batch.inputs import UnsafeHrefError
    from menet_qgis.core.io import stac_search
    # a local file named by a remote (here loopback) API
    items, document = stac_search.search(f"{world['api']}/file", world["area"], "2020-03-01", "2020-04-30", 100)
    with pytest.raises(UnsafeHrefError, match=r"asset blue: .*file:///etc/B02.tif.* is a local file"):
        stac_search.item_assets(items[0], document)
    # a public API's item pointing at this machine (the good item's hrefs are on 127.0.0.1)
    good, _ = stac_search.search(f"{world['api']}/good", world["area"], "2020-03-01", "2020-04-30", 100, max_items=1)
    with pytest.raises(UnsafeHrefError, match="a loopback address, and its catalogue http://93.184.216.34/v1/search "
                                              "is not"):
        stac_search.item_assets(good[0], "http://93.184.216.34/v1/search")
    # a next-page link to the cloud metadata address: refused before any request
    with pytest.raises(UnsafeHrefError, match="meta-data/ is on 169.254.169.254, a link-local address"):
        stac_search.search(f"{world['api']}/next", world["area"], "2020-03-01", "2020-04-30", 100)


def test_an_asset_that_cannot_be_read_is_named_in_one_line(world):
    from menet_qgis.core.io import stac_search
    items, document = stac_search.search(f"{world['api']}/missing", world["area"], "2020-03-01", "2020-04-30", 100)
    assets = [stac_search.item_assets(i, document) for i in items]
    grid = stac_search.area_grid(world["utm_area"], world["crs"], world["crs"])
    with pytest.raises(stac_search.StacSearchError) as error:
        stac_search.read_observations(assets, grid)
    assert str(error.value).startswith(f"cannot read http://127.0.0.1:{world['files'].server_address[1]}/2020-03-25/")
    assert "\n" not in str(error.value)


def test_windows_read_and_composited_from_clear_observations(world):
    """search -> windows over HTTP -> composite: clear pixels are the ground's, cloud pixels of one date
    are filled from the others, and only a small part of each COG travelled."""
    from osgeo import gdal

    from menet_qgis.core.io import composite, stac_search
    items, document = stac_search.search(f"{world['api']}/good", world["area"], "2020-03-01", "2020-04-30", 40)
    assets = [stac_search.item_assets(i, document) for i in items]
    assert {a.dn_offset for a in assets} == {-1000.0}
    grid = stac_search.area_grid(world["utm_area"], world["crs"], stac_search.item_crs(assets[0]))
    r0, r1, c0, c1 = AREA
    assert (grid.height, grid.width) == (r1 - r0, c1 - c0)
    assert grid.transform == world["transform"] * world["transform"].translation(c0, r0)
    gdal.VSICurlClearCache()
    world["files"].sent.clear()
    observations = stac_search.read_observations(assets, grid)
    assert [str(o.day) for o in observations] == ["2020-03-05", "2020-03-15", "2020-03-25"]
    ground = world["ground"][:, r0:r1, c0:c1]
    for obs in observations:  # the SCL's clouds are the placed ones (20 m, so their 2 x 2 blocks)
        cloudy = world["clouds"][str(obs.day)][r0:r1, c0:c1]
        assert ((obs.quality == 4) >= cloudy).all()
        clear = obs.quality == 0
        np.testing.assert_allclose(obs.reflectance[:4, clear], ground[:4, clear], atol=1e-4)
    stack, count = composite.clear_composite([(o.reflectance, o.quality) for o in observations])
    cloudy_once = world["clouds"]["2020-03-05"][r0:r1, c0:c1]
    assert cloudy_once.mean() > 0.1 and count.min() >= 1 and (count[cloudy_once] <= 2).all()
    np.testing.assert_allclose(stack[:4], ground[:4], atol=1e-4)   # 10 m bands: the ground, clouds gone
    assert float(np.abs(stack[4:] - ground[4:]).mean()) < 0.01       # 20 m bands: 2 x 2 means resampled
    sizes = {p.relative_to(world["folder"]).as_posix(): p.stat().st_size for p in world["folder"].rglob("*.tif")}
    read = {k: v for k, v in world["files"].sent.items()}
    assert "2020-04-04/B02.tif" not in read                          # the overcast date: never read
    total = sum(sizes[k] for k in read)
    assert sum(read.values()) < 0.35 * total, (sum(read.values()), total)
    ten = [k for k in read if k.split("/")[-1] in ("B02.tif", "B03.tif", "B04.tif", "B08.tif")]
    per = {kind: (sum(read[k] for k in keys), sum(sizes[k] for k in keys))
           for kind, keys in (("10 m", ten), ("20 m", [k for k in read if k not in ten]))}
    print(f"\nHTTP: {sum(read.values())} bytes read of {total} bytes in {len(read)} COGs "
          f"({sum(read.values()) / total:.1%}; " + ", ".join(f"{k} files {r} of {t}" for k, (r, t) in per.items()) +
          f"); area {grid.width} x {grid.height} px of {CROP[2]} x {CROP[2]}")


@pytest.mark.skipif(not MODEL.is_file(), reason="needs resources/models/menet_coasts_v2.pt")
def test_stac_map_end_to_end_maps_the_composite_like_the_clear_scene(world, tmp_path):
    import rasterio

    from menet_qgis import jobs
    from menet_qgis.core.reporting import Reporter

    class Log(Reporter):
        lines = []

        def info(self, message):
            self.lines.append(message)

        warn = info

    out = tmp_path / "map.tif"
    result = jobs.run("stac_map", {"output": str(out), "bounds": world["utm_area"], "bounds_crs": "EPSG:32717",
                                   "start": "2020-03-01",
                                   "end": "2020-04-30", "api_url": f"{world['api']}/good", "model": str(MODEL)},
                      Log())
    assert result["dates"] == ["2020-03-05", "2020-03-15", "2020-03-25"] and result["never_clear"] == 0
    composite = Path(result["composite"])
    assert composite == tmp_path / "map_composite.tif"
    with rasterio.open(composite) as ds, rasterio.open(out) as prob:
        assert ds.descriptions == ("B2", "B3", "B4", "B8", "B11", "B12", "clear observations")
        assert (prob.crs, prob.transform, prob.shape) == (ds.crs, ds.transform, ds.shape)
        assert ds.tags()["MENET_STAC_DATES"] == "2020-03-05,2020-03-15,2020-03-25"
        probability, stack = prob.read(1), ds.read()
    assert np.isfinite(probability).all()
    # the same engine on the cloud-free ground itself (written on the same grid): the same map
    r0, r1, c0, c1 = AREA
    truth = tmp_path / "ground.tif"
    with rasterio.open(composite) as ds:
        profile = dict(ds.profile, count=6)
    with rasterio.open(truth, "w", **profile) as ds:
        ds.write(np.concatenate([world["ground"][:4, r0:r1, c0:c1], stack[4:6]]))
        for i, name in enumerate(("B2", "B3", "B4", "B8", "B11", "B12"), 1):
            ds.set_band_description(i, name)
    reference = jobs.run("extract", {"input": str(truth), "output": str(tmp_path / "truth_map.tif"),
                                     "model": str(MODEL)}, Log())
    with rasterio.open(reference["probability"]) as ds:
        expected = ds.read(1)
    assert float(np.abs(probability - expected).mean()) < 0.01
    assert (probability >= result["threshold"]).mean() > 0.02        # the crop holds mangrove
    assert any("2020-03-05:" in line and "cloud" in line for line in Log.lines)
    print("\n" + "\n".join(line for line in Log.lines if line.startswith(("2020-", "composite of", "reading "))))


def test_the_command_line_searches_and_says_why_nothing_was_found(world, tmp_path):
    run = cli_process("stac-map", "--bounds=" + ",".join(map(str, world["area"])), "--start", "2019-01-01",
                      "--end", "2019-02-01", "--api-url", f"{world['api']}/good", "--out", tmp_path / "m.tif",
                      "--model", MODEL)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("menet_qgis: error: no sentinel-2-l2a item at http://127.0.0.1:")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not MODEL.is_file(), reason="needs resources/models/menet_coasts_v2.pt")
def test_the_processing_algorithm_maps_an_extent_and_dates(world, menet_provider, tmp_path):
    """Map mangroves from STAC in QGIS: an extent in the scene's CRS, two dates, the engine process."""
    import processing
    import rasterio
    from qgis.core import QgsProcessingException
    from qgis.PyQt.QtCore import QDate, QDateTime, QTime

    def day(text):
        return QDateTime(QDate.fromString(text, "yyyy-MM-dd"), QTime(0, 0))

    x0, y0, x1, y1 = world["utm_area"]
    params = {"EXTENT": f"{x0},{x1},{y0},{y1} [EPSG:32717]", "START_DATE": day("2020-03-01"),
              "END_DATE": day("2020-04-30"), "API_URL": f"{world['api']}/good", "MODEL": str(MODEL),
              "OUTPUT": str(tmp_path / "p.tif"), "OUTPUT_COMPOSITE": str(tmp_path / "c.tif")}
    result = processing.run("menet:mapfromstac", params)
    with rasterio.open(result["OUTPUT"]) as prob, rasterio.open(result["OUTPUT_COMPOSITE"]) as comp:
        assert prob.shape == comp.shape == (AREA[1] - AREA[0], AREA[3] - AREA[2])
        assert comp.descriptions[-1] == "clear observations" and comp.read(7).min() >= 1
    assert 0 < result["THRESHOLD"] < 1
    with pytest.raises(QgsProcessingException, match="no sentinel-2-l2a item"):
        processing.run("menet:mapfromstac", dict(params, START_DATE=day("2019-01-01"), END_DATE=day("2019-02-01"),
                                                 OUTPUT=str(tmp_path / "q.tif"),
                                                 OUTPUT_COMPOSITE=str(tmp_path / "d.tif")))
    assert not (tmp_path / "q.tif").exists() and not (tmp_path / "d.tif").exists()


def test_a_scene_in_another_crs_is_warped_onto_the_grid(world):
    """A COG in another CRS (here UTM 17N, which is 17S shifted by 10 000 km: the same pixels) is read through a
    WarpedVRT onto the area's grid; its values land on the same pixels as the file in the grid's own CRS."""
    import rasterio
    from osgeo import gdal

    from menet_qgis.core.io import stac_search
    source = world["folder"] / "2020-03-25" / "B02.tif"
    north = world["folder"] / "north_B02.tif"
    gdal.Warp(str(north), str(source), dstSRS="EPSG:32617", format="COG", resampleAlg="near",
              creationOptions=["COMPRESS=DEFLATE", "BLOCKSIZE=256"])
    grid = stac_search.area_grid(world["utm_area"], world["crs"], world["crs"])
    base = f"http://127.0.0.1:{world['files'].server_address[1]}"
    with rasterio.Env(**stac_search.GDAL_HTTP_OPTIONS):
        same = stac_search.read_on_grid(f"/vsicurl/{base}/2020-03-25/B02.tif", grid, "nearest")
        warped = stac_search.read_on_grid(f"/vsicurl/{base}/north_B02.tif", grid, "nearest")
    assert (same > 0).all()
    np.testing.assert_array_equal(warped, same)


def test_the_dialog_takes_a_polygon_layers_extent_and_needs_an_area(menet_provider, tmp_path):
    from qgis.core import QgsFeature, QgsGeometry, QgsProcessingContext, QgsProcessingException, QgsVectorLayer
    from qgis.PyQt.QtCore import QDate, QDateTime, QTime

    from menet_qgis.processing.parameters import values_from
    alg = menet_provider.algorithm("mapfromstac")
    layer = QgsVectorLayer("Polygon?crs=EPSG:4326", "area", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromWkt("POLYGON((-80.2 -3.4, -80.1 -3.4, -80.1 -3.3, -80.2 -3.4))"))
    layer.dataProvider().addFeatures([feature])
    context = QgsProcessingContext()
    day = QDateTime(QDate(2021, 1, 5), QTime(0, 0))
    params = {"AREA": layer, "START_DATE": day, "END_DATE": day, "OUTPUT": str(tmp_path / "p.tif"),
              "OUTPUT_COMPOSITE": str(tmp_path / "c.tif")}
    job = alg.job_parameters(params, context, values_from(alg, params, context, alg.declared_options))
    assert job["bounds"] == pytest.approx([-80.2, -3.4, -80.1, -3.3]) and job["bounds_crs"] == "EPSG:4326"
    assert (job["start"], job["end"], job["cloud_limit"], job["max_items"]) == ("2021-01-05", "2021-01-05", 40.0, 10)
    assert job["api_url"] == "https://earth-search.aws.element84.com/v1" and "stages" not in job["options"]
    assert alg.files_written(job) == [str(tmp_path / "p.tif"), str(tmp_path / "c.tif"), str(tmp_path / "p_quality.tif")]
    with pytest.raises(QgsProcessingException, match="give the area"):
        del params["AREA"]
        alg.job_parameters(params, context, values_from(alg, params, context, alg.declared_options))
