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
answered so that QGIS never waits for a person.

Everything comes from the JSON file named by ``USER_PATH_DRIVER_CONFIG`` (not a MENET_* variable: a new user
has none): ``zip``, ``variant``, ``wheel_folder``, ``model_url``, ``scene``, ``layer_name``, ``output``,
``result``, ``shots``, ``step_timeout_s``, ``session_s``.
"""
import faulthandler
import json
import os
import sys
import threading
import time
import traceback

CONFIG = json.load(open(os.environ["USER_PATH_DRIVER_CONFIG"], encoding="utf-8"))
os.makedirs(CONFIG["shots"], exist_ok=True)
FAULT_LOG = open(os.path.join(os.path.dirname(CONFIG["result"]), "faulthandler.txt"), "w")
faulthandler.enable(file=FAULT_LOG, all_threads=True)

from qgis.core import NULL, Qgis, QgsApplication, QgsLayerTree, QgsProject  # noqa: E402
from qgis.PyQt.QtCore import QTimer  # noqa: E402
from qgis.PyQt.QtWidgets import QApplication, QMessageBox, QPushButton, QTextEdit  # noqa: E402
from qgis.utils import iface  # noqa: E402

RESULT = {"steps": [], "exceptions": [], "messages": [], "modal_dialogs": [], "dialogs": {}, "seconds": {}}
STARTED = time.monotonic()
LEVELS = {Qgis.Info: "info", Qgis.Warning: "warning", Qgis.Critical: "critical", Qgis.Success: "success"}
SHOT_NUMBER = [0]


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
    _qgis_excepthook(exc_type, value, tb)  # QGIS's own hook still shows it (the modal watcher answers it)


sys.excepthook = excepthook
threading.excepthook = lambda args: record_exception(
    f"thread {args.thread.name if args.thread else '?'}", args.exc_type, args.exc_value, args.exc_traceback)
QgsApplication.messageLog().messageReceived.connect(
    lambda message, tag, level: RESULT["messages"].append({"tag": tag, "level": LEVELS.get(level, str(level)),
                                                           "text": message}))


def grab(widget, name):
    """A numbered screenshot (01_..., 02_...) so the folder reads in the order of the steps."""
    SHOT_NUMBER[0] += 1
    path = os.path.join(CONFIG["shots"], f"{SHOT_NUMBER[0]:02d}_{name}.png")
    ok = widget.grab().save(path, "PNG")
    RESULT.setdefault("screenshots", {})[name] = path if ok else None


def answer_modal_dialogs():
    """Every second: a modal dialog is recorded (title, text, screenshot) and answered, so QGIS never waits for a
    person.  A question is answered with its accepting button (Yes/OK: at exit, QGIS then goes on exiting)."""
    widget = QApplication.activeModalWidget()
    if widget is not None:
        text = widget.text() if isinstance(widget, QMessageBox) else ""
        if isinstance(widget, QMessageBox) and widget.informativeText():
            text += " " + widget.informativeText()
        RESULT["modal_dialogs"].append({"at": f"{time.monotonic() - STARTED:.1f}s", "title": widget.windowTitle(),
                                        "class": type(widget).__name__, "text": text.strip(),
                                        "last_step": RESULT["steps"][-1] if RESULT["steps"] else ""})
        grab(widget, f"modal_{len(RESULT['modal_dialogs'])}")
        save()
        accept = None
        if isinstance(widget, QMessageBox):
            accept = next((b for b in widget.buttons() if widget.buttonRole(b) in
                           (QMessageBox.YesRole, QMessageBox.AcceptRole)), None)
        if accept is not None:
            accept.click()
        else:
            widget.close()
    QTimer.singleShot(1000, answer_modal_dialogs)


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


def guarded(function):
    """A QTimer callback whose exception is recorded and ends the session instead of leaving QGIS waiting."""
    def run(*args):
        try:
            function(*args)
        except Exception:
            record_exception("driver", *sys.exc_info())
            quit_qgis()
    return run


def dialog_log(dialog):
    """The dialog's Log pane (txtLog in 3.22's .ui); else whichever text box holds the run's log."""
    boxes = [dialog.findChild(QTextEdit, "txtLog")] + dialog.findChildren(QTextEdit)
    texts = [box.toPlainText() for box in boxes if box is not None]
    return next((t for t in texts if "Algorithm started" in t), texts[0] if texts else "")


def run_button(dialog):
    """The dialog's own accessor where QGIS has one (any UI language), else the visible button labelled Run."""
    buttons = [dialog.runButton()] if hasattr(dialog, "runButton") else [
        b for b in dialog.findChildren(QPushButton) if b.text().replace("&", "") == "Run"]
    buttons = [b for b in buttons if b is not None and b.isVisible() and b.isEnabled()]
    return buttons[0] if len(buttons) == 1 else None


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
        button = run_button(dialog)
        if button is None:
            step(f"{name}: no unique visible, enabled Run button")
            return quit_qgis()
        started = time.monotonic()
        step(f"{name}: click Run")
        button.click()

        def done(timed_out=False):
            record.update(finished=not timed_out, ok=bool(finished.get("ok")), seconds=time.monotonic() - started,
                          results={k: str(v) for k, v in (finished.get("results") or {}).items()},
                          log=dialog_log(dialog))
            RESULT["seconds"][name] = record["seconds"]
            step(f"{name}: finished={not timed_out} ok={record['ok']} in {record['seconds']:.1f} s")
            # Layers load before algorithmFinished; give the canvas a moment, then the screenshot.
            QTimer.singleShot(500, guarded(lambda: after(timed_out)))

        def after(timed_out):
            grab(dialog, f"{name}_log")
            dialog.close()
            if timed_out or not record["ok"]:
                return quit_qgis()
            then()

        wait_until(lambda: "ok" in finished, done, CONFIG["step_timeout_s"], lambda: done(timed_out=True))

    QTimer.singleShot(1000, guarded(press))


