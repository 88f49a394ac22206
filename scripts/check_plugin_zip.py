"""The offline checks plugins.qgis.org runs on an uploaded plugin ZIP, so a refusal shows here first.

Written after the repository's own validator (QGIS-Django, ``plugins/validator.py``, read 2026-12):
size, archive hygiene, one top-level package folder, ``metadata.txt`` with the required keys, URL
syntax of ``tracker``/``repository``/``homepage``, a ``LICENSE`` file (mandatory since June 2024).
Re-implemented rather than imported: the validator is a Django form module (settings, requests,
translations) and also fetches every URL, which an offline build cannot do.

``--release`` adds what only a public release can satisfy: today ``tracker`` and ``repository`` say
"none yet" because the project has no public repository, and the validator refuses that.

    python3 scripts/check_plugin_zip.py dist/menet_qgis-<version>.zip [--release]
"""
from __future__ import annotations

import argparse
import configparser
import re
import sys
import zipfile
from pathlib import Path
from typing import List
from urllib.parse import urlparse

MAX_BYTES = 25_000_000
REQUIRED_KEYS = ("name", "description", "version", "qgisMinimumVersion", "author", "email", "about",
                 "tracker", "repository")
#: Keys the validator requires to be URLs with a scheme and a host (and that answer, checked online only).
URL_KEYS = ("tracker", "repository", "homepage")
#: The validator's placeholder URLs, refused as such.
PLACEHOLDER_URLS = {"tracker": "http://bugs", "repository": "http://repo", "homepage": "http://homepage"}
FORBIDDEN_DIRS = ("__MACOSX", ".git", "__pycache__")
PACKAGE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-_]+$")


def _is_url(value: str) -> bool:
    parsed = urlparse(value or "")
    return bool(parsed.scheme in ("http", "https") and parsed.netloc)


def problems(zip_path, release: bool = False) -> List[str]:
    """Every reason plugins.qgis.org would refuse the ZIP (offline checks; ``release`` adds the URLs)."""
    zip_path = Path(zip_path)
    found: List[str] = []
    if zip_path.stat().st_size > MAX_BYTES:
        found.append(f"{zip_path.name} is {zip_path.stat().st_size / 1e6:.1f} MB; the repository takes at most "
                     f"{MAX_BYTES / 1e6:.0f} MB")
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        return found + [f"{zip_path.name} is not a ZIP file"]
    with archive:
        names = archive.namelist()
        for name in names:
            if ".." in name or name.startswith("/"):
                found.append(f"path information in the archive: {name}")
            if ".pyc" in name:
                found.append(f"compiled Python in the archive: {name}")
            hit = [d for d in FORBIDDEN_DIRS if d in name.split("/")]
            if hit:
                found.append(f"forbidden folder {hit[0]} in the archive: {name}")
        bad = archive.testzip()
        if bad:
            found.append(f"corrupt member (CRC): {bad}")
        tops = sorted({n.split("/")[0] for n in names})
        if len(tops) != 1 or not names or "/" not in names[0]:
            return found + [f"the archive must hold one plugin folder, found {', '.join(tops) or 'nothing'}"]
        package = tops[0]
        if not PACKAGE_NAME.match(package):
            found.append(f"package folder name {package!r} must be ASCII letters, digits, '-' or '_'")
        for required in ("__init__.py", "metadata.txt", "LICENSE"):
            if f"{package}/{required}" not in names:
                found.append(f"{package}/{required} is missing")
        if f"{package}/metadata.txt" not in names:
            return found
        parser = configparser.ConfigParser()
        parser.optionxform = str
        try:
            parser.read_string(archive.read(f"{package}/metadata.txt").decode("utf-8"))
        except (configparser.Error, UnicodeDecodeError) as exc:
            return found + [f"metadata.txt does not parse: {exc}"]
    if not parser.has_section("general"):
        return found + ["metadata.txt has no [general] section"]
    meta = dict(parser.items("general"))
    found += [f"metadata.txt lacks {key}" for key in REQUIRED_KEYS if key not in meta]
    if "/" in meta.get("author", ""):
        found.append("author must not contain slashes")
    icon = meta.get("icon", "")
    if icon and f"{package}/{icon.lstrip('./')}" not in names:
        found.append(f"the icon {icon} named in metadata.txt is not in the archive")
    for key in URL_KEYS:
        value = meta.get(key, "").strip()
        if key == "homepage" and not value:
            continue  # optional
        if not _is_url(value) or value == PLACEHOLDER_URLS[key]:
            if release or key == "homepage":
                found.append(f"{key} must be a reachable http(s) URL, got {value!r}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zip", type=Path)
    parser.add_argument("--release", action="store_true",
                        help="also require what a public release needs (tracker and repository URLs)")
    args = parser.parse_args(argv)
    found = problems(args.zip, release=args.release)
    for line in found:
        print(f"check_plugin_zip: {line}", file=sys.stderr)
    if not found:
        print(f"check_plugin_zip: {args.zip.name} passes the repository's offline checks"
              + ("" if args.release else " (tracker/repository URLs not required before a public release)"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
