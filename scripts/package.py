"""Builds the release files in dist/ (``make package``), stdlib only.

- ``menet_qgis-<version>.zip``: the plugin for *Install from ZIP* and the QGIS plugin
  repository, without weights (the repository refuses uploads over 25 MB).
- ``menet_coasts_v2.pt`` + ``.sha256``: the default model as a separate asset,
  installed with "Install model".
- ``menet_qgis-<version>-with-model.zip``: the plugin with the model inside, for offline machines.

Each file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "menet_qgis"
MODEL_NAME = "menet_coasts_v2.pt"
#: The QGIS plugin repository's upload limit.
REPOSITORY_LIMIT_BYTES = 25 * 1000 * 1000
SKIP_DIRS = {"__pycache__", ".pytest_cache", "tests"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".pt", ".onnx", ".pth")


def version() -> str:
    for line in (ROOT / "metadata.txt").read_text().splitlines():
        if line.startswith("version="):
            return line.split("=", 1)[1].strip()
    raise SystemExit("package: metadata.txt has no version=")


def plugin_files():
    """(path on disk, name in the ZIP) for the plugin: the package, metadata.txt, resources without weights."""
    yield ROOT / "metadata.txt", f"{PLUGIN}/metadata.txt"
    for base, prefix in ((ROOT / PLUGIN, PLUGIN), (ROOT / "resources", f"{PLUGIN}/resources")):
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(base)
            if path.is_dir() or SKIP_DIRS & set(rel.parts) or path.name.startswith("."):
                continue
            if path.suffix in SKIP_SUFFIXES:
                continue
            yield path, f"{prefix}/{rel.as_posix()}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_zip(target: Path, files, extra=()) -> Path:
    partial = target.with_name(f".{target.name}.partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for path, name in files:
            z.write(path, name)
        for path, name in extra:  # fp16 weights barely compress: store them
            z.write(path, name, compress_type=zipfile.ZIP_STORED)
    os.replace(partial, target)
    return target


def copy_file(source: Path, target: Path) -> None:
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def build(dist: Path) -> dict:
    dist.mkdir(parents=True, exist_ok=True)
    ver = version()
    files = list(plugin_files())
    lean = write_zip(dist / f"{PLUGIN}-{ver}.zip", files)
    if lean.stat().st_size > REPOSITORY_LIMIT_BYTES:
        lean.unlink()
        raise SystemExit(f"package: {lean.name} is {lean.stat().st_size / 1e6:.1f} MB, over the plugin "
                         f"repository's {REPOSITORY_LIMIT_BYTES / 1e6:.0f} MB limit")
    built = {"plugin": lean}

    model = ROOT / "resources" / "models" / MODEL_NAME
    if not model.is_file():
        print(f"package: no {model} in this checkout: built the plugin ZIP only", file=sys.stderr)
        return built
    digest = sha256_of(model)
    shipped = (model.parent / f"{MODEL_NAME}.sha256")
    if shipped.is_file() and shipped.read_text().split()[0] != digest:
        raise SystemExit(f"package: {MODEL_NAME} does not match {shipped.name}; the plugin would reject it")
    copy_file(model, dist / MODEL_NAME)
    sidecar = dist / f"{MODEL_NAME}.sha256"
    sidecar.write_text(f"{digest}  {MODEL_NAME}\n")
    built["model"], built["sha256"] = dist / MODEL_NAME, sidecar
    built["offline"] = write_zip(dist / f"{PLUGIN}-{ver}-with-model.zip", files,
                                 [(model, f"{PLUGIN}/resources/models/{MODEL_NAME}")])
    return built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", default=str(ROOT / "dist"), help="output folder (default: dist/)")
    args = parser.parse_args(argv)
    built = build(Path(args.dist))
    for kind, path in built.items():
        print(f"{kind:8} {path}  {path.stat().st_size / 1e6:.1f} MB")
    print("QGIS: Plugins › Manage and Install Plugins › Install from ZIP; then run 'Install ME-Net dependencies' "
          "and 'Install model' from the Processing toolbox")
    return 0


if __name__ == "__main__":
    sys.exit(main())