# ---------------------------------------------------------------------------------------------- the steps
def install_plugin():
    """Plugins › Manage and Install Plugins › Install from ZIP, through QGIS's own installer."""
    step("install from ZIP " + CONFIG["zip"])
    import pyplugin_installer
    import qgis.utils
    started = time.monotonic()
    pyplugin_installer.instance().installFromZipFile(CONFIG["zip"])
    RESULT["seconds"]["install_plugin"] = time.monotonic() - started
    RESULT["plugin_active"] = "menet_qgis" in qgis.utils.active_plugins
    RESULT["plugin_folder"] = os.path.join(QgsApplication.qgisSettingsDirPath(), "python", "plugins", "menet_qgis")
    RESULT["provider_loaded"] = QgsApplication.processingRegistry().providerById("menet") is not None
    step(f"plugin active={RESULT['plugin_active']} provider={RESULT['provider_loaded']}")
    if not RESULT["provider_loaded"]:
        return quit_qgis()
    show_toolbox()
    grab(iface.mainWindow(), "plugin_installed")
    run_in_dialog("install_dependencies", "menet:installdependencies",
                  {"VARIANT": CONFIG["variant_index"], "WHEEL_FOLDER": CONFIG["wheel_folder"]}, install_model)


def show_toolbox():
    """The Processing toolbox filtered to the plugin, as a user finds its algorithms (screenshots only)."""
    try:
        import qgis.utils
        toolbox = qgis.utils.plugins["processing"].toolbox
        toolbox.setVisible(True)
        toolbox.searchBox.setText("ME-Net")
    except Exception as exc:  # cosmetic: a QGIS without these attributes still runs the test
        RESULT["toolbox"] = f"not shown: {exc!r}"


def install_model():
    run_in_dialog("install_model", "menet:installmodel", {"SOURCE": CONFIG["model_url"]}, load_scene)


def load_scene():
    layer = iface.addRasterLayer(CONFIG["scene"], CONFIG["layer_name"])
    RESULT["scene_valid"] = bool(layer and layer.isValid())
    RESULT["scene_layer"] = {"id": layer.id(), "name": layer.name()} if layer else None
    iface.setActiveLayer(layer)
    iface.mapCanvas().setExtent(layer.extent())
    step(f"scene loaded valid={RESULT['scene_valid']}")
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


def layer_tree():
    """The layer panel top to bottom."""
    rows = []

    def walk(node, depth):
        for child in node.children():
            kind = "group" if QgsLayerTree.isGroup(child) else "layer"
            rows.append({"depth": depth, "kind": kind, "name": child.name(), "visible": child.isVisible(),
                         "checked": child.itemVisibilityChecked(), "expanded": child.isExpanded(),
                         "source": child.layer().source() if kind == "layer" and child.layer() else None,
                         "id": child.layer().id() if kind == "layer" and child.layer() else None})
            if kind == "group":
                walk(child, depth + 1)

    walk(QgsProject.instance().layerTreeRoot(), 0)
    return rows


def heavy_modules():
    """Deep-learning modules imported into QGIS's own process (the engine belongs in a worker process)."""
    return sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "torchvision", "onnxruntime",
                                                                          "openvino", "triton"))


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
    QTimer.singleShot(800, guarded(lambda: close_second(dialog)))


def close_second(dialog):
    grab(dialog, "second_extract_parameters")
    dialog.close()
    quit_qgis()


def quit_qgis():
    """File › Exit with nothing to save; any question QGIS still asks is recorded and answered by the watcher."""
    if RESULT.get("done"):
        return
    RESULT.setdefault("layer_tree", layer_tree())
    RESULT.setdefault("heavy_modules", heavy_modules())
    step("exit")
    RESULT["done"] = True
    save()
    QgsProject.instance().setDirty(False)
    iface.actionExit().trigger()


def start():
    try:
        step("QGIS " + Qgis.QGIS_VERSION)
        iface.mainWindow().resize(*CONFIG.get("window", (1280, 800)))
        install_plugin()
    except Exception:
        record_exception("driver", *sys.exc_info())
        quit_qgis()


def watchdog():
    """Whatever went wrong above, QGIS does not outlive the test's patience (exit even if quit_qgis ran)."""
    record_exception("watchdog", TimeoutError, TimeoutError(f"driver still running after {CONFIG['session_s']} s"),
                     None)
    QgsProject.instance().setDirty(False)
    iface.actionExit().trigger()


# --code runs before the main window's event loop: start once it is running.
QTimer.singleShot(2000, start)
QTimer.singleShot(1000, answer_modal_dialogs)
QTimer.singleShot(int(CONFIG["session_s"] * 1000), watchdog)
