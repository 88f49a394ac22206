"""A real QGIS desktop window (under Xvfb) runs "Extract mangroves" from its dialog's Run button,
then what a user does next: a second Extract, a raster added, a batch of two rows.

Offscreen QGIS (pytest-qgis, qgis_process) never loads what a desktop session
loads — Mesa's GL stack with its own LLVM, for one — so only a real window
shows whether clicking Run keeps QGIS alive.  The plugin is installed from
the packaged ZIP through QGIS's own installer into a throwaway profile; the
driver (tests/gui/drive_extract.py) runs inside QGIS and writes a result JSON,
screenshots (build/gui/ by default) and a faulthandler traceback if QGIS dies.
QGIS gets this Python's site-packages on PYTHONPATH and its bin/ first on
PATH, as a user who installed PyTorch for QGIS's Python has.  The scene is a
crop of ../shared/data/jambeli/scene_2020.tif, or a synthetic georeferenced
raster where that is missing.  The test skips only without ``qgis`` or Xvfb.

Environment (all optional, for CI chroots and other QGIS versions):
``MENET_GUI_QGIS`` qgis executable (default ``qgis`` on PATH);
``MENET_GUI_DISPLAY`` an X display to use instead of starting ``Xvfb``;
``MENET_GUI_XVFB`` the Xvfb executable; ``MENET_GUI_ZIP`` a prebuilt plugin ZIP
(default: built here by the project's packaging); ``MENET_GUI_OUT`` where
screenshots go (default build/gui; the session's files — profile, scene,
output, result.json, faulthandler.txt, qgis.log — in its ``session/``);
``MENET_GUI_TIMEOUT`` seconds for the whole QGIS session (default 600).

The checkout may live under the system temp folder: QGIS counts layers of files
there as temporary and asks before closing them, so the test's profile turns
that question off (app/askToSaveMemoryLayers, a user setting); the driver
records any question QGIS still asks on exit and answers it, and the test fails
with its text.
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import rasterio

from helpers import ROOT, SCENE, crop_scene, release_toolchain, write_s2

DRIVER = Path(__file__).resolve().parent / "gui" / "drive_extract.py"
QGIS = os.environ.get("MENET_GUI_QGIS") or shutil.which("qgis")
XVFB = os.environ.get("MENET_GUI_XVFB") or shutil.which("Xvfb")
DISPLAY = os.environ.get("MENET_GUI_DISPLAY")
OUT = Path(os.environ.get("MENET_GUI_OUT") or ROOT / "build" / "gui")  # screenshots; the session in OUT/session
SESSION_TIMEOUT = float(os.environ.get("MENET_GUI_TIMEOUT", "600"))
STARTUP_TIMEOUT = 90  # seconds until the driver's first sign of life (QGIS up, script running)
EXIT_GRACE = 10  # seconds a process QGIS started may take to end after QGIS exited
MODEL = ROOT / "resources" / "models" / "menet_coasts_v2.pt"
PROFILE = "menet-test"
# Mangrove forest, shrimp ponds and a channel, no no-data; one 256² window keeps the CPU run short.
CROP = dict(row=1664, col=1164, height=256, width=256)

pytestmark = [
    pytest.mark.skipif(not QGIS, reason="no `qgis` executable (Debian package qgis) for the desktop GUI test"),
    pytest.mark.skipif(not (DISPLAY or XVFB), reason="no X display: install Debian's `xvfb` or set MENET_GUI_DISPLAY"),
]


def build_plugin_zip() -> Path:
    """The plugin ZIP exactly as users get it, from the project's own packaging (the one place to change)."""
    if os.environ.get("MENET_GUI_ZIP"):
        return Path(os.environ["MENET_GUI_ZIP"])
    version = next(line.split("=", 1)[1].strip() for line in (ROOT / "metadata.txt").read_text().splitlines()
                   if line.startswith("version="))
    # `make package` writes dist/menet_qgis-<version>.zip; -o: do not re-run `make setup` from inside a test.
    # With another torch than the release's (the Debian CI chroot) the .onnx asset exports to other bytes:
    # the user's path is tested with those, verified by the .sha256 written beside them.
    extra = [] if release_toolchain() else ["PACKAGE_ARGS=--any-asset-hash"]
    done = subprocess.run(["make", "-s", "-o", ".venv/.installed", "package", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"packaging failed:\n{done.stdout}\n{done.stderr}"
    built = ROOT / "dist" / f"menet_qgis-{version}.zip"
    assert built.is_file(), f"packaging did not write {built}"
    return built


@contextmanager
def x_display(log_path: Path):
    """An X display: MENET_GUI_DISPLAY, else a private Xvfb on a free display number, stopped afterwards."""
    if DISPLAY:
        yield DISPLAY
        return
    read_fd, write_fd = os.pipe()
    with open(log_path, "wb") as log:
        # -displayfd: Xvfb picks a free display itself and writes its number once it accepts connections.
        xvfb = subprocess.Popen([XVFB, "-displayfd", str(write_fd), "-screen", "0", "1600x1000x24", "-nolisten",
                                 "tcp"], pass_fds=(write_fd,), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 30)
        number = os.read(read_fd, 32).decode().strip() if ready else ""
        assert number.isdigit(), f"Xvfb did not start within 30 s: {log_path.read_text(errors='replace')}"
        yield f":{number}"
    finally:
        os.close(read_fd)
        xvfb.terminate()
        try:
            xvfb.wait(10)
        except subprocess.TimeoutExpired:
            xvfb.kill()
            xvfb.wait(10)


def gui_environment(display: str, work: Path, config: Path) -> dict:
    """What a desktop user's QGIS sees: an X display, PyTorch importable, nothing of this checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("QT_QPA_PLATFORM", "QGIS_PLUGINPATH", "QGIS_CUSTOM_CONFIG_PATH", "QGIS_OPTIONS_PATH",
                        "QGIS_PREFIX_PATH")}
    runtime = work / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    # The README's install step makes torch importable from QGIS's Python; the test's Python has it.
    site = sysconfig.get_paths()["purelib"]
    env.update(DISPLAY=display, QT_QPA_PLATFORM="xcb", XDG_RUNTIME_DIR=str(runtime),
               MENET_HOME=str(work / "menet_home"), MENET_GUI_CONFIG=str(config),
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), site) if p),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return env


def profile_settings(profiles: Path):
    """A fresh profile that asks nothing at start (no plugin repository check, no news feed) nor on exit
    (askToSaveMemoryLayers: QGIS 3.22's QgisApp::checkMemoryLayers asks about layers whose files lie
    under the temp folder — all of this test's, when the checkout is there)."""
    ini = profiles / "profiles" / PROFILE / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True, exist_ok=True)
    ini.write_text("[app]\nplugin_installer\\checkOnStart=false\nplugin_installer\\allowExperimental=true\n"
                   "askToSaveMemoryLayers=false\n"
                   "[core]\nNewsFeed\\httpsfeedqgisorg\\disabled=true\n"
                   "[qgis]\ncheckVersion=false\nshowTips=false\n")


@pytest.fixture(scope="module")
def gui_run():
    """One QGIS desktop session driven by drive_extract.py; returns what it recorded."""
    work = OUT / "session"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for old in OUT.glob("*.png"):
        old.unlink()
    # The real scene where it is (a CI chroot may lack ../shared): else a synthetic one, still georeferenced.
    scene = (crop_scene(work / "jambeli_crop.tif", **CROP) if SCENE.is_file()
             else write_s2(work / "synthetic_s2.tif", CROP["height"], CROP["width"]))
    plugin_zip = build_plugin_zip()
    profiles = work / "profiles"
    profile_settings(profiles)
    result_path = work / "result.json"
    config = work / "config.json"
    config.write_text(json.dumps({
        "harness_folder": str(DRIVER.parent), "zip": str(plugin_zip), "scene": str(scene),
        "layer_name": "Jambeli 2020 crop" if SCENE.is_file() else "synthetic Sentinel-2",
        "output": str(work / "out" / "probability.tif"), "model": str(MODEL) if MODEL.is_file() else "",
        "stage": 5, "result": str(result_path),
        # Two rows on the same layer (their stage groups share a name), the first with stage layers.
        "batch": [{"output": str(work / "out" / f"batch{row}.tif"), "stages": stages}
                  for row, stages in ((1, [5]), (2, [0]))],
        "shots": str(OUT), "timeout_s": max(30.0, SESSION_TIMEOUT - 120), "session_s": SESSION_TIMEOUT - 30}))
    (work / "out").mkdir()
    command = [QGIS, "--profiles-path", str(profiles), "--profile", PROFILE, "--nologo", "--noversioncheck",
               "--code", str(DRIVER)]
    started = time.monotonic()
    with x_display(work / "xvfb.log") as display, open(work / "qgis.log", "wb") as log:
        qgis = subprocess.Popen(command, env=gui_environment(display, work, config), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        returncode, left_behind = None, {}
        marker = f"MENET_GUI_CONFIG={config}".encode()
        try:
            returncode = wait_for_qgis(qgis, started, result_path)
        finally:
            if returncode is not None:
                left_behind = outliving(qgis.pid, marker, grace_s=EXIT_GRACE)
            try:  # QGIS and anything it started (a worker process, gdb from its crash handler) go with its session
                os.killpg(qgis.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            qgis.wait()
            for pid in descendants(qgis.pid, marker):  # those that left the session
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    recorded = json.loads(result_path.read_text()) if result_path.is_file() else {}
    fault = work / "faulthandler.txt"
    return {"returncode": returncode, "seconds": time.monotonic() - started, "recorded": recorded,
            "left_behind": left_behind,
            "scene": scene, "output": work / "out" / "probability.tif", "work": work,
            "fault": fault.read_text(errors="replace") if fault.is_file() else "",
            "qgis_log": (work / "qgis.log").read_text(errors="replace")}


def wait_for_qgis(qgis, started: float, result_path: Path):
    """QGIS's exit status, or None when it outlived the session, or its driver never started."""
    while True:
        try:
            return qgis.wait(2)
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - started
            if elapsed > SESSION_TIMEOUT or (elapsed > STARTUP_TIMEOUT and not result_path.is_file()):
                return None


def descendants(session: int, marker: bytes) -> dict:
    """Processes QGIS started, by pid: in its session, or (if they left it) carrying this run's environment."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session or marker in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # ended while we looked
    found.pop(os.getpid(), None)
    return found


def outliving(session: int, marker: bytes, grace_s: float) -> dict:
    """Processes QGIS started that still run ``grace_s`` after QGIS exited."""
    deadline = time.monotonic() + grace_s
    while True:
        left = descendants(session, marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def crash_stack(fault: str, lines: int = 45) -> str:
    """The faulthandler dump without importlib's frames, which hide which import crashed."""
    kept = [line for line in fault.splitlines() if "<frozen importlib" not in line]
    end = kept.index("", 2) if "" in kept[2:] else len(kept)  # the first (crashing) thread only
    return "\n".join(kept[:min(end, lines)]) or "(empty)"


def describe(run, full: bool = False) -> str:
    """What went wrong: how QGIS ended, how far the driver got; ``full`` adds the crash stack and QGIS's output."""
    code = run["returncode"]
    if code is None:
        ended = "QGIS hung (killed): the driver never started or the session outlived MENET_GUI_TIMEOUT"
    elif code < 0:  # QGIS's own crash handler turns SIGSEGV into a gdb backtrace + SIGABRT
        died = re.search(r"QGIS died on signal (\d+)", run["qgis_log"])
        first = f" (QGIS died on {signal.Signals(int(died.group(1))).name})" if died else ""
        ended = f"QGIS was killed by {signal.Signals(-code).name}{first}"
    else:
        ended = f"QGIS exited with status {code}"
    steps = run["recorded"].get("steps", ["(no result JSON)"])
    if not full:
        return f"{ended} after {run['seconds']:.0f} s; driver's last step: {steps[-1].strip()}; files: {run['work']}"
    return (f"{ended} after {run['seconds']:.0f} s\ndriver steps:\n  " + "\n  ".join(steps) +
            f"\nfaulthandler (crashing thread first, import machinery left out):\n{crash_stack(run['fault'])}\n"
            f"QGIS output (head):\n{run['qgis_log'][:1500]}\nfiles: {run['work']}")


def test_qgis_survives_clicking_run(gui_run):
    """Clicking Run must never take QGIS down: it exits normally, through File › Exit, at the driver's end,
    without asking anything (wherever the checkout lives: the temp folder's files are "temporary")."""
    assert gui_run["returncode"] == 0, describe(gui_run, full=True)
    assert gui_run["recorded"].get("done"), describe(gui_run, full=True)
    assert not gui_run["recorded"].get("exit_questions"), \
        f"QGIS asked on exit: {gui_run['recorded']['exit_questions']}; temporary layers: " \
        f"{gui_run['recorded'].get('temporary_layers')}"


def test_no_process_outlives_qgis(gui_run):
    """A worker (or anything else QGIS started) ends with QGIS instead of running on, unseen."""
    assert gui_run["returncode"] is not None, describe(gui_run)
    assert gui_run["left_behind"] == {}, f"still running {EXIT_GRACE} s after QGIS exited: {gui_run['left_behind']}"


def test_plugin_installs_from_zip_and_dialog_defaults_to_active_layer(gui_run):
    recorded = gui_run["recorded"]
    assert recorded.get("plugin_active") and recorded.get("provider_loaded"), describe(gui_run)
    installed = gui_run["work"] / "profiles" / "profiles" / PROFILE / "python" / "plugins" / "menet_qgis"
    assert (installed / "metadata.txt").is_file() and not installed.is_symlink(), \
        f"the ZIP was not unpacked into the profile: {installed}"
    assert recorded.get("input_default") == recorded.get("active_layer"), recorded
    assert recorded.get("output_opens_after_run"), recorded.get("parameters")
    assert recorded.get("run_buttons") == 1, describe(gui_run)


def test_run_writes_probability_on_the_input_grid(gui_run):
    recorded = gui_run["recorded"]
    assert recorded.get("finished") and recorded.get("successful"), \
        f"{describe(gui_run)}\ndialog log:\n{recorded.get('dialog_log')}"
    with rasterio.open(gui_run["scene"]) as scene, rasterio.open(gui_run["output"]) as prob:
        assert (prob.width, prob.height, prob.crs, prob.transform) == \
               (scene.width, scene.height, scene.crs, scene.transform)
        assert prob.count == 1 and prob.dtypes[0] == "float32"
        values = prob.read(1)
    assert np.isfinite(values).all(), "the crop has no no-data, so every pixel has a probability"
    assert 0.0 <= values.min() and values.max() <= 1.0
    if SCENE.is_file():
        assert values.std() > 0.01, "a real scene with forest and water gives a varied probability"


def test_probability_layer_is_on_top_and_visible(gui_run):
    tree = gui_run["recorded"].get("layer_tree")
    assert tree, describe(gui_run)
    top = tree[0]
    listing = "\n".join(f"{'  ' * r['depth']}{r['kind']} {r['name']!r} visible={r['visible']}" for r in tree)
    assert top["kind"] == "layer" and Path(top["source"] or "").resolve() == gui_run["output"].resolve(), \
        f"the probability is not the top entry of the layer panel:\n{listing}"
    assert top["visible"], f"the probability layer is hidden:\n{listing}"


def tree_listing(tree) -> str:
    return "\n".join(f"{'  ' * r['depth']}{r['kind']} {r['name']!r} visible={r['visible']} "
                     f"{Path(r['source']).name if r['source'] else ''}" for r in tree)


def stage_groups(tree) -> dict:
    """Each stage group's run id -> (the layer right above the group, the file names in the group)."""
    groups = {}
    for i, row in enumerate(tree):
        if row["kind"] == "group" and row["run"]:
            above = next((r for r in reversed(tree[:i]) if r["depth"] == row["depth"]), None)
            members = []
            for inner in tree[i + 1:]:
                if inner["depth"] <= row["depth"]:
                    break
                members.append(Path(inner["source"]).name)
            groups[row["run"]] = (Path(above["source"]).name if above and above["source"] else None, members)
    return groups


def test_after_a_run_with_stages_the_scene_stays_active_and_nothing_hides(gui_run):
    """After a run with stage layers: the scene is still the active layer and the main window's insertion
    point is not inside the (collapsed, unchecked) stage group, so the next layer does not vanish there."""
    recorded = gui_run["recorded"]
    state, tree = recorded.get("after_run"), recorded.get("layer_tree")
    assert state and tree, describe(gui_run)
    assert state["active_layer"] == recorded["scene_id"], f"active: {state['active_name']}\n{tree_listing(tree)}"
    assert state.get("insertion_group") is None, f"new layers would go into {state['insertion_group']!r}"
    groups = stage_groups(tree)
    assert list(groups.values()) == [("probability.tif", ["probability_stage5.tif"])], tree_listing(tree)
    group = next(r for r in tree if r["kind"] == "group")
    assert not group["expanded"] and not group["checked"], group


def test_second_extract_defaults_to_the_scene(gui_run):
    recorded = gui_run["recorded"]
    assert "second_input_default" in recorded, describe(gui_run)
    assert recorded["second_input_default"] == recorded["scene_id"], \
        f"the second Extract starts on {recorded['second_input_default']}\n{tree_listing(recorded['layer_tree'])}"


def test_a_raster_added_after_the_run_lands_at_the_top_level(gui_run):
    recorded = gui_run["recorded"]
    added = recorded.get("added_layer")
    assert added, describe(gui_run)
    assert added["parent"] is None, \
        f"added inside {added['parent']!r}:\n{tree_listing(recorded['layer_tree_after_add'])}"


def test_batch_rows_each_keep_their_own_stage_group(gui_run):
    """The batch dialog's Run: two rows on the same scene layer, the first with stage5, the second with
    stage0.  Each probability is at the top level with only its own row's stages in the group below it."""
    recorded = gui_run["recorded"]
    tree = recorded.get("layer_tree_after_batch")
    assert tree, f"{describe(gui_run)}\nbatch log:\n{recorded.get('batch_log')}"
    listing = tree_listing(tree)
    for name in ("batch1.tif", "batch2.tif"):
        row = next((r for r in tree if r["source"] and Path(r["source"]).name == name), None)
        assert row is not None and row["depth"] == 0 and row["visible"], f"{name}:\n{listing}"
    groups = sorted(stage_groups(tree).values())
    assert groups == [("batch1.tif", ["batch1_stage5.tif"]), ("batch2.tif", ["batch2_stage0.tif"]),
                      ("probability.tif", ["probability_stage5.tif"])], listing
    state = recorded["after_batch"]
    assert state["active_layer"] == recorded["scene_id"], f"active: {state['active_name']}\n{listing}"
    assert state.get("insertion_group") is None, f"new layers would go into {state['insertion_group']!r}"
    assert recorded.get("heavy_modules_after_batch") == [], recorded.get("heavy_modules_after_batch")


def test_qgis_process_never_imports_torch(gui_run):
    """The engine runs in a worker process: torch's native libraries never meet the ones QGIS has loaded."""
    recorded = gui_run["recorded"]
    assert "heavy_modules" in recorded, describe(gui_run)
    assert recorded["heavy_modules"] == [], f"imported inside QGIS: {recorded['heavy_modules'][:10]}"


def test_no_python_exception(gui_run):
    recorded = gui_run["recorded"]
    assert recorded, describe(gui_run)
    assert not recorded.get("exceptions"), "\n".join(e["text"] for e in recorded["exceptions"])
    python_errors = [m["text"] for m in recorded.get("messages", [])
                     if m["tag"] == "Python error" or (m["tag"] == "Python warning" and "Traceback" in m["text"])]
    assert not python_errors, "\n".join(python_errors)
    assert "Traceback" not in (recorded.get("dialog_log") or ""), recorded.get("dialog_log")


def test_screenshots_written(gui_run):
    shots = gui_run["recorded"].get("screenshots", {})
    for name in ("dialog_parameters.png", "dialog_log.png", "main_window_result.png", "second_dialog.png",
                 "main_window_added.png", "batch_parameters.png", "batch_log.png", "main_window_batch.png",
                 "main_window_batch_groups_open.png"):
        assert shots.get(name) and Path(shots[name]).stat().st_size > 10_000, (name, describe(gui_run))
