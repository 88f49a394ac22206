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
build/wheels/ so only the first run needs the package index.  The map is compared with torch fp32 on the
``.pt`` the asset was exported from (the checkout's engine in this test's Python).  Each writes times (install dependencies,
install model, first map) and sizes (environment, model) to build/user_path/<kind>/result.json and prints
them.  Marked ``user_path`` (``pytest -m user_path`` runs only these, ``-m "not user_path"`` skips them).

Environment (optional): ``MENET_GUI_DISPLAY``/``MENET_GUI_XVFB``/``MENET_GUI_QGIS`` as for
tests/test_desktop_gui.py; ``MENET_USER_PATH_TIMEOUT`` seconds for the desktop session (default 400).
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from helpers import QGIS_PROCESS, ROOT, SCENE, crop_scene, write_s2
from menet_qgis.core.inference.runtimes import file_sha256
from menet_qgis.environment_installer import directory_size
from user_path_support import (BUILD, MODEL_BASE, WheelCacheError, fresh_runtime_dir, model_asset, serve_model,
                               unzip_plugin, user_environment, wheel_folder)

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
    """One line on the terminal (past pytest's capture) with the times and sizes of a fresh profile's first map."""
    seconds, sizes = record["seconds"], record["bytes"]
    clock = lambda key: "?" if seconds.get(key) is None else f"{seconds[key]:.1f} s"  # noqa: E731
    with capsys.disabled():
        print(f"\n[user path, {kind}] {record['machine']}: install dependencies {clock('install_dependencies')}, "
              f"install model {clock('install_model')}, first map {clock('first_map')} (fresh profile to map "
              f"{clock('fresh_profile_to_map')}); environment {sizes.get('environment', 0) / 1e6:.0f} MB, model "
              f"{sizes.get('model', 0) / 1e6:.1f} MB ({record['result_json']})")


#: The checkpoint the asset is exported from; torch fp32 on it is the reference map.
REFERENCE_MODEL = ROOT / "resources" / "models" / f"{MODEL_BASE}.pt"
THRESHOLD_TAG = "MENET_THRESHOLD"  # menet_qgis.core.inference.engine: the model's threshold, stored in every probability
#: How far the map a new user gets may be from torch fp32 on the .pt: the asset stores fp16 weights and the
#: engine may pick bf16/int8 on CPUs that have them; a wrong normalisation or a broken export moves far more.
MAX_CLASS_FLIPS = 0.01
MAX_MEAN_ABS_DIFFERENCE = 0.01


