"""Drives a real QGIS desktop window on a Sentinel-2 L2A product as a user has it; run with
``qgis --code drive_product.py`` (started by tests/test_desktop_gui_product.py, never imported by pytest).

Inside QGIS's GUI process: the plugin installed from its ZIP with QGIS's own installer; the product's 10 m
subdataset (``SENTINEL2_L2A:.../MTD_MSIL2A.xml:10m:EPSG_...``: four bands, no B11) added with
``iface.addRasterLayer`` as Layer › Add Raster Layer does, made the active layer; "Extract mangroves" opened,
its INPUT left at its default (the active layer), the output and model filled in, Run pressed; then the layer
panel, the dialog's log and screenshots of the main window with the map (clouds as no-data, the quality layer
below it, and once more with the quality layer hidden so the product's own clouds show through the holes).

Config (JSON named by ``MENET_GUI_CONFIG``): ``harness_folder``, ``zip``, ``subdataset``, ``layer_name``,
``output``, ``model``, ``result``, ``shots``, ``timeout_s``, ``session_s``.
"""
import json
import os
import sys

CONFIG = json.load(open(os.environ["MENET_GUI_CONFIG"], encoding="utf-8"))
sys.path.insert(0, CONFIG["harness_folder"])
from harness import (RESULT, answer_modal_dialogs, begin, dialog_log, grab, heavy_modules,  # noqa: E402
                     install_plugin, later, layer_tree, quit_qgis, run_buttons, step, wait_until)
sys.path.remove(CONFIG["harness_folder"])

from qgis.core import QgsProject  # noqa: E402
from qgis.PyQt.QtCore import QTimer  # noqa: E402
from qgis.PyQt.QtWidgets import QDockWidget  # noqa: E402
from qgis.utils import iface  # noqa: E402


def first_step():
    install_plugin()
    if not RESULT["provider_loaded"]:
        return quit_qgis()
    layer = iface.addRasterLayer(CONFIG["subdataset"], CONFIG["layer_name"])
    RESULT["product_layer"] = {"valid": bool(layer and layer.isValid()), "id": layer.id() if layer else None,
                               "bands": layer.bandCount() if layer else 0, "source": layer.source() if layer else None,
                               "provider": layer.providerType() if layer else None}
    step(f"product layer added: {RESULT['product_layer']}")
    if not RESULT["product_layer"]["valid"]:
        return quit_qgis()
    iface.setActiveLayer(layer)
    iface.mapCanvas().setExtent(layer.extent())
    browser = iface.mainWindow().findChild(QDockWidget, "Browser")
    if browser is not None:  # the map gets the room (as a user closes panels they do not need)
        browser.hide()
    later(1000, lambda: open_dialog(layer))


def open_dialog(layer):
    import processing
    dialog = processing.createAlgorithmDialog("menet:extractmangroves")
    dialog.show()
    value = dialog.mainWidget().wrappers["INPUT"].parameterValue()
    RESULT["input_default"] = value.id() if hasattr(value, "id") else value
    # INPUT stays at its default, the active layer.  RUNTIME 1 = torch: no one-time ONNX export first.
    dialog.setParameters({"OUTPUT": CONFIG["output"], "MODEL": CONFIG["model"],
                          "DEVICE": 2, "RUNTIME": 1})
    RESULT["parameters"] = {k: str(v) for k, v in dialog.createProcessingParameters().items()}
    step("Extract dialog open " + json.dumps(RESULT["parameters"]))
    later(1000, lambda: press_run(dialog))


def press_run(dialog):
    grab(dialog, "product_dialog_parameters.png")
    finished = {}
    dialog.algorithmFinished.connect(lambda ok, results: finished.update(ok=ok, results=results))
    buttons = run_buttons(dialog)
    RESULT["run_buttons"] = len(buttons)
    if len(buttons) != 1:
        step("no unique visible, enabled Run button")
        return quit_qgis()
    step("click Run")
    buttons[0].click()
    wait_until(lambda: "ok" in finished, lambda: after_run(dialog, finished),
               CONFIG["timeout_s"], lambda: after_run(dialog, finished, timed_out=True))


def after_run(dialog, finished, timed_out=False):
    RESULT["finished"] = not timed_out
    RESULT["successful"] = bool(finished.get("ok"))
    RESULT["results"] = {k: str(v) for k, v in (finished.get("results") or {}).items()}
    RESULT["heavy_modules"] = heavy_modules()
    step(f"algorithm finished={not timed_out} ok={finished.get('ok')}")
    later(500, lambda: record_outcome(dialog))


def record_outcome(dialog):
    RESULT["layer_tree"] = layer_tree()
    RESULT["project_layers"] = sorted(layer.source() for layer in QgsProject.instance().mapLayers().values())
    RESULT["dialog_log"] = dialog_log(dialog)
    grab(dialog, "product_dialog_log.png")
    dialog.close()
    canvas = iface.mapCanvas()
    canvas.refreshAllLayers()
    wait_until(lambda: not canvas.isDrawing(), shoot_map, 30, shoot_map)


def shoot_map():
    grab(iface.mainWindow(), "product_map.png")
    step("map screenshot taken")
    # The quality layer hidden: the product's own clouds show through the probability's no-data.
    root = QgsProject.instance().layerTreeRoot()
    quality = [node for node in root.findLayers() if node.layer() and
               os.path.basename(node.layer().source()).endswith("_quality.tif")]
    for node in quality:
        node.setItemVisibilityChecked(False)
    canvas = iface.mapCanvas()
    canvas.refreshAllLayers()
    wait_until(lambda: not canvas.isDrawing(), lambda: later(500, last_shot), 30, lambda: later(500, last_shot))


def last_shot():
    grab(iface.mainWindow(), "product_map_clouds_through.png")
    quit_qgis()


def before_exit():
    QTimer.singleShot(1000, lambda: answer_modal_dialogs("exit_questions"))


begin(CONFIG, first_step, before_exit=before_exit)
