"""Which raster band is which Sentinel-2 band, and how its values become reflectance.

Real inputs: Google Earth Engine exports with descriptions such as
``Blue, Green, Red, NIR, SWIR1, SWIR2`` or ``B2 ... B12``; GDAL's SENTINEL2
driver (descriptions like ``B4, central wavelength 665 nm`` and a ``BANDNAME``
tag); the 6-band stacks our "Prepare Sentinel-2 stack" writes; and ready-made
11-channel ME-Net stacks, which pass through as they are.  Bands are only
mapped from what the file says; an input that does not say enough gets an
error listing what was found and what is needed (explicit band numbers fix it).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..model.channels import N_CHANNELS, RECIPE_V1, Recipe
from ...options import INPUT, by_name

#: Normalised aliases (lower case, no spaces, dashes or underscores) per band.
ALIASES: Dict[str, Sequence[str]] = {
    "B1": ("b1", "b01", "coastal", "coastalaerosol", "aerosol"),
    "B2": ("b2", "b02", "blue"),
    "B3": ("b3", "b03", "green"),
    "B4": ("b4", "b04", "red"),
    "B5": ("b5", "b05", "rededge1", "re1"),
    "B6": ("b6", "b06", "rededge2", "re2"),
    "B7": ("b7", "b07", "rededge3", "re3"),
    "B8": ("b8", "b08", "nir", "nearinfrared", "nir1"),
    "B8A": ("b8a", "b08a", "nirnarrow", "narrownir", "rededge4", "re4"),
    "B9": ("b9", "b09", "watervapour", "watervapor", "wv"),
    "B10": ("b10", "cirrus"),
    "B11": ("b11", "swir1", "swir16"),
    "B12": ("b12", "swir2", "swir22"),
}
_LOOKUP = {alias: band for band, aliases in ALIASES.items() for alias in aliases}
#: Product metadata keys that carry the DN offset (processing baseline >= 04.00 uses -1000).
OFFSET_KEYS = ("BOA_ADD_OFFSET", "RADIO_ADD_OFFSET")
DN_SCALE = 1.0 / 10000.0
#: DN offsets accepted, from the option or the product metadata (declared with the option, options.INPUT).
DN_OFFSET_RANGE = (by_name(INPUT, "dn_offset").minimum, by_name(INPUT, "dn_offset").maximum)


class BandError(ValueError):
    """The input's bands cannot be used; the message lists what was found and what is needed."""


def checked_dn_offset(value, source: str, fix: str) -> float:
    """``value`` as a finite, plausible DN offset (``DN_OFFSET_RANGE``); else ``BandError`` naming where it
    came from (``source``: the option or the product's metadata) and how to proceed (``fix``)."""
    try:
        offset = float(value)
    except (TypeError, ValueError):
        offset = None
    if offset is None or not math.isfinite(offset):
        raise BandError(f"the DN offset {str(value).strip()!r} from {source} is not a number; Sentinel-2 products "
                        f"use -1000 (processing baseline 04.00 and later) or 0 (before): {fix}")
    low, high = DN_OFFSET_RANGE
    if not low <= offset <= high:
        raise BandError(f"the DN offset {offset:g} from {source} is not a Sentinel-2 offset (accepted: {low:g} to "
                        f"{high:g}; products use -1000 from processing baseline 04.00, 0 before): {fix}")
    return offset


def metadata_dn_offset(dataset_tags: Dict[str, str], where: str) -> Optional[float]:
    """The DN offset a raster's metadata carries (``OFFSET_KEYS``), checked; None when it carries none."""
    for key in OFFSET_KEYS:
        if key in dataset_tags:
            return checked_dn_offset(dataset_tags[key], f"the metadata of {where} ({key})",
                                     f"correct the tag, e.g. gdal_edit.py -mo {key}=-1000 {where}")
    return None


def normalise_name(text: str) -> str:
    head = (text or "").split(",")[0]
    return re.sub(r"[\s_\-.]", "", head.strip().lower())


def band_label(description: str, tags: Dict[str, str]) -> Optional[str]:
    """The Sentinel-2 band a raster band is, from its description or tags, or None."""
    for text in (tags.get("BANDNAME"), tags.get("band_name"), tags.get("NAME"), description):
        if text and normalise_name(text) in _LOOKUP:
            return _LOOKUP[normalise_name(text)]
    return None


@dataclass
class InputPlan:
    """How to read a raster into the model: which bands, and how to scale them.

    ``kind`` is ``"stack11"`` (ME-Net's 11 channels as they are) or
    ``"sentinel2"`` (the six source bands, turned into reflectance by
    ``(value + offset) * scale`` and into channels on the device).
    """

    kind: str
    band_indexes: List[int]
    scale: float = 1.0
    offset: float = 0.0
    zero_is_nodata: bool = False
    notes: List[str] = field(default_factory=list)
    #: Things the user must see even in quiet runs (Reporter.warn), e.g. an assumed DN offset.
    warnings: List[str] = field(default_factory=list)
    #: Metadata tags every output of this input carries (how its values were read).
    tags: Dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return "; ".join(self.notes)


