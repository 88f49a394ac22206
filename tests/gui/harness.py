"""What both desktop drivers (drive_extract.py, drive_user_path.py) need to drive QGIS as a user does.

Imported by a driver running inside QGIS's GUI process (``qgis --code``), never by pytest.  It keeps the
record a test reads (``RESULT``, saved to ``CONFIG["result"]`` after every step so a dying QGIS still says how
far it got), catches every Python exception and message-log line into it, waits on QTimers (the event loop
keeps running), takes screenshots, answers modal dialogs nobody expects, and ends QGIS through File › Exit —
at the driver's end, after any failure in the driver, or when the session outlives ``CONFIG["session_s"]``.

A driver calls :func:`begin` with its config and its first step; its own steps chain through
:func:`later`, :func:`wait_until` and :func:`guarded`, which end the session when a step raises.
"""
import faulthandler
import json
import os
import sys
import threading
import time
import traceback

from qgis.core import Qgis, QgsApplication, QgsLayerTree, QgsProject
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QApplication, QMessageBox, QPushButton, QTextEdit
from qgis.utils import iface

CONFIG = {}
RESULT = {"steps": [], "exceptions": [], "messages": []}
STARTED = time.monotonic()
LEVELS = {Qgis.Info: "info", Qgis.Warning: "warning", Qgis.Critical: "critical", Qgis.Success: "success"}
#: Deep-learning modules that belong in the engine's worker process, never in QGIS's own.
HEAVY_PACKAGES = ("torch", "torchvision", "onnxruntime", "openvino", "triton")
_SESSION = {"shot_number": 0, "numbered_shots": False, "before_exit": None, "fault_log": None}


def begin(config, first_step, before_exit=None, numbered_shots=False):
    """Record into ``config["result"]``, run ``first_step()`` once the main window's event loop runs (``--code``
    runs before it) and quit after ``config["session_s"]``.  ``before_exit()`` adds the driver's last records
    before File › Exit; ``numbered_shots`` names screenshots 01_<name>.png, 02_... in the order taken."""
    CONFIG.update(config)
    os.makedirs(CONFIG["shots"], exist_ok=True)
    # Kept open for the process's life: a segfault in any thread writes every thread's stack here.
    _SESSION["fault_log"] = open(os.path.join(os.path.dirname(CONFIG["result"]), "faulthandler.txt"), "w")
    faulthandler.enable(file=_SESSION["fault_log"], all_threads=True)
    _SESSION.update(numbered_shots=numbered_shots, before_exit=before_exit)
    qgis_excepthook = sys.excepthook

    def excepthook(exc_type, value, tb):
        record_exception("sys.excepthook", exc_type, value, tb)
        qgis_excepthook(exc_type, value, tb)  # QGIS's own hook still shows it, as for a user

    sys.excepthook = excepthook
    threading.excepthook = lambda args: record_exception(
        f"thread {args.thread.name if args.thread else '?'}", args.exc_type, args.exc_value, args.exc_traceback)
    QgsApplication.messageLog().messageReceived.connect(
        lambda message, tag, level: RESULT["messages"].append({"tag": tag, "level": LEVELS.get(level, str(level)),
                                                               "text": message}))

    def start():
        step("QGIS " + Qgis.QGIS_VERSION)
        iface.mainWindow().resize(*CONFIG.get("window", (1280, 800)))
        first_step()

    later(2000, start)
    QTimer.singleShot(int(CONFIG["session_s"] * 1000), watchdog)


# ---------------------------------------------------------------------------------------------- the record
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


def grab(widget, name):
    """A screenshot recorded under ``name`` (numbered 01_, 02_... when the driver asked for it)."""
    stem = name[:-4] if name.endswith(".png") else name
    if _SESSION["numbered_shots"]:
        _SESSION["shot_number"] += 1
        stem = f"{_SESSION['shot_number']:02d}_{stem}"
    path = os.path.join(CONFIG["shots"], stem + ".png")
    ok = widget.grab().save(path, "PNG")
    RESULT.setdefault("screenshots", {})[name] = path if ok else None


def layer_tree():
    """The layer panel top to bottom: (depth, kind, name, visible, expanded, source, id; a group's run)."""
    rows = []

    def walk(node, depth):
        for child in node.children():
            kind = "group" if QgsLayerTree.isGroup(child) else "layer"
            layer = child.layer() if kind == "layer" else None
            rows.append({"depth": depth, "kind": kind, "name": child.name(), "visible": child.isVisible(),
                         "checked": child.itemVisibilityChecked(), "expanded": child.isExpanded(),
                         "source": layer.source() if layer else None, "id": layer.id() if layer else None,
                         "run": child.customProperty("menet_qgis/stage_group_of_run") if kind == "group" else None})
            if kind == "group":
                walk(child, depth + 1)

    walk(QgsProject.instance().layerTreeRoot(), 0)
    return rows


def heavy_modules():
    """Deep-learning modules imported into QGIS's own process (the engine belongs in a worker process)."""
    return sorted(name for name in sys.modules if name.split(".")[0] in HEAVY_PACKAGES)


def dialog_log(dialog):
    """The dialog's Log pane (txtLog in 3.22's .ui); else whichever text box holds the run's log."""
    boxes = [dialog.findChild(QTextEdit, "txtLog")] + dialog.findChildren(QTextEdit)
    texts = [box.toPlainText() for box in boxes if box is not None]
    return next((t for t in texts if "Algorithm started" in t or "starting" in t), texts[0] if texts else "")