@pytest.fixture(scope="module")
def reference_map() -> Path:
    """The same crop mapped by the checkout's engine in this test's Python: torch fp32 with the .pt."""
    if importlib.util.find_spec("torch") is None or not REFERENCE_MODEL.is_file():
        pytest.skip(f"the reference map needs torch in this Python and {REFERENCE_MODEL}")
    folder = OUT / "reference"
    shutil.rmtree(folder, ignore_errors=True)
    crop = user_scene(folder)
    command = [sys.executable, "-m", "menet_qgis", "predict", "--model", str(REFERENCE_MODEL), "--runtime", "torch",
               "--device", "cpu", "--precision", "fp32", "--quiet", "--out-dir", str(folder), str(crop)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"reference map failed: {' '.join(command)}\n{tail(done.stdout + done.stderr)}"
    return folder / f"{crop.stem}_probability.tif"


def compare_with_reference(output: Path, reference: Path) -> dict:
    """Share of pixels on the other side of the model's threshold, and mean/max |Δp|, against the reference."""
    with rasterio.open(output) as got, rasterio.open(reference) as ref:
        p, q = got.read(1).astype(np.float64), ref.read(1).astype(np.float64)
        threshold = float(ref.tags().get(THRESHOLD_TAG, 0.5))
    difference = np.abs(p - q)
    return {"class_flips": float(((p >= threshold) != (q >= threshold)).mean()), "threshold": threshold,
            "mean_abs_difference": float(difference.mean()), "max_abs_difference": float(difference.max())}


def check_against_reference(output: Path, reference: Path) -> dict:
    found = compare_with_reference(output, reference)
    assert found["class_flips"] <= MAX_CLASS_FLIPS and found["mean_abs_difference"] <= MAX_MEAN_ABS_DIFFERENCE, \
        f"the new user's map differs from torch fp32 on {REFERENCE_MODEL.name}: {found}"
    return found


def test_release_has_a_model_asset_that_runs_without_torch(release):
    """`make package` puts the default model beside the ZIP as ONNX (cpu-light has no torch), with its sha256."""
    asset = release["asset"]
    assert asset is not None, f"`make package` wrote no menet_coasts_v2 model + .sha256 into {release['zip'].parent}"
    assert asset.suffix == ".onnx", \
        f"the model asset is {asset.name}: the cpu-light environment has no PyTorch, so users need the .onnx"
    recorded = asset.with_name(asset.name + ".sha256").read_text().split()[0]
    assert recorded == file_sha256(asset), f"{asset.name}.sha256 does not match {asset.name}"


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
                    "install_model": steps.get("install_model", {}).get("seconds"),
                    "first_map": steps["extract"]["seconds"], "fresh_profile_to_map": total},
        "bytes": {"environment": directory_size(home / "env"),
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
    assert all(headless["served"].values()) and headless["served"], \
        f"Install model did not download {asset.name} and its .sha256 from the server: {headless['served']}"
    installed = headless["installed"]
    assert installed.is_file(), f"{asset.name} is not in the profile's model store {installed.parent}"
    assert file_sha256(installed) == asset.with_name(asset.name + ".sha256").read_text().split()[0]


def test_headless_first_map_with_the_default_model(headless, capsys):
    """Extract mangroves with MODEL empty: the installed model, run by the managed environment's Python."""
    assert headless["steps"]["extract"]["returncode"] == 0, step_failed(headless, "extract")
    log = headless["steps"]["extract"]["output"]
    python, why = engine_python(log)
    managed = headless["home"] / "env" / "bin" / "python"
    assert python == str(managed), f"the engine ran in {python} ({why}), not the managed environment {managed}"
    assert str(headless["installed"]) in log, \
        f"the log does not name the model Install model put in the profile's store ({headless['installed']}):\n" \
        f"{tail(log)}"
    check_probability(headless["scene"], headless["output"])
    print_record(capsys, "headless qgis_process", headless["record"])


def test_headless_map_matches_the_reference(headless, reference_map):
    """The installed asset, run by cpu-light, maps the crop as torch fp32 does with the .pt it came from."""
    assert headless["output"].is_file(), step_failed(headless, "extract")
    found = check_against_reference(headless["output"], reference_map)
    headless["record"]["against_torch_fp32"] = found
    Path(headless["record"]["result_json"]).write_text(json.dumps(headless["record"], indent=1))


# ------------------------------------------------------------------------------------------- desktop
DRIVER = Path(__file__).resolve().parent / "gui" / "drive_user_path.py"
QGIS = os.environ.get("MENET_GUI_QGIS") or shutil.which("qgis")
HAS_DISPLAY = bool(os.environ.get("MENET_GUI_DISPLAY") or os.environ.get("MENET_GUI_XVFB") or shutil.which("Xvfb"))
DESKTOP_TIMEOUT = float(os.environ.get("MENET_USER_PATH_TIMEOUT", "400"))
PROFILE = "new-user"
needs_desktop = pytest.mark.skipif(not QGIS or not HAS_DISPLAY,
                                   reason="needs the `qgis` executable and an X display (Debian qgis, xvfb)")


def new_profile(profiles: Path) -> Path:
    """A fresh profile that asks nothing by itself: no plugin-repository check, news feed or tips at start, and
    no question at exit about layers that live in the system's temporary folder (QGIS asks that of every file
    under /tmp, where a clone of this repository may live; not a question about the plugin)."""
    profile = profiles / "profiles" / PROFILE
    ini = profile / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True, exist_ok=True)
    ini.write_text("[app]\nplugin_installer\\checkOnStart=false\nplugin_installer\\allowExperimental=true\n"
                   "askToSaveMemoryLayers=false\n"
                   "[core]\nNewsFeed\\httpsfeedqgisorg\\disabled=true\n"
                   "[qgis]\ncheckVersion=false\nshowTips=false\n")
    return profile


