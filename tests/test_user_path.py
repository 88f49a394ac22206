"""A new user's path, end to end, as the README tells it: plugin ZIP → dependencies → model → map.

Nothing of the developer's setup is used: a fresh QGIS profile, no PYTHONPATH, no MENET_* variables, no
plugin path into this checkout, no virtual environment on PATH.  So the engine cannot run from the
checkout's ``.venv`` (which has torch): it must run from the environment *Install ME-Net dependencies*
builds (variant cpu-light, no PyTorch) with the model *Install model* fetched.

- Headless: the README's ``qgis_process`` commands, the plugin unpacked into the profile from its ZIP.
- Desktop: a real QGIS window under Xvfb, the ZIP through QGIS's plugin installer, every step through its
  algorithm dialog and Run button (tests/gui/drive_user_path.py), screenshots of each step.

Shared by both: the plugin ZIP and the model asset from ``make package`` (dist/), the model served with its
``.sha256`` by a loopback HTTP server (127.0.0.1), and the cpu-light wheels from ``pip download``, cached in
build/wheels/ so only the first run needs the package index.  Each writes times (install dependencies,
install model, first map) and sizes (environment, model) to build/user_path/<kind>/result.json and prints
them.  Marked ``user_path`` (``pytest -m user_path`` runs only these, ``-m "not user_path"`` skips them).

Environment (optional): ``MENET_GUI_DISPLAY``/``MENET_GUI_XVFB``/``MENET_GUI_QGIS`` as for
tests/test_desktop_gui.py; ``MENET_USER_PATH_TIMEOUT`` seconds for the desktop session (default 400).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from helpers import QGIS_PROCESS, ROOT, SCENE, crop_scene, write_s2
from user_path_support import (BUILD, DIST, WheelCacheError, directory_bytes, fresh_runtime_dir, model_asset,
                               serve_model, sha256_file, unzip_plugin, user_environment, wheel_folder)

VARIANT = "cpu-light"
# Mangrove forest, shrimp ponds and a channel of the real 2020 scene, no no-data (as the desktop GUI test).
CROP = dict(row=1664, col=1164, height=256, width=256)
OUT = BUILD / "user_path"

pytestmark = [pytest.mark.user_path,
              pytest.mark.skipif(not Path(QGIS_PROCESS).is_file(), reason=f"no {QGIS_PROCESS} (Debian qgis)")]


# ------------------------------------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="module")
def release() -> dict:
    """The plugin ZIP and the model asset, built once by ``make package`` (the one place that builds them)."""
    from test_desktop_gui import build_plugin_zip
    plugin_zip = build_plugin_zip()
    return {"zip": plugin_zip, "asset": model_asset(plugin_zip.parent)}


@pytest.fixture(scope="module")
def wheels() -> Path:
    try:
        return wheel_folder(VARIANT)
    except WheelCacheError as exc:
        pytest.fail(str(exc), pytrace=False)


def variant_index(name: str) -> int:
    """VARIANT is an enum: its index in the installer's list (QGIS 3.22 takes enums by index)."""
    from menet_qgis.environment_installer import VARIANTS
    return VARIANTS.index(name)


def user_scene(folder: Path) -> Path:
    """A real crop of the 2020 Jambelí scene with its georeferencing; a synthetic one where that is missing."""
    folder.mkdir(parents=True, exist_ok=True)
    if SCENE.is_file():
        return crop_scene(folder / "jambeli_2020_crop.tif", **CROP)
    return write_s2(folder / "synthetic_s2.tif", CROP["height"], CROP["width"])


