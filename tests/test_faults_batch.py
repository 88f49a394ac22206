"""Fault cases of ``batch``: hostile hrefs in manifests and STAC catalogues, and a batch into its own
input folder (issue 26, items 6 and 13).

Catalogues are real: written with pystac on disk, served over HTTP on 127.0.0.1 by a server that
answers byte ranges (what GDAL's /vsicurl/ asks for) and logs every request, so a test sees what
was fetched.  Each refusal is one line, exit status 2, nothing written, the user's files unchanged.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import threading
import time
from datetime import datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import rasterio

from helpers import cli_process, write_s2

pystac = pytest.importorskip("pystac")
pytest.importorskip("distributed")

S2_ASSET_BANDS = ["B02", "B03", "B04", "B08", "B11", "B12"]
OUTSIDE = ("points outside {root} (to {target}): a manifest or catalogue may only list local files inside its "
           "folder; move it beside its data or give --data-root FOLDER (the folder that holds them)")
FAST = ["--window", 128, "--overlap", 32, "--batch-size", 4, "--workers", 1, "--no-progress"]


# --- real catalogues and servers -------------------------------------------------------------------
def write_catalog(folder: Path, assets: dict, scene: Path, catalog_type=None) -> Path:
    """A static STAC catalogue written by pystac: one item per ``{id: asset href}``, each with one
    6-band GeoTIFF asset (eo:bands names).  Absolute local hrefs are written the way pystac writes
    them (relative to the item); hrefs in ``verbatim:`` form are put into the JSON as given."""
    folder.mkdir(parents=True, exist_ok=True)
    with rasterio.open(scene) as ds:
        b = ds.bounds
    catalog = pystac.Catalog("coast", "test catalogue")
    verbatim = {}
    for item_id, href in assets.items():
        item = pystac.Item(item_id, {"type": "Polygon", "coordinates": [[[b.left, b.bottom], [b.right, b.bottom],
                                                                        [b.right, b.top], [b.left, b.top],
                                                                        [b.left, b.bottom]]]},
                           [b.left, b.bottom, b.right, b.top], datetime(2020, 1, 15), {})
        if href.startswith("verbatim:"):
            verbatim[item_id], href = href[len("verbatim:"):], str(scene)
        item.add_asset("data", pystac.Asset(href, media_type=pystac.MediaType.GEOTIFF, roles=["data"],
                                            extra_fields={"eo:bands": [{"name": n} for n in S2_ASSET_BANDS]}))
        catalog.add_item(item)
    catalog.normalize_hrefs(str(folder))
    catalog.save(catalog_type or pystac.CatalogType.SELF_CONTAINED)
    for item_id, href in verbatim.items():
        path = folder / item_id / f"{item_id}.json"
        data = json.loads(path.read_text())
        data["assets"]["data"]["href"] = href
        path.write_text(json.dumps(data))
    return folder / "catalog.json"


class RangeServer(SimpleHTTPRequestHandler):
    """Files of a folder with byte ranges (GDAL's /vsicurl/ needs them), ``/go/<url>`` answered with a
    redirect to <url>, every request logged on the server."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.server.seen.append(("HEAD", self.path))
        super().do_HEAD()

    def do_GET(self):
        self.server.seen.append(("GET", self.path))
        if self.path.startswith("/go/"):
            self.send_response(302)
            self.send_header("Location", unquote(self.path[4:]))
            self.end_headers()
            return
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if not wanted or not os.path.isfile(path):
            return super().do_GET()
        data = Path(path).read_bytes()
        start, end = int(wanted[1]), min(int(wanted[2] or len(data) - 1), len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start:end + 1])


@contextlib.contextmanager
def serve(folder, host="127.0.0.1"):
    """(base URL, request log) of a RangeServer for ``folder`` on ``host``."""
    httpd = ThreadingHTTPServer((host, 0), functools.partial(RangeServer, directory=str(folder)))
    httpd.seen = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{httpd.server_address[1]}", httpd.seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def network_address():
    """An IPv4 address of this machine that is not loopback (a catalogue 'elsewhere on the network'),
    or None."""
    import psutil
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return a.address
    return None


