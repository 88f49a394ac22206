"""Batch mapping on Dask distributed: a LocalCluster over real scene crops with different band
namings, a DN-scaled scene and a STAC item; resume, a worker killed mid-scene, a corrupt scene,
Ctrl-C and re-run; an .onnx model with no torch anywhere, mapping as Extract does.  Two worker
processes × one thread, 128² windows: the whole file stays small."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from helpers import ROOT, SCENE, crop_scene, read

pytestmark = pytest.mark.skipif(not SCENE.is_file(), reason=f"real Sentinel-2 scene not available at {SCENE}")

WINDOW, OVERLAP = 128, 32
OPTIONS = ["--window", WINDOW, "--overlap", OVERLAP, "--batch-size", 4]
CLI_ENGINE = {"window": WINDOW, "overlap": OVERLAP, "batch_size": 4}  # what OPTIONS ask of the engine
# cloud_mask and mask_layer are part of a result's key even at their defaults: maps made before masking existed
# (which may guess under clouds) are redone
ENGINE = {"window": WINDOW, "overlap": OVERLAP, "batch_size": 4, "device": "cpu", "stages": [], "stage_mode": "compact",
          "threads": 0, "cloud_mask": "auto", "mask_layer": None}
H, W = 256, 384
GDAL_NAMES = ["B2, central wavelength 490 nm", "B3, central wavelength 560 nm", "B4, central wavelength 665 nm",
              "B8, central wavelength 842 nm", "B11, central wavelength 1610 nm", "B12, central wavelength 2190 nm"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "menet_qgis", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, **kw)


def rewrite(path, transform_data=None, descriptions=None, tags=None, dtype=None, nodata=None):
    """Rewrite a crop in place with other values, band names, tags or data type (georeferencing kept)."""
    with rasterio.open(path) as src:
        data, profile, desc = src.read(), src.profile, list(src.descriptions)
    if transform_data:
        data = transform_data(data)
    profile.update(dtype=dtype or data.dtype.name, nodata=nodata if dtype else profile["nodata"])
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data.astype(profile["dtype"]))
        for i, d in enumerate(descriptions or desc, 1):
            if d:
                dst.set_band_description(i, d)
        if tags:
            dst.update_tags(**tags)
    return Path(path)


def to_dn(data):
    """Reflectance -> L2A DN of processing baseline 04.00 (offset +1000), 0 = no data."""
    dn = np.where(np.isfinite(data), np.round(np.nan_to_num(data) * 10000) + 1000, 0)
    return np.clip(dn, 0, 65535)


def make_stac_item(folder: Path, row: int, col: int) -> Path:
    """A STAC ItemCollection with one item: six single-band DN COG-like GeoTIFFs, B11/B12 at 20 m,
    asset keys and eo:bands as Earth Search names them, raster:bands scale/offset (-0.1 = DN -1000)."""
    crop = crop_scene(folder / "stac_src.tif", row, col, H, W)
    with rasterio.open(crop) as src:
        data, profile = to_dn(src.read()), src.profile
    os.remove(crop)
    keys = [("blue", "B02"), ("green", "B03"), ("red", "B04"), ("nir", "B08"), ("swir16", "B11"), ("swir22", "B12")]
    assets = {}
    for i, (common, name) in enumerate(keys):
        band = data[i:i + 1].astype("uint16")
        prof = dict(profile, count=1, dtype="uint16", nodata=0)
        if name in ("B11", "B12"):  # 20 m: average 2x2 blocks
            band = band.reshape(1, H // 2, 2, W // 2, 2).mean(axis=(2, 4)).astype("uint16")
            t = profile["transform"]
            prof.update(width=W // 2, height=H // 2, transform=rasterio.Affine(t.a * 2, 0, t.c, 0, t.e * 2, t.f))
        path = folder / "T17MPV_20200115" / f"{name}.tif"
        path.parent.mkdir(exist_ok=True)
        with rasterio.open(path, "w", **prof) as dst:
            dst.write(band)
        assets[common] = {"href": f"T17MPV_20200115/{name}.tif", "type": "image/tiff; application=geotiff",
                          "roles": ["data", "reflectance"], "eo:bands": [{"name": name, "common_name": common}],
                          "raster:bands": [{"nodata": 0, "data_type": "uint16", "scale": 0.0001, "offset": -0.1}]}
    assets["thumbnail"] = {"href": "T17MPV_20200115/B02.tif", "roles": ["thumbnail"]}
    t = profile["transform"]
    bbox = [t.c, t.f + t.e * H, t.c + t.a * W, t.f]
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "S2A_17MPV_20200115_0_L2A",
            "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json",
                                "https://stac-extensions.github.io/raster/v1.1.0/schema.json"],
            "geometry": {"type": "Polygon", "coordinates": [[[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]],
                                                              [bbox[0], bbox[3]], [bbox[0], bbox[1]]]]},
            "bbox": bbox, "properties": {"datetime": "2020-01-15T15:40:00Z", "region": "jambeli"},
            "links": [], "assets": assets}
    path = folder / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Six scenes: a manifest CSV (GEE names, B2… names, GDAL SENTINEL2 names with a date and region,
    unnamed bands in reverse order with a 'bands' column), a DN raster with an offset tag, a STAC item."""
    folder = tmp_path_factory.mktemp("batch_inputs")
    north = crop_scene(folder / "north.tif", 1280, 384, H, W)
    south = rewrite(crop_scene(folder / "south.tif", 1536, 768, H, W), descriptions=["B2", "B3", "B4", "B8", "B11", "B12"])
    east = rewrite(crop_scene(folder / "east.tif", 1792, 1536, H, W), descriptions=GDAL_NAMES)
    edge = crop_scene(folder / "edge.tif", 1280, 0, H, W)  # part no-data
    with rasterio.open(edge) as src:
        data, profile = src.read()[::-1], src.profile
    os.remove(edge)
    with rasterio.open(folder / "edge_unnamed.tif", "w", **profile) as dst:  # bands B12…B2, no descriptions
        dst.write(data)
    shutil.copy(north, folder / "north_dn.tif")
    rewrite(folder / "north_dn.tif", to_dn, dtype="uint16", nodata=0, tags={"BOA_ADD_OFFSET": "-1000"})
    manifest = folder / "scenes.csv"
    manifest.write_text("path,date,region,bands\nnorth.tif,,,\nsouth.tif,2020-03-01,jambeli,\n"
                        "east.tif,2020-03-01,jambeli,\nedge_unnamed.tif,,,\"6,5,4,3,2,1\"\n")
    stac = make_stac_item(folder, 2048, 1152)
    return {"folder": folder, "manifest": manifest, "stac": stac, "dn": folder / "north_dn.tif"}