def machine() -> str:
    """CPU model, cores and the vector flags that decide the engine's speed, for the recorded times."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines()  # noqa: E731
                              if line.startswith(key)), "")
    flags = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
             if f in field("flags").split()]
    return f"{field('model name') or platform.processor() or '?'}, {os.cpu_count()} cores ({' '.join(flags)})"


def qgis_version(env) -> str:
    """'3.22.16-Białowieża' from ``qgis_process --version`` (first line 'QGIS <version> ...')."""
    done = subprocess.run([QGIS_PROCESS, "--version"], capture_output=True, text=True, timeout=60, env=env)
    return next((line.split()[1] for line in done.stdout.splitlines() if line.startswith("QGIS ")), "?")


def engine_python(log: str):
    """The Python the worker_client says ran the engine ('ME-Net engine: PYTHON (why), process N')."""
    found = re.findall(r"ME-Net engine: (\S+) \((.*?)\), process", log)
    return found[-1] if found else (None, None)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def check_probability(scene: Path, output: Path) -> np.ndarray:
    """The probability raster: the input's grid, one float band in [0, 1] everywhere (the crop has no no-data)."""
    assert output.is_file(), f"no probability raster at {output}"
    with rasterio.open(scene) as src, rasterio.open(output) as prob:
        assert (prob.width, prob.height, prob.crs, prob.transform) == (src.width, src.height, src.crs,
                                                                      src.transform), \
            f"not on the input grid: {prob.width}x{prob.height} {prob.crs} {prob.transform}"
        assert prob.count == 1 and prob.dtypes[0] == "float32", (prob.count, prob.dtypes)
        values = prob.read(1)
    assert np.isfinite(values).all() and 0.0 <= values.min() and values.max() <= 1.0, \
        f"probability outside [0, 1] or not finite: min {np.nanmin(values)}, max {np.nanmax(values)}"
    if SCENE.is_file():
        assert values.std() > 0.05, f"a crop with forest, ponds and water mapped flat (std {values.std():.3f})"
    return values


def print_record(capsys, kind: str, record: dict) -> None:
    with capsys.disabled():
        seconds, sizes = record["seconds"], record["bytes"]
        print(f"\n[user path, {kind}] {record['machine']}: install dependencies "
              f"{seconds.get('install_dependencies', float('nan')):.1f} s, install model "
              f"{seconds.get('install_model', float('nan')):.1f} s, first map {seconds.get('first_map', float('nan')):.1f} s "
              f"(fresh profile to map {seconds.get('fresh_profile_to_map', float('nan')):.1f} s); environment "
              f"{sizes.get('environment', 0) / 1e6:.0f} MB, model {sizes.get('model', 0) / 1e6:.1f} MB "
              f"({record['result_json']})")


def test_release_has_a_model_asset_that_runs_without_torch(release):
    """`make package` puts the default model beside the ZIP as ONNX (cpu-light has no torch), with its sha256."""
    asset = release["asset"]
    assert asset is not None, f"`make package` wrote no menet_coasts_v2 model + .sha256 into {release['zip'].parent}"
    assert asset.suffix == ".onnx", \
        f"the model asset is {asset.name}: the cpu-light environment has no PyTorch, so users need the .onnx"
    recorded = asset.with_name(asset.name + ".sha256").read_text().split()[0]
    assert recorded == sha256_file(asset), f"{asset.name}.sha256 does not match {asset.name}"