def tree_digest(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("menet_qgis: error: "), proc.stderr[-3000:]
    return lines[0][len("menet_qgis: error: "):]


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return write_s2(tmp_path_factory.mktemp("scene") / "a.tif", 128, 128, seed=3)


@pytest.fixture
def refused(cli, untrained_path, tmp_path):
    """Run ``batch`` in this process on ``inputs``; returns its one error line after checking that the
    run left nothing behind and changed no file under ``keep``."""
    def run(*inputs, keep, extra=()):
        before = tree_digest(keep)
        out = tmp_path / "out"
        proc = cli("batch", *inputs, "--out-dir", out, "--model", untrained_path, *extra)
        line = error_line(proc)
        assert not out.exists(), sorted(out.rglob("*"))  # no output folder, no work folder, no VRT
        assert tree_digest(keep) == before
        return line
    return run


# --- item 6: local catalogues and manifests ---------------------------------------------------------
@pytest.mark.parametrize("case", ["escape to /etc/shadow", "escape to a raster beside", "absolute path",
                                  "file URL", "symlink inside"])
def test_a_local_catalogue_may_only_list_files_in_its_folder(case, scene, refused, tmp_path):
    beside = shutil.copy(scene, tmp_path / "beside.tif")
    folder = tmp_path / "catalogue"
    folder.mkdir()
    if case == "symlink inside":
        os.symlink(beside, folder / "link.tif")
    href, target = {
        "escape to /etc/shadow": ("verbatim:" + "../" * 12 + "etc/shadow", "/etc/shadow"),
        "escape to a raster beside": ("verbatim:../../beside.tif", beside),
        "absolute path": (str(beside), beside),  # as pystac writes an asset outside the catalogue's folder
        "file URL": ("verbatim:" + Path(beside).as_uri(), beside),
        "symlink inside": ("verbatim:../link.tif", beside),
    }[case]
    catalog = write_catalog(folder, {"s2a": href}, scene)
    listed = json.loads((folder / "s2a" / "s2a.json").read_text())["assets"]["data"]["href"]
    line = refused(catalog, keep=tmp_path)
    assert line == (f"STAC item s2a in catalog.json, asset data: {listed!r} in s2a.json "
                    + OUTSIDE.format(root=os.path.realpath(folder), target=os.path.realpath(target)))


@pytest.mark.parametrize("written", ["absolute", "relative"])
def test_data_root_admits_a_catalogue_beside_its_data(written, scene, tmp_path):
    """Data kept apart from the catalogue (absolute hrefs, as pystac writes them, or ``../../data/a.tif``)
    runs with --data-root naming the folder that holds both."""
    from menet_qgis.batch.inputs import collect_scenes
    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    raster = shutil.copy(scene, data / "a.tif")
    href = str(raster) if written == "absolute" else "verbatim:../../data/a.tif"
    catalog = write_catalog(tmp_path / "project" / "stac", {"s2a": href}, scene)
    (found,) = collect_scenes([str(catalog)], tmp_path / "vrt", data_root=str(tmp_path / "project"))
    assert found.sources[1:] == (os.path.realpath(raster),)


def test_file_urls_are_read_as_the_files_they_name(scene, tmp_path):
    """file:// hrefs (percent-encoded, with 'localhost') become the right path, held to the same rule;
    before, 'file:///x/a.tif' was opened as '<catalogue folder>/file:/x/a.tif'."""
    from menet_qgis.batch.inputs import UnsafeHrefError, collect_scenes
    folder = tmp_path / "catalogue"
    spaced = folder / "my scenes" / "a.tif"
    spaced.parent.mkdir(parents=True)
    shutil.copy(scene, spaced)
    url = spaced.as_uri()
    assert "%20" in url
    catalog = write_catalog(folder, {"plain": "verbatim:" + url,
                                     "localhost": "verbatim:" + url.replace("file://", "file://localhost")}, scene)
    found = collect_scenes([str(catalog)], tmp_path / "vrt")
    assert [s.sources[1:] for s in found] == [(str(spaced),)] * 2
    with rasterio.open(found[0].path) as vrt, rasterio.open(scene) as src:
        np.testing.assert_array_equal(vrt.read(), src.read())
    other = write_catalog(tmp_path / "other", {"s2a": "verbatim:file://fileserver/share/a.tif"}, scene)
    with pytest.raises(UnsafeHrefError) as err:
        collect_scenes([str(other)], tmp_path / "vrt2")
    assert str(err.value) == ("STAC item s2a in catalog.json, asset data: 'file://fileserver/share/a.tif' in s2a.json "
                              "names another host (fileserver); a file:// href must be a local file")


@pytest.mark.parametrize("row, expected", [
    ("../../../../../../etc/shadow", OUTSIDE),
    ("/vsicurl/http://169.254.169.254/latest/meta-data/a.tif",
     "is not a path or an http(s), s3:// or gs:// URL (GDAL special names and other schemes reach past a manifest's "
     "checks): list the file itself"),
])
def test_manifest_rows_are_held_to_the_same_rule(row, expected, scene, refused, tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    shutil.copy(scene, folder / "a.tif")
    manifest = folder / "scenes.csv"
    manifest.write_text(f"path,date\na.tif,2020-01-15\n{row},2020-01-16\n")
    line = refused(manifest, keep=tmp_path)
    assert line == (f"scenes.csv line 3: {row!r} in scenes.csv "
                    + expected.format(root=os.path.realpath(folder), target=os.path.realpath(folder / row)))


# --- item 6: remote catalogues ------------------------------------------------------------------------
def test_a_loopback_catalogue_maps_from_its_own_server(scene, tmp_path):
    """A catalogue on 127.0.0.1 (a test server, a local STAC mirror) may point at 127.0.0.1: its
    relative hrefs become URLs of the same server and GDAL reads the pixels through them."""
    from menet_qgis.batch.inputs import collect_scenes
    served = tmp_path / "served"
    shutil.copytree(scene.parent, served / "data")
    write_catalog(served, {"s2a": "verbatim:../data/a.tif"}, scene)
    with serve(served) as (base, seen):
        (found,) = collect_scenes([f"{base}/catalog.json"], tmp_path / "vrt")
        assert found.sources[1:] == (f"/vsicurl/{base}/data/a.tif",)
        with rasterio.open(found.path) as vrt, rasterio.open(scene) as src:
            np.testing.assert_array_equal(vrt.read(), src.read())
    assert ("GET", "/s2a/s2a.json") in seen


@pytest.mark.parametrize("href, says", [
    ("file:///etc/passwd", "is a local file"),
    ("s3://private-bucket/a.tif", "is a s3:// URL"),
])
def test_a_remote_catalogue_may_not_read_local_files_or_buckets(href, says, scene, refused, tmp_path):
    served = tmp_path / "served"
    write_catalog(served, {"s2a": "verbatim:" + href}, scene)
    with serve(served) as (base, seen):
        line = refused(f"{base}/catalog.json", keep=tmp_path)
    assert line == (f"STAC item s2a in {base}/catalog.json, asset data: {href!r} in the remote catalogue "
                    f"{base}/s2a/s2a.json {says}: a remote catalogue may only point at http(s) URLs (download it "
                    "and its files to use it locally)")
    assert seen == [("GET", "/catalog.json"), ("GET", "/s2a/s2a.json")]


@pytest.mark.parametrize("target, scope", [("http://169.254.169.254/latest/meta-data/a.tif", "link-local"),
                                           ("http://10.20.30.40/a.tif", "private")])
def test_a_loopback_catalogue_may_not_reach_other_networks(target, scope, scene, refused, tmp_path):
    """The metadata service of a cloud VM and the office network are out of reach even for a
    catalogue on this machine: nothing is fetched from them (the refusal comes before GDAL)."""
    served = tmp_path / "served"
    write_catalog(served, {"s2a": "verbatim:" + target}, scene)
    with serve(served) as (base, _seen):
        line = refused(f"{base}/catalog.json", keep=tmp_path)
    address = target.split("/")[2]
    assert line == (f"STAC item s2a in {base}/catalog.json, asset data: {target} is on {address}, a {scope} address, "
                    f"and its catalogue {base}/s2a/s2a.json is not: a remote catalogue may not reach this machine or "
                    "its network; download the catalogue and the files it lists and give the local copy if you trust "
                    "them")


def test_a_catalogue_on_the_network_may_not_reach_this_machine(scene, refused, tmp_path):
    """A catalogue served from another address (this machine's network interface, standing for a
    server on the network) pointing at 127.0.0.1: neither its asset nor a redirect of its links is
    fetched from the loopback server."""
    host = network_address()
    if host is None:
        pytest.skip("this machine has no IPv4 address besides loopback")
    internal = tmp_path / "internal"
    shutil.copytree(scene.parent, internal)
    with serve(internal) as (inside, inside_seen), serve(tmp_path / "public", host) as (outside, _seen):
        write_catalog(tmp_path / "public", {"s2a": f"verbatim:{inside}/a.tif"}, scene)
        line = refused(f"{outside}/catalog.json", keep=tmp_path / "public")
        assert line == (f"STAC item s2a in {outside}/catalog.json, asset data: {inside}/a.tif is on 127.0.0.1, a "
                        f"loopback address, and its catalogue {outside}/s2a/s2a.json is not: a remote catalogue may "
                        "not reach this machine or its network; download the catalogue and the files it lists and "
                        "give the local copy if you trust them")
        # a link answered with a redirect to the loopback server is refused the same way
        (tmp_path / "public" / "catalog.json").write_text(json.dumps({
            "type": "Catalog", "stac_version": "1.0.0", "id": "c", "description": "d",
            "links": [{"rel": "child", "href": f"/go/{inside}/catalog.json"}]}))
        line = refused(f"{outside}/catalog.json", keep=tmp_path / "public")
        assert line == (f"{inside}/catalog.json is on 127.0.0.1, a loopback address, and its catalogue "
                        f"{outside}/go/{inside}/catalog.json is not: a remote catalogue may not reach this machine or "
                        "its network; download the catalogue and the files it lists and give the local copy if you "
                        "trust them")
    assert inside_seen == []


# --- item 13: a batch into its own input folder -------------------------------------------------------
def test_a_batch_into_its_input_folder_resumes_instead_of_mapping_its_maps(untrained_path, tmp_path):
    """``batch 'scenes/*.tif' --out-dir scenes`` run twice: the second run finds its own map, leaves
    it out of the inputs (saying so) and has nothing to do; before, it took a_probability.tif for a
    scene and failed it three times with BandError (exit 1)."""
    folder = tmp_path / "scenes"
    write_s2(folder / "a.tif", 128, 128, seed=5)
    first = cli_process("batch", folder / "*.tif", "--out-dir", folder, "--model", untrained_path, *FAST, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    made = tree_digest(folder)
    assert {"a.tif", "a_probability.tif", "batch_summary.csv", "batch_manifest.json"} <= set(made)
    t0 = time.monotonic()
    again = cli_process("batch", folder / "*.tif", "--out-dir", folder, "--model", untrained_path, *FAST, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"input {folder}/*.tif: left out 1 file(s) a batch wrote (a_probability.tif)" in again.stderr
    assert f"nothing to do: all 1 scenes are up to date in {folder}" in again.stderr
    assert "Dask" not in again.stderr and "BandError" not in again.stderr
    after = tree_digest(folder)
    assert {k: v for k, v in after.items() if not k.startswith(("batch_", ".menet-batch"))} == \
        {k: v for k, v in made.items() if not k.startswith(("batch_", ".menet-batch"))}
    print(f"rerun into its own input folder: {time.monotonic() - t0:.1f} s")
    # a batch's map listed by name is refused, and found by a glob elsewhere it is left out
    from menet_qgis.batch.inputs import BatchInputError, collect_scenes
    with pytest.raises(BatchInputError) as err:
        collect_scenes([str(folder / "a_probability.tif")], tmp_path / "vrt")
    assert str(err.value) == (f"{folder}/a_probability.tif (listed in command line) is a probability map a batch "
                              "wrote (it carries MENET_RESULT_KEY), not a Sentinel-2 scene")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(folder, elsewhere)
    said = []
    found = collect_scenes([str(elsewhere / "**" / "*.tif")], tmp_path / "vrt", out_dir=tmp_path / "new_out",
                           log=said.append)
    assert [s.name for s in found] == ["a"] and said == [
        f"input {elsewhere}/**/*.tif: left out 1 file(s) a batch wrote (a_probability.tif)"]


@pytest.mark.parametrize("target, allowed", [
    ("http://93.184.216.35/b02.tif", True),                    # another public host
    ("b02.tif", True),                                         # relative: the same server
    ("/other/b02.tif", True),                                  # host-relative: the same server
    ("http://127.0.0.1:8080/b02.tif", False),
    ("http://localhost/b02.tif", False),                       # a name: every address it resolves to counts
    ("http://[::1]/b02.tif", False),
    ("http://[::ffff:127.0.0.1]/b02.tif", False),              # IPv4-mapped IPv6
    ("http://0.0.0.0:8000/b02.tif", False),                    # reaches this machine on Linux
    ("http://2130706433/b02.tif", False),                      # 127.0.0.1 written as one number
    ("http://169.254.169.254/latest/meta-data/", False),
    ("http://192.168.1.10/b02.tif", False),
    ("//127.0.0.1/b02.tif", False),                            # scheme-relative
    ("file:///etc/passwd", False),
    ("/vsicurl/http://127.0.0.1/b02.tif", True),               # a path on the public server, not a GDAL name
])
def test_what_a_public_catalogue_may_point_at(target, allowed):
    """The resolver on its own, for a catalogue on a public address (nothing is fetched)."""
    from menet_qgis.batch.inputs import UnsafeHrefError, resolve_href
    document = "https://93.184.216.34/stac/item.json"
    if allowed:
        assert resolve_href(target, document).startswith("http")
    else:
        with pytest.raises(UnsafeHrefError):
            resolve_href(target, document)


# --- bounded fuzzing of the resolver ------------------------------------------------------------------
LOCAL_PIECES = ["..", ".", "/", "a.tif", "data", "file:", "file://", "localhost", "//", "%2e%2e", "%2F", "~",
                "/vsicurl/", "/vsizip/", "GTIFF_DIR:", "NETCDF:", "\\", "?", "#", " ", "\x00", "é", "s3://b/k.tif",
                "http://127.0.0.1/", "link"]
REMOTE_PATH_PIECES = ["..", ".", "/", "a.tif", "%2e%2e", "file:", "file:///etc/passwd", "s3://b/k.tif", "?", "#",
                      "\\", " ", "\x00", "[", "]", "é", "@", ":8080", "/vsicurl/"]
#: hosts are address literals only, so the fuzz never looks a name up in DNS
REMOTE_HOSTS = ["127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "169.254.169.254", "10.0.0.1", "93.184.216.35", "0.0.0.0",
                "2130706433", "93.184.216.35@127.0.0.1", "[fd00::1]", "100.64.0.1", "224.0.0.1"]


def _fuzz(hrefs, check):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=1500, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(hrefs)
    def run(href):
        check(href)
    run()


def _joined(pieces):
    from hypothesis import strategies as st
    return st.lists(st.sampled_from(pieces), min_size=1, max_size=8).map("".join)


def test_fuzzed_local_hrefs_land_inside_the_folder_or_are_refused(tmp_path):
    """Seeded and bounded (1,500 hrefs built from traversal, URL and GDAL pieces, a symlink out of the
    folder among them): every answer is a refusal in one line, a URL of an allowed scheme, or a real
    path inside the catalogue's folder; never another exception."""
    pytest.importorskip("hypothesis")
    from menet_qgis.batch.inputs import UnsafeHrefError, resolve_href
    folder = tmp_path / "catalogue"
    (folder / "data").mkdir(parents=True)
    os.symlink("/etc", folder / "link")
    document = str(folder / "catalog.json")

    def check(href):
        try:
            target = resolve_href(href, document)
        except UnsafeHrefError as exc:
            assert "\n" not in str(exc)
            return
        if re.match(r"^(https?|s3|gs)://", target, re.I):
            return
        assert os.path.commonpath([target, str(folder)]) == str(folder) and not target.startswith("/vsi"), target
    _fuzz(_joined(LOCAL_PIECES), check)


def test_fuzzed_remote_hrefs_stay_public_and_http(tmp_path):
    """The same for hrefs in a catalogue on a public address: only http(s) URLs on public hosts come out."""
    pytest.importorskip("hypothesis")
    from urllib.parse import urlsplit

    from menet_qgis.batch.inputs import UnsafeHrefError, address_scope, resolve_href
    document = "https://93.184.216.34/stac/items/item.json"

    def check(href):
        try:
            target = resolve_href(href, document)
        except UnsafeHrefError as exc:
            assert "\n" not in str(exc)
            return
        parts = urlsplit(target)
        assert parts.scheme in ("http", "https"), target
        assert address_scope(parts.hostname) == "public", target
    from hypothesis import strategies as st
    absolute = st.tuples(st.sampled_from(["http://", "https://", "//", "ftp://", "file://"]),
                         st.sampled_from(REMOTE_HOSTS), _joined(REMOTE_PATH_PIECES)).map("".join)
    _fuzz(st.one_of(_joined(REMOTE_PATH_PIECES), absolute), check)
