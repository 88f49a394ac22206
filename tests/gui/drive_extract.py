"""Drives a real QGIS desktop window the way a user does; run with ``qgis --code drive_extract.py``.

Started by tests/test_desktop_gui.py (never imported by pytest).  Inside QGIS's
GUI process it installs the plugin from its ZIP with QGIS's own plugin
installer, loads a Sentinel-2 scene as the active layer, opens "Extract
mangroves", fills the output, presses the dialog's Run button and waits —
on QTimers, never a blocking loop — for the algorithm to finish.  Then what
a user does next: a second Extract dialog (its INPUT default), a raster added
(where it lands), and a batch of two rows on the same scene, the first with
stage layers, run from the batch dialog's Run button.  It records what a
user would see (layer trees, active layer, insertion point, output file,
dialog logs, Python exceptions, screenshots) in a JSON file and quits QGIS
through File › Exit.  A crash leaves a faulthandler traceback instead.
What any driver does (the record, waiting, screenshots, exit) is in harness.py.

Everything comes from the JSON file named by ``MENET_GUI_CONFIG``: ``harness_folder``
(this folder), ``zip``, ``scene``, ``layer_name``, ``output``, ``model``, ``stage`` (index),
``batch`` (rows of ``output`` and ``stages``), ``result`` (JSON to write), ``shots``
(PNG folder), ``timeout_s``, ``session_s``.
"""
import json
import os
import sys

CONFIG = json.load(open(os.environ["MENET_GUI_CONFIG"], encoding="utf-8"))
# `qgis --code` runs this file with neither its folder on sys.path nor __file__: the config names the folder.
sys.path.insert(0, CONFIG["harness_folder"])
from harness import (RESULT, add_scene, answer_modal_dialogs, begin, dialog_log, grab, heavy_modules,  # noqa: E402
                     install_plugin, later, layer_tree, quit_qgis, run_buttons, show_toolbox, step, wait_until)
sys.path.remove(CONFIG["harness_folder"])

from qgis.core import QgsApplication, QgsLayerTree, QgsProject  # noqa: E402
from qgis.PyQt.QtCore import QTimer  # noqa: E402
from qgis.PyQt.QtWidgets import QDockWidget  # noqa: E402
from qgis.utils import iface  # noqa: E402

RESULT["libraries"] = {}


