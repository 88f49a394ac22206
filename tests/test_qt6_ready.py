"""Ready for QGIS 4 (Qt6): the plugin's code avoids the Qt5/PyQt5-only idioms that break there.

A static check over menet_qgis/ and scripts/ (AST, names resolved against the QGIS that runs the
suite).  It catches:
- importing PyQt5/PyQt6/sip directly instead of through ``qgis.PyQt``;
- ``exec_()`` / ``print_()`` (gone in PyQt6);
- classes Qt6 removed (QRegExp, QDesktopWidget, ...);
- ``QVariant`` anywhere but menet_qgis/processing/qgis_compat.py (field types go through ``field_type``:
  ``QVariant.Type`` does not exist in Qt6, ``QMetaType.Type`` is what QGIS >= 3.38 takes);
- unscoped enum access (``QgsProcessingParameterNumber.Integer``, ``Qt.AlignLeft``): every
  ``Name.attr...`` chain rooted in a name imported from ``qgis.*`` is looked up, and a chain
  whose value is an enum member reached from something that is not its enum type fails.
  PyQt6 only has the scoped form (``QgsProcessingParameterNumber.Type.Integer``).
It cannot see: enums reached through instances or ``getattr`` strings, behaviour that differs at
run time (PyQt6 enums are not ints: ``flag | 1`` or ``int(flag)`` comparisons), APIs QGIS 4 drops that
3.x still has (no QGIS 4 to resolve against: Debian has none), and anything under Qt6 itself.
"""
from __future__ import annotations

import ast
import configparser
import enum
import importlib
from pathlib import Path

import pytest

from helpers import ROOT

SCANNED = [ROOT / "menet_qgis", ROOT / "scripts"]
COMPAT_MODULE = ROOT / "menet_qgis" / "processing/qgis_compat.py"
QT5_ONLY_MODULES = ("PyQt5", "PyQt6", "sip")
QT5_ONLY_METHODS = {"exec_", "print_"}
QT6_REMOVED_CLASSES = {"QRegExp", "QRegExpValidator", "QDesktopWidget", "QGLWidget", "QMatrix", "QStringRef",
                       "QTextCodec", "QSound", "QLinkedList", "QWebView", "QWebPage"}


def _is_enum_type(obj) -> bool:
    if not isinstance(obj, type):
        return False
    return issubclass(obj, enum.Enum) or type(obj).__name__ in ("enumtype", "EnumType") and "sip" in type(obj).__module__


def _is_enum_member(obj) -> bool:
    return isinstance(obj, enum.Enum) or _is_enum_type(type(obj))


def _qgis_imports(tree: ast.AST) -> dict:
    """Names the module imports from qgis.* -> the objects they are on the running QGIS."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qgis" and node.level == 0:
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                continue
            for alias in node.names:
                if hasattr(module, alias.name):
                    names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


def _dotted(node: ast.Attribute):
    """``a.b.c`` -> ["a", "b", "c"], or None when the chain does not start at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def qt6_problems(source: str, filename: str = "<source>", allow_qvariant: bool = False) -> list:
    """Every PyQt5-only idiom in ``source``, as "file:line: what" strings."""
    tree = ast.parse(source, filename)
    problems = []

    def report(node, what):
        problems.append(f"{filename}:{node.lineno}: {what}")

    imported = _qgis_imports(tree)
    outermost = set()  # attribute chains are checked once, from their outermost node
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in QT5_ONLY_MODULES:
                    report(node, f"import {alias.name}: use qgis.PyQt")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in QT5_ONLY_MODULES:
                report(node, f"from {node.module} import: use qgis.PyQt")
            for alias in node.names:
                if alias.name in QT6_REMOVED_CLASSES:
                    report(node, f"{alias.name} does not exist in Qt6")
                if alias.name == "QVariant" and not allow_qvariant:
                    report(node, "QVariant imported: field types go through menet_qgis.processing.qgis_compat.field_type")
        elif isinstance(node, ast.Name) and node.id == "QVariant" and not allow_qvariant:
            report(node, "QVariant used: field types go through menet_qgis.processing.qgis_compat.field_type")
        elif isinstance(node, ast.Attribute):
            if node.attr in QT5_ONLY_METHODS:
                report(node, f".{node.attr}(): PyQt6 has only .{node.attr[:-1]}()")
            if id(node) in outermost:
                continue
            inner = node.value
            while isinstance(inner, ast.Attribute):
                outermost.add(id(inner))
                inner = inner.value
            chain = _dotted(node)
            if not chain or chain[0] not in imported:
                continue
            obj = imported[chain[0]]
            for depth, attr in enumerate(chain[1:], start=2):
                parent, obj = obj, getattr(obj, attr, None)
                if obj is None:
                    break
                if _is_enum_member(obj) and not _is_enum_type(parent):
                    enum_name = next((n for n in dir(parent) if getattr(parent, n, None) is type(obj)), "<Enum>")
                    scoped = f"{'.'.join(chain[:depth - 1])}.{enum_name}.{attr}"
                    report(node, f"unscoped enum {'.'.join(chain[:depth])}: write {scoped}")
                    break
    return problems


