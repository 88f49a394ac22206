"""Drives a new user's first session in a real QGIS window; run with ``qgis --code drive_user_path.py``.

Started by tests/test_user_path.py (never imported by pytest).  In a fresh profile, with nothing of a
developer's setup in the environment, it does what the README tells a new user to do, each algorithm through
its own dialog and Run button:

1. Plugins › Install from ZIP (QGIS's plugin installer) with the plugin ZIP;
2. *Install ME-Net dependencies*, variant cpu-light, WHEEL_FOLDER = a local wheel folder;
3. *Install model*, SOURCE = the model on a loopback HTTP server (its sha256 read from ``<source>.sha256``);
4. adds the Sentinel-2 scene (the active layer) and runs *Extract mangroves* with INPUT and MODEL as the
   dialog proposes them (only OUTPUT is filled in);
5. opens *Extract mangroves* a second time and reads what INPUT proposes;
6. File › Exit.

It waits on QTimers (the event loop keeps running), records what a user sees (dialog logs, layer panel,
active layer, modal dialogs, Python errors, times) in a JSON file, takes a screenshot of every step and quits
QGIS.  A modal dialog nobody expects (an error box, a question at exit) is recorded with its text and
answered so that QGIS never waits for a person.  What any driver does (the record, waiting, screenshots,
answering, exit) is in harness.py.

Everything comes from the JSON file named by ``USER_PATH_DRIVER_CONFIG`` (not a MENET_* variable: a new user
has none): ``harness_folder`` (this folder), ``zip``, ``variant_index``, ``wheel_folder``, ``model_url``,
``scene``, ``layer_name``, ``output``, ``result``, ``shots``, ``step_timeout_s``, ``session_s``.
"""
import json
import os
import sys
import time

CONFIG = json.load(open(os.environ["USER_PATH_DRIVER_CONFIG"], encoding="utf-8"))
# `qgis --code` runs this file with neither its folder on sys.path nor __file__: the config names the folder.
sys.path.insert(0, CONFIG["harness_folder"])
from harness import (RESULT, STARTED, add_scene, answer_modal_dialogs, begin, dialog_log, grab,  # noqa: E402
                     heavy_modules, install_plugin, later, layer_tree, quit_qgis, run_buttons, show_toolbox, step,
                     wait_until)
sys.path.remove(CONFIG["harness_folder"])

from qgis.core import NULL, QgsProject  # noqa: E402
from qgis.PyQt.QtCore import QTimer  # noqa: E402
from qgis.utils import iface  # noqa: E402

RESULT.update(modal_dialogs=[], dialogs={}, seconds={})


def run_in_dialog(name, algorithm, values, then, inspect=None):
    """Open the algorithm's dialog, set ``values`` (the others stay as the dialog proposes them), press Run,
    wait for the end and record the outcome under RESULT['dialogs'][name]; then call ``then()``."""
    import processing
    dialog = processing.createAlgorithmDialog(algorithm)
    dialog.show()
    if values:
        dialog.setParameters(values)
    record = RESULT["dialogs"][name] = {"algorithm": algorithm}
    if inspect:
        inspect(dialog, record)
    record["parameters"] = {k: str(v) for k, v in dialog.createProcessingParameters().items()}
    step(f"{name}: dialog open {json.dumps(record['parameters'])}")
    finished = {}
    dialog.algorithmFinished.connect(lambda ok, results: finished.update(ok=ok, results=results))

    def press():
        grab(dialog, f"{name}_parameters")
        buttons = run_buttons(dialog)
        if len(buttons) != 1:
            step(f"{name}: no unique visible, enabled Run button")
            return quit_qgis()
        started = time.monotonic()
        step(f"{name}: click Run")
        buttons[0].click()

        def done(timed_out=False):
            record.update(finished=not timed_out, ok=bool(finished.get("ok")), seconds=time.monotonic() - started,
                          results={k: str(v) for k, v in (finished.get("results") or {}).items()},
                          log=dialog_log(dialog))
            RESULT["seconds"][name] = record["seconds"]
            step(f"{name}: finished={not timed_out} ok={record['ok']} in {record['seconds']:.1f} s")
            # Layers load before algorithmFinished; give the canvas a moment, then the screenshot.
            later(500, lambda: after(timed_out))

        def after(timed_out):
            grab(dialog, f"{name}_log")
            dialog.close()
            if timed_out or not record["ok"]:
                return quit_qgis()
            then()

        wait_until(lambda: "ok" in finished, done, CONFIG["step_timeout_s"], lambda: done(timed_out=True))

    later(1000, press)