def summary(out_dir) -> dict:
    with open(Path(out_dir) / "batch_summary.csv", newline="") as fh:
        return {row["scene"]: row for row in csv.DictReader(fh)}


def partial_files(out_dir):
    return [p for p in Path(out_dir).rglob("*") if "partial" in p.name or p.parent.name == "staging"]


@pytest.fixture(scope="module")
def clean_run(inputs, untrained_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch_out")
    proc = cli("batch", inputs["manifest"], inputs["dn"], inputs["stac"], "--out-dir", out, "--model", untrained_path,
               "--workers", 2, *OPTIONS)
    return out, proc


def test_local_cluster_maps_every_scene(clean_run, inputs, untrained_path):
    out, proc = clean_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = summary(out)
    names = ["north", "south", "east", "edge_unnamed", "north_dn", "S2A_17MPV_20200115_0_L2A"]
    assert sorted(rows) == sorted(names)
    from menet_qgis.core.files import file_sha256
    sha = file_sha256(untrained_path)
    for name in names:
        row = rows[name]
        assert (row["status"], row["attempts"], row["model_sha256"]) == ("ok", "1", sha), row
        assert row["worker"].startswith("tcp://127.0.0.1:")
        assert f"scene {name}: ok in " in proc.stderr  # one log line per scene
        with rasterio.open(out / f"{name}_probability.tif") as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            prob = ds.read(1)
            assert (ds.width, ds.height, ds.crs.to_epsg()) == (W, H, 32717)
            assert ds.tags()["MENET_MODEL_SHA256"] == sha
        ok = np.isfinite(prob)
        assert ok.any() and ((prob[ok] >= 0) & (prob[ok] <= 1)).all()
        assert float(row["mangrove_ha"]) == pytest.approx((prob[ok] >= 0.5).sum() * 0.01, abs=1e-6)
    assert rows["east"]["date"] == "2020-03-01" and rows["east"]["region"] == "jambeli"
    assert rows["S2A_17MPV_20200115_0_L2A"]["date"] == "2020-01-15"
    # georeferencing of each output is its input's
    with rasterio.open(inputs["folder"] / "south.tif") as a, rasterio.open(out / "south_probability.tif") as b:
        assert a.transform == b.transform and a.crs == b.crs
    # no-data stays no-data: the part-empty scene's NaN pixels are NaN in its map
    with rasterio.open(inputs["folder"] / "edge_unnamed.tif") as src:
        empty = ~np.isfinite(src.read()).all(axis=0)
    edge = read(out / "edge_unnamed_probability.tif")[0]
    assert empty.any() and np.isnan(edge[empty]).all() and np.isfinite(edge[~empty]).all()
    # DN with BOA_ADD_OFFSET -1000 gives the same map as the reflectance it came from (up to DN rounding)
    north, north_dn = read(out / "north_probability.tif")[0], read(out / "north_dn_probability.tif")[0]
    assert np.nanmax(np.abs(north - north_dn)) < 0.02
    assert "scenes" in proc.stderr and "windows" in proc.stderr and "Dask: 2 worker(s)" in proc.stderr
    manifest = json.loads((out / "batch_manifest.json").read_text())
    assert manifest["counts"] == {"ok": 6} and manifest["model_sha256"] == sha
    assert any("bands B2=band 6" in line for line in manifest["scenes"][3]["log"])  # the CSV's 'bands' column
    assert not partial_files(out)


class Log:
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)

    def warn(self, message):
        self.lines.append("WARNING: " + message)

    def progress(self, percent):
        pass

    def cancelled(self):
        return False