def _plugin_sources():
    for folder in SCANNED:
        yield from sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", list(_plugin_sources()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pyqt5_only_idioms(path):
    problems = qt6_problems(path.read_text(), str(path.relative_to(ROOT)), allow_qvariant=path == COMPAT_MODULE)
    assert not problems, "PyQt5-only idioms (break on QGIS 4 / Qt6):\n" + "\n".join(problems)


def test_the_check_finds_each_idiom_it_claims_to():
    bad = (
        "from PyQt5.QtCore import QTimer\n"
        "import sip\n"
        "from qgis.PyQt.QtCore import QVariant, QRegExp, Qt\n"
        "from qgis.core import QgsField, QgsProcessingParameterNumber\n"
        "dialog.exec_()\n"
        "QgsField('a', QVariant.Double)\n"
        "kind = QgsProcessingParameterNumber.Integer\n"
        "align = Qt.AlignLeft\n"
    )
    found = "\n".join(qt6_problems(bad))
    for expected in [":1: from PyQt5.QtCore", ":2: import sip", ":3: QRegExp", ":3: QVariant imported", ":5: .exec_()",
                     ":6: QVariant used", ":7: unscoped enum QgsProcessingParameterNumber.Integer",
                     ":8: unscoped enum Qt.AlignLeft"]:
        assert expected in found, f"{expected!r} not reported in:\n{found}"
    good = ("from qgis.PyQt.QtCore import Qt\nfrom qgis.core import QgsProcessingParameterNumber\n"
            "kind = QgsProcessingParameterNumber.Type.Integer\nalign = Qt.AlignmentFlag.AlignLeft\ndialog.exec()\n")
    assert qt6_problems(good) == []


def test_metadata_declares_qt6_and_admits_qgis4():
    meta = configparser.ConfigParser()
    meta.read(ROOT / "metadata.txt")
    general = meta["general"]
    assert general.get("supportsQt6", "").strip().lower() == "true"
    assert int(general.get("qgisMaximumVersion", "3.99").split(".")[0]) >= 4
    assert general["qgisMinimumVersion"] == "3.22"


@pytest.mark.parametrize("name, value", [("String", "Avicennia"), ("Double", 0.8125), ("LongLong", 2**40 + 3),
                                         ("Int", -7)])
def test_field_types_hold_their_values_on_the_running_qgis(name, value):
    from qgis.core import QgsFeature, QgsField, QgsFields, QgsMemoryProviderUtils, QgsWkbTypes
    from qgis.PyQt.QtCore import QMetaType

    from menet_qgis.processing.qgis_compat import FIELDS_TAKE_QMETATYPE, field_type
    fields = QgsFields()
    fields.append(QgsField("value", field_type(name)))
    layer = QgsMemoryProviderUtils.createMemoryLayer("t", fields, QgsWkbTypes.Type.NoGeometry)
    feature = QgsFeature(layer.fields())
    feature.setAttributes([value])
    assert layer.dataProvider().addFeatures([feature])[0]
    assert [f["value"] for f in layer.getFeatures()] == [value]
    assert type(next(layer.getFeatures())["value"]) is type(value)
    if FIELDS_TAKE_QMETATYPE:
        assert isinstance(field_type(name), QMetaType.Type)