# ---------------------------------------------------------------------------------------------- the steps
def first_step():
    RESULT["seconds"]["install_plugin"] = install_plugin()
    if not RESULT["provider_loaded"]:
        return quit_qgis()
    show_toolbox("ME-Net")
    grab(iface.mainWindow(), "plugin_installed")
    run_in_dialog("install_dependencies", "menet:installdependencies",
                  {"VARIANT": CONFIG["variant_index"], "WHEEL_FOLDER": CONFIG["wheel_folder"]}, install_model)


def install_model():
    run_in_dialog("install_model", "menet:installmodel", {"SOURCE": CONFIG["model_url"]}, load_scene)


def load_scene():
    layer = add_scene()
    RESULT["scene_layer"] = {"id": layer.id(), "name": layer.name()} if layer else None
    run_in_dialog("extract", "menet:extractmangroves", {"OUTPUT": CONFIG["output"]}, after_extract,
                  inspect=proposed_values)


def proposed_values(dialog, record):
    """What the dialog proposes before the user touches it: INPUT (the active layer?) and MODEL (empty?)."""
    wrappers = dialog.mainWidget().wrappers
    value = wrappers["INPUT"].parameterValue()  # a layer id (or a layer, or a path)
    layer = value if hasattr(value, "id") else QgsProject.instance().mapLayer(str(value))
    record["input_default"] = layer.id() if layer else str(value)
    record["input_default_name"] = layer.name() if layer else str(value)
    model = wrappers["MODEL"].parameterValue()
    record["model_default"] = "" if model is None or model == NULL or model == "" else str(model)
    active = iface.activeLayer()
    record["active_layer"] = active.id() if active else None


def after_extract():
    RESULT["seconds"]["fresh_profile_to_map"] = time.monotonic() - STARTED
    RESULT["layer_tree"] = layer_tree()
    active = iface.activeLayer()
    RESULT["active_layer_after_run"] = {"id": active.id(), "name": active.name(), "source": active.source()} \
        if active else None
    RESULT["heavy_modules"] = heavy_modules()
    canvas = iface.mapCanvas()
    canvas.refreshAllLayers()
    wait_until(lambda: not canvas.isDrawing(), second_extract, 30, second_extract)


def second_extract():
    """The next Extract a user opens: INPUT should propose the scene again, not a result or a stage layer."""
    grab(iface.mainWindow(), "main_window_map")
    import processing
    dialog = processing.createAlgorithmDialog("menet:extractmangroves")
    dialog.show()
    record = RESULT["dialogs"]["second_extract"] = {}
    proposed_values(dialog, record)
    step(f"second Extract dialog proposes INPUT={record['input_default_name']!r}")
    later(800, lambda: close_second(dialog))


def close_second(dialog):
    grab(dialog, "second_extract_parameters")
    dialog.close()
    quit_qgis()


def before_exit():
    """What a failed session still tells: the layer panel and the modules QGIS imported by then."""
    RESULT.setdefault("layer_tree", layer_tree())
    RESULT.setdefault("heavy_modules", heavy_modules())


begin(CONFIG, first_step, before_exit=before_exit, numbered_shots=True)
QTimer.singleShot(1000, answer_modal_dialogs)
