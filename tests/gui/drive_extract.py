"""Drives a real QGIS desktop window the way a user does; run with ``qgis --code drive_extract.py``.

Started by tests/test_desktop_gui.py (never imported by pytest).  Inside QGIS's
GUI process it installs the plugin from its ZIP with QGIS's own plugin
installer, loads a Sentinel-2 scene as the active layer, opens "Extract
mangroves", fills the output, presses the dialog's Run button and waits —
on QTimers, never a blocking loop — for the algorithm to finish.  It records
what a user would see (layer tree, output file, dialog log, Python
exceptions, screenshots) in a JSON file and quits QGIS.  A crash leaves a
faulthandler traceback instead.

Everything comes from the JSON file named by ``MENET_GUI_CONFIG``: ``zip``,
``scene``, ``layer_name``, ``output``, ``model``, ``stage`` (index), ``result`` (JSON to write),
``shots`` (PNG folder), ``timeout_s``.
"""
import faulthandler
import json
import os
import sys
import threading
import time
import traceback

CONFIG = json.load(open(os.environ["MENET_GUI_CONFIG"], encoding="utf-8"))
os.makedirs(CONFIG["shots"], exist_ok=True)
# Kept open for the process's life: a segfault in any thread writes every thread's stack here.
FAULT_LOG = open(os.path.join(os.path.dirname(CONFIG["result"]), "faulthandler.txt"), "w")
faulthandler.enable(file=FAULT_LOG, all_threads=True)

from qgis.core import Qgis, QgsApplication, QgsLayerTree, QgsProject  # noqa: E402
from qgis.PyQt.QtCore import QTimer  # noqa: E402
from qgis.PyQt.QtWidgets import QPushButton, QTextEdit  # noqa: E402
from qgis.utils import iface  # noqa: E402

RESULT = {"steps": [], "exceptions": [], "messages": [], "libraries": {}}
STARTED = time.monotonic()
LEVELS = {Qgis.Info: "info", Qgis.Warning: "warning", Qgis.Critical: "critical", Qgis.Success: "success"}


def step(text):
    """Progress marker, flushed to disk at once: if QGIS dies, the JSON says how far it got."""
    RESULT["steps"].append(f"{time.monotonic() - STARTED:7.1f}s {text}")
    save()


def save():
    tmp = CONFIG["result"] + ".part"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(RESULT, fh, indent=1, default=str)
    os.replace(tmp, CONFIG["result"])


def record_exception(kind, exc_type, value, tb):
    RESULT["exceptions"].append({"where": kind, "text": "".join(traceback.format_exception(exc_type, value, tb))})
    save()


_qgis_excepthook = sys.excepthook


def excepthook(exc_type, value, tb):
    record_exception("sys.excepthook", exc_type, value, tb)
    _qgis_excepthook(exc_type, value, tb)  # QGIS's own hook still shows it, as for a user


sys.excepthook = excepthook
threading.excepthook = lambda args: record_exception(
    f"thread {args.thread.name if args.thread else '?'}", args.exc_type, args.exc_value, args.exc_traceback)


def on_message(message, tag, level):
    RESULT["messages"].append({"tag": tag, "level": LEVELS.get(level, str(level)), "text": message})


QgsApplication.messageLog().messageReceived.connect(on_message)


def loaded_libraries():
    """Native libraries of interest mapped into this process (Mesa's LLVM, triton, torch)."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
        paths = {line.split()[-1] for line in fh if "/" in line}
    wanted = ("libLLVM", "libtriton", "libtorch", "libGL", "swrast", "libgallium")
    return sorted(p for p in paths if any(w in os.path.basename(p) for w in wanted))


def grab(widget, name):
    path = os.path.join(CONFIG["shots"], name)
    ok = widget.grab().save(path, "PNG")
    RESULT.setdefault("screenshots", {})[name] = path if ok else None


def wait_until(condition, then, timeout_s, on_timeout, every_ms=250):
    """Poll ``condition`` on a QTimer (the event loop keeps running); call ``then`` or ``on_timeout``."""
    deadline = time.monotonic() + timeout_s

    def poll():
        try:
            if condition():
                then()
            elif time.monotonic() > deadline:
                on_timeout()
            else:
                QTimer.singleShot(every_ms, poll)
        except Exception:  # a failure in the driver itself must still end QGIS
            record_exception("driver", *sys.exc_info())
            quit_qgis()

    QTimer.singleShot(every_ms, poll)


# ---------------------------------------------------------------------------------------------- steps
def install_plugin():
    """Plugins › Manage and Install Plugins › Install from ZIP, through QGIS's own installer."""
    step("install from ZIP " + CONFIG["zip"])
    import pyplugin_installer
    import qgis.utils
    pyplugin_installer.instance().installFromZipFile(CONFIG["zip"])
    RESULT["plugin_active"] = "menet_qgis" in qgis.utils.active_plugins
    # qgis.utils.home_plugin_path is gone in QGIS 3.40: the profile's plugin folder, as the installer uses it
    RESULT["plugin_folder"] = os.path.join(QgsApplication.qgisSettingsDirPath(), "python", "plugins", "menet_qgis")
    provider = QgsApplication.processingRegistry().providerById("menet")
    RESULT["provider_loaded"] = provider is not None
    step(f"plugin active={RESULT['plugin_active']} provider={RESULT['provider_loaded']}")
    if provider is None:
        return quit_qgis()
    load_scene()


