"""The few QGIS/Qt API differences between QGIS 3.22 and QGIS 3.40+/4 (Qt6), in one place.

QGIS 3.38 moved attribute field types from the deprecated ``QVariant.Type`` to ``QMetaType.Type``;
Qt6 (QGIS 4) has no ``QVariant.Type`` at all, while QGIS 3.22 only accepts ``QVariant.Type``.
"""
from __future__ import annotations

from qgis.core import QgsField
from qgis.PyQt.QtCore import QMetaType


def _fields_take_qmetatype() -> bool:
    """True where ``QgsField(name, QMetaType.Type.X)`` is accepted (QGIS >= 3.38, Qt6 builds)."""
    try:
        QgsField("probe", QMetaType.Type.Double)
    except TypeError:
        return False
    return True


FIELDS_TAKE_QMETATYPE = _fields_take_qmetatype()
# QVariant.Type names whose QMetaType.Type counterpart is spelled differently.
_QMETATYPE_NAMES = {"String": "QString", "Date": "QDate", "DateTime": "QDateTime", "Time": "QTime",
                    "ByteArray": "QByteArray", "StringList": "QStringList", "Map": "QVariantMap",
                    "List": "QVariantList"}


def field_type(name: str):
    """The attribute field type called ``name`` ("String", "Double", "LongLong", "Int", ...) for
    ``QgsField``: ``QMetaType.Type.<name>`` where QGIS offers it, else ``QVariant.Type.<name>``."""
    if FIELDS_TAKE_QMETATYPE:
        return getattr(QMetaType.Type, _QMETATYPE_NAMES.get(name, name))
    from qgis.PyQt.QtCore import QVariant  # only reached on QGIS < 3.38 (Qt5), where it exists
    return getattr(QVariant.Type, name)