def plan_input(descriptions: Sequence[str], tags: Sequence[Dict[str, str]], dataset_tags: Dict[str, str],
               dtype: str, band_numbers: Optional[Sequence[int]] = None,
               dn_offset: Optional[float] = None, *, recipe: Recipe, name: str = "the input") -> InputPlan:
    """Decide how to read a raster for ``recipe`` (the model's).  ``band_numbers`` (1-based,
    in B2, B3, B4, B8, B11, B12 order) overrides what the file says — a recipe without B12
    takes the first five and ignores a sixth; ``dn_offset`` is used for integer DN when the
    product metadata carries none; both are checked (``checked_dn_offset``) and ``name`` (the raster's file
    name) says in messages where a bad one came from."""
    source_bands = list(recipe.source_bands)
    count = len(descriptions)
    labels = [band_label(d, t) for d, t in zip(descriptions, tags)]
    found = ", ".join(f"{i}:{d or '(no description)'}" + (f"={l}" if l else "")
                      for i, (d, l) in enumerate(zip(descriptions, labels), 1))
    if band_numbers:
        if len(band_numbers) == len(RECIPE_V1.source_bands) > len(source_bands):
            band_numbers = list(band_numbers)[:len(source_bands)]  # B12 given, not needed by this recipe
        if len(band_numbers) != len(source_bands):
            raise BandError(f"give {len(source_bands)} band numbers ({', '.join(source_bands)}), got {len(band_numbers)}")
        bad = [b for b in band_numbers if not 1 <= int(b) <= count]
        if bad:
            raise BandError(f"band numbers {bad} are outside 1..{count} of this raster")
        indexes, how = [int(b) for b in band_numbers], "given band numbers"
    else:
        by_label: Dict[str, int] = {}
        for i, label in enumerate(labels, 1):
            if label and label not in by_label:
                by_label[label] = i
        missing = [b for b in source_bands if b not in by_label]
        names = [normalise_name(d) for d in descriptions]
        if missing and count == N_CHANNELS and (names == recipe.channel_names or not any(labels)):
            return InputPlan("stack11", list(range(1, N_CHANNELS + 1)),
                             notes=[f"11-band raster read as a ready-made ME-Net stack ({', '.join(recipe.channel_names)}; "
                                    f"recipe {recipe.label})"])
        if missing:
            raise BandError(f"cannot identify Sentinel-2 bands {', '.join(missing)} in this {count}-band raster "
                            f"(found {found}); this model (channel recipe {recipe.label}) needs {', '.join(source_bands)} — set the band numbers "
                            f"explicitly, build a 6-band stack from the product with 'Prepare Sentinel-2 stack' "
                            f"(python -m menet_qgis prepare), or give an 11-band ME-Net stack")
        indexes, how = [by_label[b] for b in source_bands], "band descriptions"
    notes = [f"bands {', '.join(f'{b}=band {i}' for b, i in zip(source_bands, indexes))} (from {how})"]
    if dtype.startswith(("int", "uint")):
        meta_offset = metadata_dn_offset(dataset_tags, name)
        if meta_offset is None and dn_offset is not None:
            dn_offset = checked_dn_offset(dn_offset, "the DN offset option", "give -1000 or 0")
        warnings: List[str] = []
        if meta_offset is not None:
            offset, source = meta_offset, "product metadata"
            notes.append(f"integer DN: reflectance = (DN {offset:+g}) / 10000, offset from product metadata")
        elif dn_offset is not None:
            offset, source = float(dn_offset), "the DN offset parameter"
            notes.append(f"integer DN: reflectance = (DN {offset:+g}) / 10000, offset from the parameter")
        else:
            offset, source = 0.0, "assumed: no offset in the input's metadata and none given"
            notes.append("integer DN: reflectance = DN / 10000 — no offset in the metadata or parameters; "
                         "products of processing baseline 04.00 and later (after 25 Jan 2022) need offset -1000")
            warnings.append("integer DN with no offset in the metadata and no DN offset given: reading "
                            "reflectance = DN / 10000. Products of processing baseline 04.00 and later "
                            "(acquired after 25 Jan 2022) need DN offset -1000, and without it the "
                            "probabilities are wrong; set the DN offset (0 confirms none)")
        notes.append("DN 0 is no data")
        tags = {"MENET_INPUT_VALUES": "integer DN, reflectance = (DN + offset) / 10000",
                "MENET_DN_OFFSET": f"{offset:g} ({source})"}
        return InputPlan("sentinel2", indexes, DN_SCALE, offset, True, notes, warnings, tags)
    notes.append(f"{dtype} values read as surface reflectance as they are")
    return InputPlan("sentinel2", indexes, 1.0, 0.0, False, notes,
                     tags={"MENET_INPUT_VALUES": f"{dtype} surface reflectance, used as it is"})