# ------------------------------------------------------------------------------------------- headless
@pytest.fixture(scope="module")
def headless(release, wheels):
    """The README's qgis_process commands in a fresh profile; every step runs even if one before failed."""
    work = OUT / "headless"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    xdg = work / "xdg"
    profile = xdg / "QGIS" / "QGIS3" / "profiles" / "default"
    plugin_dir = unzip_plugin(release["zip"], profile / "python" / "plugins")
    scene = user_scene(work / "data")
    output = work / "out" / "probability.tif"
    output.parent.mkdir()
    env = user_environment(QT_QPA_PLATFORM="offscreen", XDG_DATA_HOME=str(xdg),
                           XDG_CONFIG_HOME=str(work / "config"), XDG_CACHE_HOME=str(work / "cache"),
                           XDG_RUNTIME_DIR=str(fresh_runtime_dir(work / "runtime")))
    steps = {}

    def run(name, args, timeout=600):
        started = time.monotonic()
        try:
            done = subprocess.run([QGIS_PROCESS, *map(str, args)], env=env, capture_output=True, text=True,
                                  timeout=timeout)
            code, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            code, text = None, f"(killed after {timeout} s)\n{exc.stdout or ''}{exc.stderr or ''}"
        steps[name] = {"command": " ".join(["qgis_process.bin", *map(str, args)]), "returncode": code,
                       "seconds": time.monotonic() - started, "output": text}
        (work / f"{name}.log").write_text(f"$ {steps[name]['command']}\nexit {code}\n{text}")

    started = time.monotonic()
    run("enable", ["plugins", "enable", "menet_qgis"], timeout=120)
    run("install_dependencies", ["run", "menet:installdependencies", "--", f"VARIANT={variant_index(VARIANT)}",
                                 f"WHEEL_FOLDER={wheels}"])
    asset, served = release["asset"], {}
    if asset is not None:
        with serve_model(asset) as server:
            run("install_model", ["run", "menet:installmodel", "--", f"SOURCE={server.url(asset.name)}"])
            served = {name: server.fetched(name) for name in (asset.name, asset.name + ".sha256")}
    run("extract", ["run", "menet:extractmangroves", "--", f"INPUT={scene}", f"OUTPUT={output}"])
    total = time.monotonic() - started

    home = profile / "menet_qgis"
    installed = home / "models" / asset.name if asset is not None else None
    record = {
        "machine": machine(), "qgis": qgis_version(env),
        "seconds": {"install_dependencies": steps["install_dependencies"]["seconds"],
                    "install_model": steps.get("install_model", {}).get("seconds", float("nan")),
                    "first_map": steps["extract"]["seconds"], "fresh_profile_to_map": total},
        "bytes": {"environment": directory_bytes(home / "env"),
                  "model": installed.stat().st_size if installed and installed.is_file() else 0},
        "returncodes": {name: step["returncode"] for name, step in steps.items()},
        "asset": str(asset), "served": served, "result_json": str(work / "result.json")}
    (work / "result.json").write_text(json.dumps(record, indent=1))
    return {"steps": steps, "record": record, "work": work, "profile": profile, "home": home,
            "plugin_dir": plugin_dir, "scene": scene, "output": output, "asset": asset, "installed": installed,
            "served": served}


def step_failed(run, name: str) -> str:
    step = run["steps"].get(name)
    if step is None:
        return f"step {name} did not run"
    return f"$ {step['command']}\nexit {step['returncode']} after {step['seconds']:.0f} s:\n{tail(step['output'])}"


def test_headless_plugin_from_zip_enables(headless):
    assert headless["steps"]["enable"]["returncode"] == 0, step_failed(headless, "enable")
    plugin = headless["plugin_dir"]
    assert (plugin / "metadata.txt").is_file() and not plugin.is_symlink(), f"the ZIP was not unpacked: {plugin}"
    # worker_client's candidate '.venv beside the source checkout' must not exist for an installed plugin.
    assert not (plugin.parent / ".venv").exists(), f"{plugin.parent / '.venv'} exists in a fresh profile"


def test_headless_installs_cpu_light_offline(headless):
    """Install ME-Net dependencies, variant cpu-light, from the wheel folder only (no index)."""
    assert headless["steps"]["install_dependencies"]["returncode"] == 0, step_failed(headless, "install_dependencies")
    env_dir = headless["home"] / "env"
    record = env_dir / "menet-environment.json"
    assert record.is_file(), f"no verified environment in {env_dir}:\n{step_failed(headless, 'install_dependencies')}"
    assert json.loads(record.read_text())["variant"] == VARIANT
    assert not list(env_dir.glob("lib/python*/site-packages/torch")), "cpu-light installed PyTorch"


def test_headless_installs_model_over_loopback(headless):
    asset = headless["asset"]
    assert asset is not None, "no model asset in dist/ to serve"
    assert headless["steps"]["install_model"]["returncode"] == 0, step_failed(headless, "install_model")
    assert headless["served"].get(asset.name), f"Install model never downloaded {asset.name}: {headless['served']}"
    installed = headless["installed"]
    assert installed.is_file(), f"{asset.name} is not in the profile's model store {installed.parent}"
    assert sha256_file(installed) == asset.with_name(asset.name + ".sha256").read_text().split()[0]


def test_headless_first_map_with_the_default_model(headless, capsys):
    """Extract mangroves with MODEL empty: the installed model, run by the managed environment's Python."""
    assert headless["steps"]["extract"]["returncode"] == 0, step_failed(headless, "extract")
    log = headless["steps"]["extract"]["output"]
    python, why = engine_python(log)
    managed = headless["home"] / "env" / "bin" / "python"
    assert python == str(managed), f"the engine ran in {python} ({why}), not the managed environment {managed}"
    check_probability(headless["scene"], headless["output"])
    print_record(capsys, "headless qgis_process", headless["record"])