def loaded_libraries():
    """Native libraries of interest mapped into this process (Mesa's LLVM, triton, torch)."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
        paths = {line.split()[-1] for line in fh if "/" in line}
    wanted = ("libLLVM", "libtriton", "libtorch", "libGL", "swrast", "libgallium")
    return sorted(p for p in paths if any(w in os.path.basename(p) for w in wanted))


# ---------------------------------------------------------------------------------------------- steps
def first_step():
    RESULT["libraries"]["start"] = loaded_libraries()
    install_plugin()
    if not RESULT["provider_loaded"]:
        return quit_qgis()
    show_toolbox("mangroves")
    layer = add_scene()
    RESULT["scene_id"] = layer.id()
    open_dialog(layer)


def open_dialog(layer):
    import processing
    dialog = processing.createAlgorithmDialog("menet:extractmangroves")
    RESULT["dialog_size"] = [dialog.width(), dialog.height()]
    dialog.show()
    RESULT["dialog_size_shown"] = [dialog.width(), dialog.height()]
    panel = dialog.mainWidget()
    value = panel.wrappers["INPUT"].parameterValue()
    RESULT["input_default"] = value.id() if hasattr(value, "id") else value
    RESULT["active_layer"] = layer.id()
    # MODEL is given explicitly: the checkout's model works whether or not the ZIP ships one.
    # RUNTIME 1 = torch: the library that crashed QGIS when imported in its own process, now in the
    # engine's; it also skips the one-time ONNX export the automatic CPU runtime would start with.
    dialog.setParameters({"OUTPUT": CONFIG["output"], "STAGES": [CONFIG["stage"]], "MODEL": CONFIG["model"],
                          "DEVICE": 2, "RUNTIME": 1})
    parameters = dialog.createProcessingParameters()
    RESULT["parameters"] = {k: str(v) for k, v in parameters.items()}
    output = parameters.get("OUTPUT")
    RESULT["output_opens_after_run"] = getattr(output, "destinationProject", None) is not None
    step("dialog open " + json.dumps(RESULT["parameters"]))
    later(1000, lambda: press_run(dialog))


def press_run(dialog):
    grab(dialog, "dialog_parameters.png")
    grab(iface.mainWindow(), "main_window_before.png")
    finished = {}
    dialog.algorithmFinished.connect(lambda ok, results: finished.update(ok=ok, results=results))
    buttons = run_buttons(dialog)
    RESULT["run_buttons"] = len(buttons)
    if len(buttons) != 1:
        step("no unique visible, enabled Run button")
        return quit_qgis()
    RESULT["run_button_text"] = buttons[0].text()
    RESULT["libraries"]["before_run"] = loaded_libraries()
    step("click Run")
    buttons[0].click()
    wait_until(lambda: "ok" in finished, lambda: after_run(dialog, finished),
               CONFIG["timeout_s"], lambda: after_run(dialog, finished, timed_out=True))


def after_run(dialog, finished, timed_out=False):
    RESULT["finished"] = not timed_out
    RESULT["heavy_modules"] = heavy_modules()
    RESULT["successful"] = bool(finished.get("ok"))
    RESULT["results"] = {k: str(v) for k, v in (finished.get("results") or {}).items()}
    RESULT["libraries"]["after_run"] = loaded_libraries()
    step(f"algorithm finished={not timed_out} ok={finished.get('ok')}")
    # Layers are loaded and post-processed before algorithmFinished; give the canvas a moment to render.
    later(500, lambda: record_outcome(dialog))


def desktop_state():
    """What the next user action starts from: the active layer and where the main window puts a new
    layer (its insertion point: a group, None for the top level, and a position in it)."""
    active = iface.activeLayer()
    state = {"active_layer": active.id() if active else None, "active_name": active.name() if active else None}
    if hasattr(iface, "layerTreeInsertionPoint"):
        point = iface.layerTreeInsertionPoint()
        state["insertion_group"] = None if point.group.parent() is None else point.group.name()
        state["insertion_position"] = point.position
    return state


def record_outcome(dialog):
    RESULT["layer_tree"] = layer_tree()
    RESULT["after_run"] = desktop_state()
    RESULT["dialog_log"] = dialog_log(dialog)
    canvas = iface.mapCanvas()
    canvas.refreshAllLayers()
    wait_until(lambda: not canvas.isDrawing(), lambda: screenshots(dialog), 30, lambda: screenshots(dialog))


def screenshots(dialog):
    grab(dialog, "dialog_log.png")
    dialog.close()
    grab(iface.mainWindow(), "main_window_result.png")
    step("screenshots taken")
    later(500, second_dialog)


def second_dialog():
    """Processing › Extract mangroves again: which layer does INPUT start on?"""
    import processing
    dialog = processing.createAlgorithmDialog("menet:extractmangroves")
    dialog.show()
    value = dialog.mainWidget().wrappers["INPUT"].parameterValue()
    RESULT["second_input_default"] = value.id() if hasattr(value, "id") else value
    step(f"second Extract dialog: INPUT {RESULT['second_input_default']}")
    later(1000, lambda: (grab(dialog, "second_dialog.png"), dialog.close(), add_raster()))


def add_raster():
    """Layer › Add Raster Layer after the run: where does the new layer land?"""
    layer = iface.addRasterLayer(CONFIG["scene"], "added after run")
    node = QgsProject.instance().layerTreeRoot().findLayer(layer.id())
    parent = node.parent()
    RESULT["added_layer"] = {"id": layer.id(), "position": parent.children().index(node),
                             "parent": None if parent.parent() is None else parent.name()}
    RESULT["layer_tree_after_add"] = layer_tree()
    step(f"raster added: {RESULT['added_layer']}")
    later(1000, lambda: (grab(iface.mainWindow(), "main_window_added.png"), open_batch()))


def row_parameters(panel, row, context) -> dict:
    """A batch row's parameters as the dialog will run them (newer QGIS, e.g. 3.40, takes the context too;
    3.22 has parametersForRow(row, destinationProject=None, warnOnInvalid=True))."""
    import inspect
    if "context" in inspect.signature(panel.parametersForRow).parameters:
        return panel.parametersForRow(row, context, warnOnInvalid=False)[0]
    return panel.parametersForRow(row, warnOnInvalid=False)[0]


def open_batch():
    """The toolbox's "Execute as Batch Process…": rows on the same scene, the first with stage layers."""
    from processing.gui.BatchAlgorithmDialog import BatchAlgorithmDialog
    from processing.tools import dataobjects
    alg = QgsApplication.processingRegistry().algorithmById("menet:extractmangroves")
    dialog = BatchAlgorithmDialog(alg.create(), parent=iface.mainWindow())
    dialog.show()
    panel = dialog.mainWidget()
    rows = CONFIG["batch"]
    panel.addRow(len(rows) - panel.batchRowCount())
    context = dataobjects.createContext()
    for row, spec in enumerate(rows):
        values = {"INPUT": RESULT["scene_id"], "MODEL": CONFIG["model"], "STAGES": spec["stages"],
                  "DEVICE": 2, "RUNTIME": 1}
        for name, value in values.items():
            panel.wrappers[row][panel.parameter_to_column[name]].setParameterValue(value, context)
        panel.tblParameters.cellWidget(row + 1, panel.parameter_to_column["OUTPUT"]).setValue(spec["output"])
    RESULT["batch_loads_layers_by_default"] = panel.checkLoadLayersOnCompletion.isChecked()
    panel.checkLoadLayersOnCompletion.setChecked(True)  # "Load layers on completion": the maps, please
    RESULT["batch_rows"] = [{k: str(v) for k, v in row_parameters(panel, row, context).items()}
                            for row in range(panel.batchRowCount())]
    step(f"batch dialog: {len(rows)} rows")
    later(1000, lambda: run_batch(dialog))