@pytest.fixture(scope="module")
def desktop(release, wheels):
    """One QGIS desktop session driven by tests/gui/drive_user_path.py; returns what it recorded."""
    from test_desktop_gui import descendants, outliving, x_display
    work = OUT / "desktop"
    shutil.rmtree(work, ignore_errors=True)
    session = work / "session"
    session.mkdir(parents=True)
    profile = new_profile(session / "profiles")
    scene = user_scene(session / "data")
    output = session / "out" / "probability.tif"
    output.parent.mkdir()
    asset = release["asset"]
    result_path, config = session / "result.json", session / "config.json"
    with serve_model(asset) if asset is not None else _no_server() as server:
        config.write_text(json.dumps({
            "harness_folder": str(DRIVER.parent), "zip": str(release["zip"]),
            "variant_index": variant_index(VARIANT), "wheel_folder": str(wheels),
            "model_url": server.url(asset.name) if server else "", "scene": str(scene),
            "layer_name": "Jambeli 2020 crop" if SCENE.is_file() else "synthetic Sentinel-2",
            "output": str(output), "result": str(result_path), "shots": str(work),
            "step_timeout_s": max(60.0, DESKTOP_TIMEOUT - 150), "session_s": DESKTOP_TIMEOUT - 20}))
        command = [QGIS, "--profiles-path", str(session / "profiles"), "--profile", PROFILE, "--nologo",
                   "--noversioncheck", "--code", str(DRIVER)]
        marker = f"USER_PATH_DRIVER_CONFIG={config}".encode()
        started = time.monotonic()
        with x_display(session / "xvfb.log") as display, open(session / "qgis.log", "wb") as log:
            env = user_environment(DISPLAY=display, QT_QPA_PLATFORM="xcb", USER_PATH_DRIVER_CONFIG=str(config),
                                   XDG_RUNTIME_DIR=str(fresh_runtime_dir(session / "runtime")),
                                   XDG_DATA_HOME=str(session / "xdg-data"), XDG_CONFIG_HOME=str(session / "config"),
                                   XDG_CACHE_HOME=str(session / "cache"))
            qgis = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            returncode, left_behind = None, {}
            try:
                try:
                    returncode = qgis.wait(DESKTOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pass
                if returncode is not None:
                    left_behind = outliving(qgis.pid, marker, grace_s=10)
            finally:
                try:  # QGIS and anything it started go with its session
                    os.killpg(qgis.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                qgis.wait()
                for pid in descendants(qgis.pid, marker):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        served = {name: server.fetched(name) for name in (asset.name, asset.name + ".sha256")} if server else {}
    recorded = json.loads(result_path.read_text()) if result_path.is_file() else {}
    home = profile / "menet_qgis"
    installed = home / "models" / asset.name if asset is not None else None
    seconds = recorded.get("seconds", {})
    record = {"machine": machine(), "qgis": "desktop " + (recorded.get("steps") or ["? QGIS ?"])[0].split()[-1],
              "seconds": {"install_dependencies": seconds.get("install_dependencies"),
                          "install_model": seconds.get("install_model"), "first_map": seconds.get("extract"),
                          "fresh_profile_to_map": seconds.get("fresh_profile_to_map"),
                          "qgis_session": time.monotonic() - started},
              "bytes": {"environment": directory_size(home / "env"),
                        "model": installed.stat().st_size if installed and installed.is_file() else 0},
              "asset": str(asset), "served": served, "screenshots": recorded.get("screenshots", {}),
              "result_json": str(work / "result.json")}
    (work / "result.json").write_text(json.dumps(record, indent=1))
    fault = session / "faulthandler.txt"
    return {"returncode": returncode, "recorded": recorded, "record": record, "left_behind": left_behind,
            "work": work, "session": session, "profile": profile, "home": home, "scene": scene, "output": output,
            "asset": asset, "installed": installed, "served": served,
            "fault": fault.read_text(errors="replace") if fault.is_file() else "",
            "qgis_log": (session / "qgis.log").read_text(errors="replace")}


class _no_server:
    """Stands in for the model server when make package wrote no model (the tests then say so)."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def desktop_story(run) -> str:
    """How the session went: QGIS's exit, the driver's steps, exceptions and the end of QGIS's output."""
    code = run["returncode"]
    ended = ("QGIS did not exit (killed): a modal dialog or a hang" if code is None else
             f"QGIS was killed by {signal.Signals(-code).name}" if code < 0 else f"QGIS exited with status {code}")
    recorded = run["recorded"]
    exceptions = "\n".join(e["text"] for e in recorded.get("exceptions", []))
    return (f"{ended}\ndriver steps:\n  " + "\n  ".join(recorded.get("steps", ["(no result JSON)"])) +
            (f"\nexceptions:\n{exceptions}" if exceptions else "") +
            (f"\nfaulthandler:\n{run['fault'][:1500]}" if run["fault"].strip() else "") +
            f"\nQGIS output (tail):\n{tail(run['qgis_log'], 15)}\nfiles: {run['session']}")


def dialog_failed(run, name: str) -> str:
    dialog = run["recorded"].get("dialogs", {}).get(name)
    if dialog is None:
        return f"the {name} dialog never ran\n{desktop_story(run)}"
    return (f"{name}: finished={dialog.get('finished')} ok={dialog.get('ok')} after "
            f"{dialog.get('seconds', float('nan')):.0f} s; dialog log (tail):\n{tail(dialog.get('log') or '', 20)}")


@pytest.mark.gui
@needs_desktop
def test_desktop_exits_cleanly_without_questions(desktop):
    """QGIS exits by File › Exit at the driver's end, nothing asked on the way, nothing left running."""
    assert desktop["returncode"] == 0 and desktop["recorded"].get("done"), desktop_story(desktop)
    prompts = desktop["recorded"].get("modal_dialogs", [])
    assert not prompts, "QGIS showed modal dialogs:\n" + "\n".join(
        f"  {p['title']!r}: {p['text']!r} (after: {p['last_step'].strip()})" for p in prompts)
    assert desktop["left_behind"] == {}, f"still running 10 s after QGIS exited: {desktop['left_behind']}"


@pytest.mark.gui
@needs_desktop
def test_desktop_plugin_from_zip_through_the_installer(desktop):
    recorded = desktop["recorded"]
    assert recorded.get("plugin_active") and recorded.get("provider_loaded"), desktop_story(desktop)
    installed = desktop["profile"] / "python" / "plugins" / "menet_qgis"
    assert (installed / "metadata.txt").is_file() and not installed.is_symlink(), f"not unpacked: {installed}"
    assert not (installed.parent / ".venv").exists(), f"{installed.parent / '.venv'} exists in a fresh profile"


@pytest.mark.gui
@needs_desktop
def test_desktop_installs_cpu_light_offline(desktop):
    dialog = desktop["recorded"].get("dialogs", {}).get("install_dependencies", {})
    assert dialog.get("ok"), dialog_failed(desktop, "install_dependencies")
    env_dir = desktop["home"] / "env"
    record = env_dir / "menet-environment.json"
    assert record.is_file() and json.loads(record.read_text())["variant"] == VARIANT, \
        f"no verified {VARIANT} environment in {env_dir}"
    assert not list(env_dir.glob("lib/python*/site-packages/torch")), "cpu-light installed PyTorch"


@pytest.mark.gui
@needs_desktop
def test_desktop_installs_model_over_loopback(desktop):
    asset = desktop["asset"]
    assert asset is not None, "no model asset in dist/ to serve"
    dialog = desktop["recorded"].get("dialogs", {}).get("install_model", {})
    assert dialog.get("ok"), dialog_failed(desktop, "install_model")
    assert all(desktop["served"].values()) and desktop["served"], \
        f"Install model did not download {asset.name} and its .sha256 from the server: {desktop['served']}"
    installed = desktop["installed"]
    assert installed.is_file() and file_sha256(installed) == \
        asset.with_name(asset.name + ".sha256").read_text().split()[0], f"{installed} missing or not the asset"


@pytest.mark.gui
@needs_desktop
def test_desktop_first_map_on_the_active_layer_with_the_default_model(desktop, capsys):
    recorded = desktop["recorded"]
    dialog = recorded.get("dialogs", {}).get("extract", {})
    scene_layer = recorded.get("scene_layer") or {}
    assert dialog.get("input_default") == scene_layer.get("id"), \
        f"Extract proposed INPUT {dialog.get('input_default_name')!r}, not the active layer {scene_layer}"
    assert not dialog.get("model_default"), f"MODEL was not empty: {dialog.get('model_default')!r}"
    assert dialog.get("ok"), dialog_failed(desktop, "extract")
    python, why = engine_python(dialog.get("log", ""))
    managed = desktop["home"] / "env" / "bin" / "python"
    assert python == str(managed), f"the engine ran in {python} ({why}), not the managed environment {managed}"
    assert str(desktop["installed"]) in dialog.get("log", ""), \
        f"the log does not name the model Install model put in the profile's store ({desktop['installed']})"
    check_probability(desktop["scene"], desktop["output"])
    print_record(capsys, "desktop QGIS", desktop["record"])


@pytest.mark.gui
@needs_desktop
def test_desktop_map_on_top_visible_and_the_next_extract_proposes_the_scene(desktop):
    recorded = desktop["recorded"]
    tree = recorded.get("layer_tree")
    assert tree, desktop_story(desktop)
    listing = "\n".join(f"{'  ' * r['depth']}{r['kind']} {r['name']!r} visible={r['visible']}" for r in tree)
    top = tree[0]
    assert top["kind"] == "layer" and Path(top["source"] or "").resolve() == desktop["output"].resolve(), \
        f"the probability is not the top entry of the layer panel:\n{listing}"
    assert top["visible"], f"the probability layer is hidden:\n{listing}"
    second = recorded.get("dialogs", {}).get("second_extract", {})
    scene_layer = recorded.get("scene_layer") or {}
    assert second.get("input_default") == scene_layer.get("id"), \
        f"the second Extract proposes INPUT {second.get('input_default_name')!r}, not the scene " \
        f"{scene_layer.get('name')!r}; active layer after the run: {recorded.get('active_layer_after_run')}\n{listing}"


@pytest.mark.gui
@needs_desktop
def test_desktop_qgis_imports_no_engine_library_and_raises_nothing(desktop):
    recorded = desktop["recorded"]
    assert "heavy_modules" in recorded, desktop_story(desktop)
    assert recorded["heavy_modules"] == [], f"imported inside QGIS: {recorded['heavy_modules'][:10]}"
    assert not recorded.get("exceptions"), "\n".join(e["text"] for e in recorded["exceptions"])
    errors = [m["text"] for m in recorded.get("messages", [])
              if m["tag"] == "Python error" or (m["tag"] == "Python warning" and "Traceback" in m["text"])]
    assert not errors, "\n".join(errors)


@pytest.mark.gui
@needs_desktop
def test_desktop_screenshot_of_every_step(desktop):
    shots = desktop["recorded"].get("screenshots", {})
    expected = ["plugin_installed", "install_dependencies_parameters", "install_dependencies_log",
                "install_model_parameters", "install_model_log", "extract_parameters", "extract_log",
                "main_window_map", "second_extract_parameters"]
    missing = [n for n in expected if not (shots.get(n) and Path(shots[n]).stat().st_size > 10_000)]
    assert not missing, f"screenshots missing or blank: {missing}\n{desktop_story(desktop)}"


@pytest.mark.gui
@needs_desktop
def test_desktop_map_matches_the_reference(desktop, reference_map):
    assert desktop["output"].is_file(), dialog_failed(desktop, "extract")
    found = check_against_reference(desktop["output"], reference_map)
    desktop["record"]["against_torch_fp32"] = found
    Path(desktop["record"]["result_json"]).write_text(json.dumps(desktop["record"], indent=1))
