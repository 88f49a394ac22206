"""Processing parameters generated from the declarations of ``menet_qgis/options.py``, and their values.

``parameters_for`` makes the ``QgsProcessingParameter*`` objects of a declared option (its name, label,
default, range, choices and help come from the declaration, so the dialog, the CLI and the batch runner
cannot drift apart); ``values_from`` reads them back as job fields.  The few parameters only Processing
has (layers, extents, destinations) are built by the algorithms; the helpers at the end turn those into
what the engine process can open: file paths and GeoJSON.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence

from qgis.core import (QgsCoordinateTransform, QgsFeatureRequest, QgsProcessingException,
                       QgsProcessingParameterBand, QgsProcessingParameterBoolean, QgsProcessingParameterEnum,
                       QgsProcessingParameterFile, QgsProcessingParameterNumber, QgsProcessingParameterString)

from ..options import BAND_HELP, BAND_PARAMS, Option


def tooltip(option: Option) -> str:
    """The declared help as a tooltip sentence; one that starts with a choice ("auto = ...") keeps its case."""
    text = option.help
    if any(text.startswith(f"{choice} ") for choice in option.choices):
        return text
    return text[:1].upper() + text[1:]


def _file_kwargs(option: Option) -> Dict:
    """The picker's filter and/or the one extension QGIS requires, as declared."""
    kwargs = {"fileFilter": option.file_filter, "extension": option.file_extension}
    return {key: value for key, value in kwargs.items() if value}


def _range(option: Option) -> Dict:
    limits = {"minValue": option.minimum, "maxValue": option.maximum}
    return {key: value for key, value in limits.items() if value is not None}


def parameters_for(option: Option, layer_parameter: str = "INPUT") -> List:
    """The parameters that show ``option`` in a dialog: one, or for ``bands`` a band picker per
    Sentinel-2 band of ``layer_parameter`` (short labels for batch headers; the detail in the tooltip)."""
    if "processing" not in option.fronts:
        raise ValueError(f"option {option.name} is not shown in Processing")
    if option.name == "bands":
        params = []
        for key, label in BAND_PARAMS:
            param = QgsProcessingParameterBand(key, f"Band {label}", parentLayerParameterName=layer_parameter,
                                               optional=True)
            param.setHelp(BAND_HELP.format(label=label))
            params.append(param)
    else:
        param = parameter_for(option)
        param.setHelp(tooltip(option))
        params = [param]
    if option.advanced:
        for param in params:
            advanced(param)
    return params


def parameter_for(option: Option):
    """The ``QgsProcessingParameter*`` of one declared option (without its help and advanced flag, which
    ``parameters_for`` adds)."""
    name, label, kind, optional = option.param_name, option.label, option.kind, option.optional
    if kind in ("int", "float"):
        number_type = (QgsProcessingParameterNumber.Type.Integer if kind == "int"
                       else QgsProcessingParameterNumber.Type.Double)
        return QgsProcessingParameterNumber(name, label, number_type, option.default, optional=optional,
                                            **_range(option))
    if kind == "bool":
        return QgsProcessingParameterBoolean(name, label, defaultValue=option.default, optional=optional)
    if kind in ("choice", "multichoice"):
        labels = list(option.choice_labels or map(str, option.choices))
        many = kind == "multichoice"
        default = [option.choices.index(c) for c in option.default] if many else option.choices.index(option.default)
        return QgsProcessingParameterEnum(name, label, labels, allowMultiple=many, defaultValue=default,
                                          optional=optional)
    if kind in ("file", "folder"):
        behavior = (QgsProcessingParameterFile.Behavior.Folder if kind == "folder"
                    else QgsProcessingParameterFile.Behavior.File)
        return QgsProcessingParameterFile(name, label, behavior=behavior, defaultValue=option.default,
                                          optional=optional, **_file_kwargs(option))
    if kind == "text":
        return QgsProcessingParameterString(name, label, defaultValue=option.default, optional=optional)
    raise ValueError(f"option {option.name}: no Processing parameter for kind {kind}")