# ---------------------------------------------------------------------------------------------- waiting
def guarded(function):
    """A QTimer callback whose exception is recorded and ends the session instead of leaving QGIS waiting."""
    def run(*args):
        try:
            function(*args)
        except Exception:
            record_exception("driver", *sys.exc_info())
            quit_qgis()
    return run


def later(ms, action):
    """Run ``action`` on a QTimer, guarded."""
    QTimer.singleShot(ms, guarded(action))


def wait_until(condition, then, timeout_s, on_timeout, every_ms=250):
    """Poll ``condition`` on a QTimer (the event loop keeps running); call ``then`` or ``on_timeout``."""
    deadline = time.monotonic() + timeout_s

    def poll():
        if condition():
            then()
        elif time.monotonic() > deadline:
            on_timeout()
        else:
            later(every_ms, poll)

    later(every_ms, poll)


# ---------------------------------------------------------------------------------------------- a user's actions
def install_plugin():
    """Plugins › Manage and Install Plugins › Install from ZIP, through QGIS's own installer; returns its
    seconds.  Records whether the plugin is active and its Processing provider loaded."""
    step("install from ZIP " + CONFIG["zip"])
    import pyplugin_installer
    import qgis.utils
    started = time.monotonic()
    pyplugin_installer.instance().installFromZipFile(CONFIG["zip"])
    seconds = time.monotonic() - started
    RESULT["plugin_active"] = "menet_qgis" in qgis.utils.active_plugins
    # qgis.utils.home_plugin_path is gone in QGIS 3.40: the profile's plugin folder, as the installer uses it
    RESULT["plugin_folder"] = os.path.join(QgsApplication.qgisSettingsDirPath(), "python", "plugins", "menet_qgis")
    RESULT["provider_loaded"] = QgsApplication.processingRegistry().providerById("menet") is not None
    step(f"plugin active={RESULT['plugin_active']} provider={RESULT['provider_loaded']}")
    return seconds


def show_toolbox(search):
    """The Processing toolbox filtered to ``search``, as a user finds the algorithms (screenshots only)."""
    try:
        import qgis.utils
        toolbox = qgis.utils.plugins["processing"].toolbox
        toolbox.setVisible(True)
        toolbox.searchBox.setText(search)
    except Exception as exc:  # cosmetic: a QGIS without these attributes still runs the test
        RESULT["toolbox"] = f"not shown: {exc!r}"


def add_scene():
    """Layer › Add Raster Layer with the scene, made the active layer and zoomed to; returns the layer."""
    layer = iface.addRasterLayer(CONFIG["scene"], CONFIG["layer_name"])
    RESULT["scene_valid"] = bool(layer and layer.isValid())
    iface.setActiveLayer(layer)
    iface.mapCanvas().setExtent(layer.extent())
    step(f"scene loaded valid={RESULT['scene_valid']}")
    return layer


def run_buttons(dialog):
    """The dialog's own accessor where QGIS has one (any UI language), else the visible button labelled Run."""
    buttons = [dialog.runButton()] if hasattr(dialog, "runButton") else [
        b for b in dialog.findChildren(QPushButton) if b.text().replace("&", "") == "Run"]
    return [b for b in buttons if b is not None and b.isVisible() and b.isEnabled()]


def answer_modal_dialogs(into="modal_dialogs"):
    """Every second from now on: a modal dialog is recorded in RESULT[into] (title, text, screenshot) and
    answered, so QGIS never waits for a person.  A question gets Yes, else Discard (at exit, QGIS then goes on
    exiting), else its accepting button (OK); any other modal window is closed."""
    widget = QApplication.activeModalWidget()
    if widget is not None:
        box = widget if isinstance(widget, QMessageBox) else None
        text = f"{box.text()} {box.informativeText()}" if box else ""
        answered = RESULT.setdefault(into, [])
        answered.append({"at": f"{time.monotonic() - STARTED:.1f}s", "title": widget.windowTitle(),
                         "class": type(widget).__name__, "text": text.strip(),
                         "last_step": RESULT["steps"][-1] if RESULT["steps"] else ""})
        grab(widget, f"modal_{len(answered)}")
        save()
        accept = None
        if box is not None:
            accept = box.button(QMessageBox.Yes) or box.button(QMessageBox.Discard) or next(
                (b for b in box.buttons() if box.buttonRole(b) in (QMessageBox.YesRole, QMessageBox.AcceptRole)), None)
        if accept is not None:
            accept.click()
        else:
            widget.close()
    QTimer.singleShot(1000, lambda: answer_modal_dialogs(into))


# ---------------------------------------------------------------------------------------------- the end
def quit_qgis():
    """File › Exit with nothing to save, once (later calls do nothing): the driver's last records first."""
    if RESULT.get("done"):
        return
    if _SESSION["before_exit"]:
        _SESSION["before_exit"]()
    step("exit")
    RESULT["done"] = True
    save()
    exit_qgis()


def exit_qgis():
    QgsProject.instance().setDirty(False)
    iface.actionExit().trigger()


def watchdog():
    """Whatever went wrong in the steps, QGIS does not outlive the test's patience (File › Exit once more
    if the driver already chose it)."""
    record_exception("watchdog", TimeoutError, TimeoutError(f"driver still running after {CONFIG['session_s']} s"),
                     None)
    if RESULT.get("done"):
        exit_qgis()
    else:
        quit_qgis()