def run_batch(dialog):
    grab(dialog, "batch_parameters.png")
    buttons = run_buttons(dialog)
    if len(buttons) != 1:
        step("batch: no unique visible, enabled Run button")
        return quit_qgis()
    step("batch: click Run")
    buttons[0].click()  # 3.22 runs the rows right here, on the main thread; 3.40 starts them as a task
    wait_until(lambda: "Batch execution completed" in (dialog_log(dialog) or ""), lambda: after_batch(dialog), 300,
               lambda: (step("batch: no 'Batch execution completed' in the log after 300 s"), after_batch(dialog)))


def after_batch(dialog):
    RESULT["batch_log"] = dialog_log(dialog)
    RESULT["layer_tree_after_batch"] = layer_tree()
    RESULT["after_batch"] = desktop_state()
    RESULT["heavy_modules_after_batch"] = heavy_modules()
    step("batch finished")
    canvas = iface.mapCanvas()
    canvas.refreshAllLayers()
    wait_until(lambda: not canvas.isDrawing(), lambda: batch_screenshots(dialog), 30,
               lambda: batch_screenshots(dialog))


def batch_screenshots(dialog):
    grab(dialog, "batch_log.png")
    dialog.close()
    grab(iface.mainWindow(), "main_window_batch.png")
    # After the tree was recorded: every stage group opened, legends folded and the Browser panel
    # hidden, so the whole layer panel shows which stages each group holds.
    for node in QgsProject.instance().layerTreeRoot().findLayers():
        node.setExpanded(False)
    for node in QgsProject.instance().layerTreeRoot().children():
        if QgsLayerTree.isGroup(node):
            node.setExpanded(True)
    browser = iface.mainWindow().findChild(QDockWidget, "Browser")
    if browser is not None:
        browser.hide()
    later(500, lambda: (grab(iface.mainWindow(), "main_window_batch_groups_open.png"), quit_qgis()))


def before_exit():
    """QGIS asks before closing a project with layers it counts as temporary — files under the system temp
    folder, where a checkout may live — unless the profile's app/askToSaveMemoryLayers is false (the test's
    profile sets it, as a user may in Settings › Options › Advanced).  Whatever QGIS still asks is recorded and
    answered, so the test fails with the question instead of hanging until it is killed."""
    RESULT["temporary_layers"] = sorted(layer.name() for layer in QgsProject.instance().mapLayers().values()
                                        if layer.isTemporary())
    QTimer.singleShot(1000, lambda: answer_modal_dialogs("exit_questions"))


begin(CONFIG, first_step, before_exit=before_exit)