def advanced(param):
    """Fold a parameter away under the dialog's "Advanced parameters"."""
    param.setFlags(param.flags() | param.FlagAdvanced)
    return param


def has_value(parameters: Dict, key: str) -> bool:
    return parameters.get(key) not in (None, "")


def values_from(alg, parameters: Dict, context, options: Sequence[Option]) -> Dict:
    """{job field name: value} of the declared ``options`` as the user set them (an empty optional
    option gives its default)."""
    return {option.name: _value(alg, parameters, context, option) for option in options}


def _value(alg, parameters, context, option: Option):
    name, kind = option.param_name, option.kind
    if option.name == "bands":
        return band_numbers(alg, parameters, context)
    if option.optional and kind in ("int", "float") and not has_value(parameters, name):
        return option.default
    if kind == "int":
        return alg.parameterAsInt(parameters, name, context)
    if kind == "float":
        return alg.parameterAsDouble(parameters, name, context)
    if kind == "bool":
        return alg.parameterAsBoolean(parameters, name, context)
    if kind == "choice":
        return option.choices[alg.parameterAsEnum(parameters, name, context)]
    if kind == "multichoice":
        return [option.choices[i] for i in alg.parameterAsEnums(parameters, name, context)]
    if kind in ("file", "folder"):
        return alg.parameterAsFile(parameters, name, context) or option.default
    if kind == "text":
        return alg.parameterAsString(parameters, name, context).strip() or option.default
    raise ValueError(f"option {option.name}: no Processing parameter for kind {kind}")


def band_numbers(alg, parameters, context) -> Optional[List[int]]:
    """The band numbers B2…B12 the user set, or None (the bands are found from their names);
    without B12 (fine for recipe v2 models; v1 ones say that B12 is missing)."""
    bands = [alg.parameterAsInt(parameters, key, context) for key, _ in BAND_PARAMS]
    if not bands[-1]:
        bands = bands[:-1]
    return bands if any(bands) else None


def check_values(alg, parameters, context, options: Sequence[Option]) -> Optional[str]:
    """What is wrong with the declared ``options`` together (QGIS checks each on its own), or None:
    only some of the band numbers B2…B11 set (B12 is optional: only models of recipe v1 read it)."""
    if not any(option.name == "bands" for option in options):
        return None
    numbers = [alg.parameterAsInt(parameters, key, context) for key, _ in BAND_PARAMS]
    if any(numbers) and not all(numbers[:-1]):
        return "Set the band parameters B2, B3, B4, B8 and B11 (and B12 for a recipe v1 model) or none"
    return None


def gdal_raster_path(alg, parameters, name: str, context) -> str:
    """File path of a raster layer parameter; refuses layers GDAL cannot read from a file."""
    layer = alg.parameterAsRasterLayer(parameters, name, context)
    if layer is None or not layer.isValid():
        raise QgsProcessingException(f"{name} is not a valid raster layer")
    if layer.providerType() != "gdal":
        raise QgsProcessingException(f"{name} must be a file-based (GDAL) raster, not a {layer.providerType()} layer")
    return layer.source().split("|")[0]


def optional_raster_path(alg, parameters, name: str, context) -> Optional[str]:
    """``gdal_raster_path`` of an optional raster parameter; None when it is empty."""
    return gdal_raster_path(alg, parameters, name, context) if has_value(parameters, name) else None


def bounds_of(rect, what: str) -> List[float]:
    """[xmin, ymin, xmax, ymax] of an extent; an empty one is refused."""
    if rect.isNull() or rect.isEmpty():
        raise QgsProcessingException(f"the {what} extent is empty")
    return [rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()]


def polygons_as_geojson(source, target_crs, context) -> list:
    """Features of a QGIS feature source as GeoJSON-like dicts in ``target_crs``."""
    transform = QgsCoordinateTransform(source.sourceCrs(), target_crs, context.transformContext())
    shapes = []
    for feature in source.getFeatures(QgsFeatureRequest()):
        geom = feature.geometry()
        if geom.isNull() or geom.isEmpty():
            continue
        geom.transform(transform)
        shapes.append(json.loads(geom.asJson()))
    return shapes