def extract_in_process(model, src, out, **options):
    """What Extract runs (jobs.extract) in this process with these engine options (the rest default),
    on one thread as a batch worker here runs (the suite's torch thread count is restored afterwards)."""
    import torch
    from menet_qgis import jobs
    threads = torch.get_num_threads()
    log = Log()
    try:
        result = jobs.extract({"input": str(src), "output": str(out), "model": model and str(model),
                               "options": dict(threads=1, **options)}, log)
    finally:
        torch.set_num_threads(threads)
    return result, log.lines


def test_batch_output_is_the_extract_output(clean_run, inputs, untrained_path, tmp_path):
    """One front door: a scene mapped in-process by jobs.extract (what Extract and predict run), with the
    same model and options, equals the batch's COG, and both say the same runtime and precision."""
    out, proc = clean_run
    _, lines = extract_in_process(untrained_path, inputs["folder"] / "south.tif", tmp_path / "solo.tif", **CLI_ENGINE)
    np.testing.assert_allclose(read(tmp_path / "solo.tif"), read(out / "south_probability.tif"), rtol=0, atol=1e-5)
    choice = [line for line in lines if line.startswith(("runtime:", "precision"))]
    assert len(choice) == 2 and all(line in proc.stderr for line in choice), (choice, proc.stderr[-3000:])


def test_tta_gives_the_engines_flip_averaged_map_and_is_a_result_parameter(clean_run, inputs, untrained_path,
                                                                             tmp_path):
    from menet_qgis.batch.runner import BatchOptions, prepare_run
    out, _ = clean_run
    _, todo, _, _ = prepare_run([str(inputs["manifest"])], out, untrained_path,
                                BatchOptions(engine_options=dict(ENGINE, tta=True)))
    assert len(todo) == 4  # maps made without flips are not reused for --tta
    proc = cli("batch", inputs["folder"] / "south.tif", "--out-dir", tmp_path / "flips", "--model",
               untrained_path, "--workers", 1, "--threads", 1, "--tta", *OPTIONS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extract_in_process(untrained_path, inputs["folder"] / "south.tif", tmp_path / "solo.tif", tta=True, **CLI_ENGINE)
    np.testing.assert_allclose(read(tmp_path / "solo.tif"), read(tmp_path / "flips" / "south_probability.tif"),
                               rtol=0, atol=1e-5)
    assert not np.array_equal(read(tmp_path / "solo.tif"), read(out / "south_probability.tif"), equal_nan=True)


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory):
    """Environment in which no process (client or Dask worker: they are spawned, so a flag set in the
    client would not reach them) can import torch: a package named torch that refuses, first on the path."""
    blocker = tmp_path_factory.mktemp("no_torch") / "torch"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('torch blocked for this test')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")]))