def show_toolbox():
    """The Processing toolbox filtered to the plugin, as a user finds the algorithm (screenshots only)."""
    try:
        import qgis.utils
        toolbox = qgis.utils.plugins["processing"].toolbox
        toolbox.setVisible(True)
        toolbox.searchBox.setText("mangroves")
    except Exception as exc:  # cosmetic: a QGIS without these attributes still runs the test
        RESULT["toolbox"] = f"not shown: {exc!r}"


def load_scene():
    show_toolbox()
    layer = iface.addRasterLayer(CONFIG["scene"], CONFIG["layer_name"])
    RESULT["scene_valid"] = bool(layer and layer.isValid())
    iface.setActiveLayer(layer)
    iface.mapCanvas().setExtent(layer.extent())
    step(f"scene loaded valid={RESULT['scene_valid']}")
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
    QTimer.singleShot(1000, lambda: press_run(dialog))


def press_run(dialog):
    grab(dialog, "dialog_parameters.png")
    grab(iface.mainWindow(), "main_window_before.png")
    finished = {}
    dialog.algorithmFinished.connect(lambda ok, results: finished.update(ok=ok, results=results))
    # The dialog's own accessor where QGIS has one (any UI language), else the visible button labelled Run.
    buttons = [dialog.runButton()] if hasattr(dialog, "runButton") else [
        b for b in dialog.findChildren(QPushButton) if b.text().replace("&", "") == "Run"]
    buttons = [b for b in buttons if b is not None and b.isVisible() and b.isEnabled()]
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


def heavy_modules():
    """Deep-learning modules imported into QGIS's own process (the engine belongs in a worker process)."""
    return sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "torchvision", "triton"))


def after_run(dialog, finished, timed_out=False):
    RESULT["finished"] = not timed_out
    RESULT["heavy_modules"] = heavy_modules()
    RESULT["successful"] = bool(finished.get("ok"))
    RESULT["results"] = {k: str(v) for k, v in (finished.get("results") or {}).items()}
    RESULT["libraries"]["after_run"] = loaded_libraries()
    step(f"algorithm finished={not timed_out} ok={finished.get('ok')}")
    # Layers are loaded and post-processed before algorithmFinished; give the canvas a moment to render.
    QTimer.singleShot(500, lambda: record_outcome(dialog))


def layer_tree():
    """The layer panel top to bottom: (depth, kind, name, visible, expanded)."""
    rows = []

    def walk(node, depth):
        for child in node.children():
            kind = "group" if QgsLayerTree.isGroup(child) else "layer"
            rows.append({"depth": depth, "kind": kind, "name": child.name(), "visible": child.isVisible(),
                         "checked": child.itemVisibilityChecked(), "expanded": child.isExpanded(),
                         "source": child.layer().source() if kind == "layer" and child.layer() else None})
            if kind == "group":
                walk(child, depth + 1)

    walk(QgsProject.instance().layerTreeRoot(), 0)
    return rows


def record_outcome(dialog):
    RESULT["layer_tree"] = layer_tree()
    # The log pane (txtLog in 3.22's .ui); else whichever text box holds the run's log.
    logs = [dialog.findChild(QTextEdit, "txtLog")] + dialog.findChildren(QTextEdit)
    texts = [w.toPlainText() for w in logs if w is not None]
    RESULT["dialog_log"] = next((t for t in texts if "Algorithm started" in t), texts[0] if texts else None)
    canvas = iface.mapCanvas()
    canvas.refreshAllLayers()
    wait_until(lambda: not canvas.isDrawing(), lambda: screenshots(dialog), 30, lambda: screenshots(dialog))


def screenshots(dialog):
    grab(dialog, "dialog_log.png")
    dialog.close()
    grab(iface.mainWindow(), "main_window_result.png")
    step("screenshots taken")
    quit_qgis()


def quit_qgis():
    """File › Exit with nothing to save, so no question blocks the exit."""
    step("exit")
    RESULT["done"] = True
    save()
    QgsProject.instance().setDirty(False)
    iface.actionExit().trigger()


def start():
    try:
        step("QGIS " + Qgis.QGIS_VERSION)
        iface.mainWindow().resize(*CONFIG.get("window", (1280, 800)))
        RESULT["libraries"]["start"] = loaded_libraries()
        install_plugin()
    except Exception:
        record_exception("driver", *sys.exc_info())
        quit_qgis()


def watchdog():
    """Whatever went wrong in the steps above, QGIS does not outlive the test's patience."""
    record_exception("watchdog", TimeoutError, TimeoutError(f"driver still running after {CONFIG['session_s']} s"),
                     None)
    quit_qgis()


# --code runs before the main window's event loop: start once it is running.
QTimer.singleShot(2000, start)
QTimer.singleShot(int(CONFIG["session_s"] * 1000), watchdog)