def test_batch_maps_an_onnx_model_without_torch_as_extract_does(inputs, bundle, untrained_path, no_torch_env,
                                                                 tmp_path, monkeypatch):
    """Same model store, model loading, runtime and precision choice as Extract: with torch impossible to
    import, a batch with no --model maps with the .onnx installed as the default model (runtime and
    precision chosen and logged with the reason) and with a .pt whose ONNX export is cached; the maps
    are Extract's, with Extract's default overlap; a .pt never exported is refused in one line before
    any cluster starts."""
    from menet_qgis.core.files import file_sha256
    from menet_qgis.cli import build_parser
    from menet_qgis.core.inference import engine
    from menet_qgis.options import DEFAULT_OVERLAP
    from menet_qgis.core.inference.runtimes import ensure_onnx
    from menet_qgis.resources import DEFAULT_MODEL_BASE
    defaults = {name: build_parser().parse_args([name, "in.tif", "--out-dir", "out"]).overlap
                for name in ("predict", "batch")}
    assert defaults == {"predict": DEFAULT_OVERLAP, "batch": DEFAULT_OVERLAP} and \
        engine.EngineOptions().overlap == DEFAULT_OVERLAP
    export = ensure_onnx(bundle, "probability").path  # and the .pt's export is now cached
    home = tmp_path / "home"  # a model store holding the .onnx alone, as the default model
    env = dict(no_torch_env, MENET_HOME=str(home))
    installed = cli("install-model", export, "--sha256", file_sha256(export), "--name", f"{DEFAULT_MODEL_BASE}.onnx",
                    env=env)
    assert installed.returncode == 0, installed.stderr[-3000:]
    scene = inputs["folder"] / "south.tif"
    options = ["--window", WINDOW, "--batch-size", 4, "--workers", 1, "--threads", 1, "--no-progress"]  # no --overlap
    proc = cli("batch", scene, "--out-dir", tmp_path / "onnx", *options, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"default model: {DEFAULT_MODEL_BASE}.onnx installed in {home}" in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"^runtime: (openvino|onnxruntime) \(auto: .+\)$", proc.stderr, re.M), \
        proc.stderr[-3000:]
    assert re.search(r"^precision (fp32|bf16): \S.+$", proc.stderr, re.M), proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "onnx" / "batch_manifest.json").read_text())
    assert manifest["parameters"]["overlap"] == DEFAULT_OVERLAP and manifest["counts"] == {"ok": 1}
    monkeypatch.setenv("MENET_HOME", str(home))  # Extract with MODEL empty, on the same store
    want, lines = extract_in_process(None, scene, tmp_path / "extract.tif", window=WINDOW, batch_size=4)
    assert manifest["model"] == str(home / "models" / f"{DEFAULT_MODEL_BASE}.onnx")
    assert [line for line in lines if line.startswith("precision")][0] in proc.stderr  # Extract's choice, and why
    assert any(line.startswith("model: ") and manifest["model"] in line for line in lines)
    assert manifest["scenes"][0]["windows"] == want["windows"]
    got = read(tmp_path / "onnx" / "south_probability.tif")
    expected = read(want["probability"])
    assert np.array_equal(np.isnan(got), np.isnan(expected)) and np.isfinite(expected).any()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    with rasterio.open(tmp_path / "onnx" / "south_probability.tif") as ds:
        assert ds.tags()[engine.THRESHOLD_TAG] == f"{want['threshold']:g}"  # as Extract's map says it
    # the checkpoint, through the export Extract cached: the same map from another runtime
    proc = cli("batch", scene, "--out-dir", tmp_path / "pt", "--model", untrained_path, "--runtime", "onnxruntime",
               *options, env=no_torch_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runtime: onnxruntime (asked for)" in proc.stderr
    np.testing.assert_allclose(read(tmp_path / "pt" / "south_probability.tif"), expected, rtol=0, atol=1e-4)
    # a checkpoint never exported cannot run without torch: one line, no cluster, nothing written
    fresh = tmp_path / "fresh" / "fresh.pt"
    fresh.parent.mkdir()
    shutil.copy(untrained_path, fresh)
    proc = cli("batch", scene, "--out-dir", tmp_path / "fresh_out", "--model", fresh, *options, env=no_torch_env)
    assert proc.returncode == 2 and proc.stderr.startswith("menet_qgis: error:"), proc.stderr[-3000:]
    assert proc.stderr.strip().count("\n") == 0 and "export" in proc.stderr and "Dask" not in proc.stderr
    assert not list((tmp_path / "fresh_out").glob("*.tif"))


def test_stac_item_becomes_a_band_vrt(clean_run, inputs):
    """The STAC item's six assets (B11/B12 at 20 m) map onto the 10 m grid by their eo:bands names,
    and raster:bands' offset -0.1 becomes the DN offset -1000."""
    out, _ = clean_run
    manifest = json.loads((out / "batch_manifest.json").read_text())
    item = next(s for s in manifest["scenes"] if s["scene"] == "S2A_17MPV_20200115_0_L2A")
    assert any("offset from product metadata" in line and "-1000" in line for line in item["log"]), item["log"]
    with rasterio.open(inputs["folder"] / "T17MPV_20200115" / "B02.tif") as a, \
            rasterio.open(out / "S2A_17MPV_20200115_0_L2A_probability.tif") as b:
        assert (a.transform, a.width, a.height) == (b.transform, b.width, b.height)


def test_stac_static_catalog_gives_the_same_scene(inputs, tmp_path):
    from menet_qgis.batch.inputs import BatchInputError, collect_scenes
    item = json.loads(inputs["stac"].read_text())["features"][0]
    folder = inputs["folder"]
    item_path = folder / "catalog" / item["id"] / f"{item['id']}.json"
    item_path.parent.mkdir(parents=True, exist_ok=True)
    for asset in item["assets"].values():
        asset["href"] = "../../" + asset["href"]
    item["links"] = [{"rel": "root", "href": "../catalog.json"}, {"rel": "parent", "href": "../catalog.json"}]
    item_path.write_text(json.dumps(item))
    catalog = folder / "catalog" / "catalog.json"
    catalog.write_text(json.dumps({"type": "Catalog", "stac_version": "1.0.0", "id": "jambeli", "description": "test",
                                   "links": [{"rel": "root", "href": "./catalog.json"},
                                             {"rel": "item", "href": f"./{item['id']}/{item['id']}.json"}]}))
    # its assets lie beside the catalogue's folder, not in it: refused unless --data-root holds them
    with pytest.raises(BatchInputError, match=r"'\.\./\.\./T17MPV_20200115/B0.\.tif' in .*\.json points outside "):
        collect_scenes([str(catalog)], tmp_path / "refused")
    a = collect_scenes([str(catalog)], tmp_path / "a", data_root=folder)
    b = collect_scenes([str(inputs["stac"])], tmp_path / "b")
    assert [s.name for s in a] == [s.name for s in b] == [item["id"]]
    assert a[0].sources[1:] == b[0].sources[1:]
    assert all(Path(p).is_file() for p in a[0].sources)
    assert Path(a[0].path).read_text() == Path(b[0].path).read_text()


def test_rerun_skips_what_is_done_and_redoes_what_changed(clean_run, inputs, untrained_path, tmp_path):
    out, _ = clean_run
    work = tmp_path / "out"
    shutil.copytree(out, work)
    before = {p.name: p.stat().st_mtime_ns for p in work.glob("*_probability.tif")}
    args = ["batch", inputs["manifest"], inputs["dn"], inputs["stac"], "--out-dir", work, "--model", untrained_path,
            "--workers", 1, *OPTIONS]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r["status"] for r in summary(work).values()} == {"skipped"}
    assert "nothing to do" in proc.stderr and "Dask" not in proc.stderr  # no cluster started
    assert before == {p.name: p.stat().st_mtime_ns for p in work.glob("*_probability.tif")}
    # a performance option does not invalidate results; a result parameter or a changed input does
    from menet_qgis.batch.runner import BatchOptions, prepare_run
    _, todo, _, _ = prepare_run([str(inputs["manifest"])], work, untrained_path,
                                BatchOptions(engine_options=dict(ENGINE, batch_size=8, threads=2)))
    assert todo == []
    _, todo, _, _ = prepare_run([str(inputs["manifest"])], work, untrained_path,
                                BatchOptions(engine_options=dict(ENGINE, overlap=64)))
    assert len(todo) == 4
    rewrite(inputs["folder"] / "east.tif", lambda d: d[:, ::-1].copy())  # a re-downloaded, different east.tif
    try:
        proc = cli(*args)
    finally:
        rewrite(inputs["folder"] / "east.tif", lambda d: d[:, ::-1].copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = summary(work)
    assert rows["east"]["status"] == "ok" and sum(r["status"] == "skipped" for r in rows.values()) == 5
    after = {p.name: p.stat().st_mtime_ns for p in work.glob("*_probability.tif")}
    assert [n for n in before if before[n] != after[n]] == ["east_probability.tif"]
    assert not np.array_equal(read(work / "east_probability.tif"), read(out / "east_probability.tif"), equal_nan=True)


def test_worker_killed_mid_scene(clean_run, inputs, untrained_path, tmp_path):
    """SIGKILL the worker process running a scene: the scene is retried elsewhere, the run completes
    with the same outputs as the undisturbed run, and no partial file remains."""
    from distributed import Client
    from menet_qgis.batch.runner import BatchOptions, embedded_cluster, run_batch
    out, _ = clean_run
    work = tmp_path / "out"
    folder = inputs["folder"]
    scenes = [str(folder / f"{n}.tif") for n in ("north", "south", "east", "north_dn")]
    killed = {}
    with embedded_cluster(2, {}) as cluster, Client(cluster) as client:
        def kill_a_busy_worker():
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not killed:
                for address, keys in client.processing().items():
                    for key in keys:
                        scene = key.split("-")[1]
                        staged = list((work / ".menet-batch" / "staging").glob(f"{scene}.*/*"))
                        if staged:  # the engine has opened its outputs: the scene is mid-way
                            pid = next(n for n in cluster.workers.values() if n.worker_address == address).process.pid
                            # Frozen first, so "not finished yet" is still true when the kill lands
                            # (a small scene can otherwise finish between this check and the kill).
                            os.kill(pid, signal.SIGSTOP)
                            if (work / f"{scene}_probability.tif").exists():
                                os.kill(pid, signal.SIGCONT)
                                continue
                            os.kill(pid, signal.SIGKILL)
                            killed.update(scene=scene, address=address)
                            return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
        killer.start()
        lines = []
        manifest = run_batch(scenes, work, untrained_path,
                             BatchOptions(retries=2, engine_options=ENGINE, progress=False), client=client, log=lines.append)
        killer.join(5)
    assert killed, "no worker was caught mid-scene"
    rows = summary(work)
    assert {r["status"] for r in rows.values()} == {"ok"}
    victim = rows[killed["scene"]]
    assert victim["attempts"] == "2" and f"attempt 1 on {killed['address']}: worker died" in victim["note"]
    assert victim["worker"] != killed["address"]
    assert any(f"scene {killed['scene']}: attempt 1 failed (worker died); retrying" in l for l in lines), lines
    assert manifest.counts() == {"ok": 4}
    for name in ("north", "south", "east", "north_dn"):
        np.testing.assert_array_equal(read(work / f"{name}_probability.tif"), read(out / f"{name}_probability.tif"))
    assert not partial_files(work)


def test_corrupt_scene_fails_after_retries_without_stopping_the_others(inputs, untrained_path, tmp_path):
    good = inputs["folder"] / "south.tif"
    corrupt = crop_scene(tmp_path / "corrupt.tif", 1536, 1920, H, W)
    with open(corrupt, "r+b") as fh:  # the header reads, the pixel strips end half-way
        fh.truncate(os.path.getsize(corrupt) // 2)
    out = tmp_path / "out"
    proc = cli("batch", good, corrupt, "--out-dir", out, "--model", untrained_path, "--workers", 2, "--retries", 1,
               "--no-progress", *OPTIONS)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = summary(out)
    assert rows["south"]["status"] == "ok"
    bad = rows["corrupt"]
    assert bad["status"] == "failed" and bad["attempts"] == "2" and any(text in bad["note"] for text in
                                                                    ("is corrupt or truncated at window",     # GDAL 3.6
                                                                     "is not a raster GDAL can read")), bad  # GDAL 3.10 fails at open
    assert "scene corrupt: FAILED after 2 attempts" in proc.stderr
    assert not (out / "corrupt_probability.tif").exists() and not partial_files(out)


def test_ctrl_c_cancels_cleanly_and_a_rerun_resumes(clean_run, inputs, untrained_path, tmp_path):
    out, _ = clean_run
    work = tmp_path / "out"
    # one torch thread, as in the clean run: other thread counts change the last bits (~1e-6)
    args = ["batch", inputs["manifest"], inputs["dn"], inputs["stac"], "--out-dir", work, "--model", untrained_path,
            "--workers", 1, "--threads", 1, "--no-progress", *OPTIONS]
    # Ctrl-C as in a terminal's foreground: a suite started in the background (`make test &`) runs with
    # SIGINT ignored, which children inherit and Python then keeps ignoring
    proc = subprocess.Popen([sys.executable, "-m", "menet_qgis", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not list(work.glob("*_probability.tif")) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "cancelled" in stderr and "run the same command again to resume" in stderr
    done = sorted(p.name for p in work.glob("*_probability.tif"))
    assert 1 <= len(done) < 6
    assert not partial_files(work)
    statuses = {r["status"] for r in summary(work).values()}
    assert "cancelled" in statuses
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = summary(work)
    assert sorted(f"{n}_probability.tif" for n, r in rows.items() if r["status"] == "skipped") == done
    assert sum(r["status"] == "ok" for r in rows.values()) == 6 - len(done)
    for name in rows:
        np.testing.assert_array_equal(read(work / f"{name}_probability.tif"), read(out / f"{name}_probability.tif"))


def test_the_qgis_plugin_never_imports_dask():
    code = ("import sys, pkgutil, importlib, menet_qgis, menet_qgis.processing, menet_qgis.cli\n"
            "for m in pkgutil.walk_packages(menet_qgis.processing.__path__, 'menet_qgis.processing.'):\n"
            "    importlib.import_module(m.name)\n"
            "import menet_qgis.batch.inputs, menet_qgis.batch.manifest, menet_qgis.batch.scene_task\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, QT_QPA_PLATFORM="offscreen"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_bad_inputs_are_refused_before_anything_runs(inputs, untrained_path, tmp_path):
    from menet_qgis.batch.inputs import BatchInputError, collect_scenes
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(inputs["folder"] / "north.tif", other / "north.tif")
    out = tmp_path / "out"
    proc = cli("batch", inputs["folder"] / "north.tif", other / "north.tif", "--out-dir", out, "--model", untrained_path)
    assert proc.returncode == 2 and proc.stderr.startswith("menet_qgis: error: two scenes would both write "
                                                           "north_probability.tif"), proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and not list(out.glob("*.tif"))
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,date\nnorth.tif,2020-01-01\n")
    with pytest.raises(BatchInputError, match="'path' column"):
        collect_scenes([str(bad_csv)], tmp_path / "vrt")
    with pytest.raises(BatchInputError, match="no file matches"):
        collect_scenes([str(tmp_path / "none" / "*.tif")], tmp_path / "vrt")
    missing = tmp_path / "missing.csv"
    missing.write_text("path\nnot_there.tif\n")
    with pytest.raises(BatchInputError, match="not_there.tif .listed in missing.csv line 2"):
        collect_scenes([str(missing)], tmp_path / "vrt")
