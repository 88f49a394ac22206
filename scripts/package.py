"""Builds the release files in dist/ (``make package``); the ZIPs with the standard library only.

- ``menet_coasts_v2.onnx`` + ``.sha256``: the default model as the asset that runs everywhere
  (ONNX Runtime or OpenVINO on the CPU, no torch): probability and every stage map, the model
  record (recipe, PCA, normalisation, window, threshold, source sha256) in its metadata, weights
  stored in fp16 (exactly the ``.pt``'s), so it is no bigger than the ``.pt``.  Exporting needs
  torch and onnx: ``--export-python`` (``make package`` passes the checkout's .venv) runs
  ``python -m menet_qgis export``.  The export is deterministic, so its sha256 must equal the one
  the plugin ships (``resources/models/menet_coasts_v2.onnx.sha256``, which *Install model*
  checks); ``--record-asset-hash`` writes that file when the model or the exporter changed on purpose.
- ``menet_qgis-<version>.zip``: the plugin for *Install from ZIP* and the QGIS plugin repository,
  without weights (the repository refuses uploads over 25 MB), with ``LICENSE``.
- ``menet_coasts_v2.pt`` + ``.sha256``: the torch checkpoint, for training, fine-tuning and CUDA GPUs.
- ``menet_qgis-<version>-with-model.zip``: the plugin with the ``.onnx`` asset inside, for offline
  machines: it maps with any engine variant, torch or not.  The ``.pt`` stays out (it would double the
  ZIP for what only training or a CUDA GPU needs, and *Install model* takes it from a file offline too).

Each file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file by the system python3: the package's own stdlib helpers
from menet_qgis.core.files import file_sha256  # noqa: E402
from menet_qgis.resources import DEFAULT_MODEL_BASE  # noqa: E402
from menet_qgis.version import read_metadata_version  # noqa: E402

PLUGIN = "menet_qgis"
MODEL_STEM = DEFAULT_MODEL_BASE
MODEL_NAME = f"{MODEL_STEM}.pt"
ASSET_NAME = f"{MODEL_STEM}.onnx"
MODELS = ROOT / "resources" / "models"
#: The QGIS plugin repository's upload limit.
REPOSITORY_LIMIT_BYTES = 25 * 1000 * 1000
SKIP_DIRS = {"__pycache__", ".pytest_cache", "tests"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".pt", ".onnx", ".pth")


def version() -> str:
    found = read_metadata_version(ROOT / "metadata.txt")
    if not found:
        raise SystemExit("package: metadata.txt has no version=")
    return found


def plugin_files():
    """(path on disk, name in the ZIP) for the plugin: the package, metadata.txt, LICENSE, resources
    without weights (the shipped .sha256 files included: Install model checks downloads against them)."""
    yield ROOT / "metadata.txt", f"{PLUGIN}/metadata.txt"
    if (ROOT / "LICENSE").is_file():
        yield ROOT / "LICENSE", f"{PLUGIN}/LICENSE"
    for base, prefix in ((ROOT / PLUGIN, PLUGIN), (ROOT / "resources", f"{PLUGIN}/resources")):
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(base)
            if path.is_dir() or SKIP_DIRS & set(rel.parts) or path.name.startswith("."):
                continue
            if path.suffix in SKIP_SUFFIXES:
                continue
            yield path, f"{prefix}/{rel.as_posix()}"


def shipped_sha256(name: str):
    """The hash the plugin ships for ``name`` (resources/models/<name>.sha256), or None."""
    path = MODELS / f"{name}.sha256"
    return path.read_text().split()[0] if path.is_file() else None


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


def write_sha256(path: Path) -> Path:
    sidecar = path.with_name(f"{path.name}.sha256")
    sidecar.write_text(f"{file_sha256(path)}  {path.name}\n")
    return sidecar


def export_asset(model: Path, dist: Path, export_python: str, record_hash: bool, any_hash: bool = False) -> Path:
    """dist/menet_coasts_v2.onnx, exported from ``model`` unless dist already holds the shipped bytes;
    its sha256 must be the one the plugin ships (or is recorded as such with ``record_hash``; or, with
    ``any_hash``, may differ: another torch/onnx than the release's exports other bytes)."""
    target = dist / ASSET_NAME
    shipped = shipped_sha256(ASSET_NAME)
    if not (target.is_file() and shipped and not record_hash and file_sha256(target) == shipped):
        partial = dist / f".{ASSET_NAME}.partial.onnx"
        command = [export_python, "-m", PLUGIN, "export", str(model), "--stages", "--out", str(partial)]
        try:
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        except OSError as exc:
            raise SystemExit(f"package: cannot run {export_python} to export {ASSET_NAME}: {exc.strerror}")
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"package: exporting {ASSET_NAME} with {export_python} failed ({last}); the export "
                             f"needs torch and onnx: run `make package` (it uses the checkout's .venv) or "
                             f"give --export-python")
        checked = json.loads(proc.stdout)["checked_max_difference"]
        print(f"exported {ASSET_NAME}: max |probability difference| against torch {checked:.1e}")
        os.replace(partial, target)
    digest = file_sha256(target)
    if record_hash:
        (MODELS / f"{ASSET_NAME}.sha256").write_text(f"{digest}  {ASSET_NAME}\n")
        print(f"recorded {digest} in resources/models/{ASSET_NAME}.sha256 (commit it)")
    elif digest != shipped and any_hash:
        print(f"package: {ASSET_NAME} exports to sha256 {digest}, not the shipped {shipped} (--any-asset-hash: "
              f"another torch or onnx than the release's); the ZIPs still ship the release's hash", file=sys.stderr)
    elif digest != shipped:
        raise SystemExit(f"package: {ASSET_NAME} exports to sha256 {digest}, but the plugin ships "
                         f"{shipped or 'no hash'} (resources/models/{ASSET_NAME}.sha256), so Install model "
                         f"would reject it. If the model, torch or onnx changed on purpose, rebuild with "
                         f"--record-asset-hash (make package PACKAGE_ARGS=--record-asset-hash) and commit the file")
    write_sha256(target)
    return target


def build(dist: Path, export_python: str = sys.executable, record_hash: bool = False, any_hash: bool = False) -> dict:
    dist.mkdir(parents=True, exist_ok=True)
    ver = version()
    model = MODELS / MODEL_NAME
    asset = None
    if model.is_file():
        digest = file_sha256(model)
        if shipped_sha256(MODEL_NAME) not in (None, digest):
            raise SystemExit(f"package: {MODEL_NAME} does not match {MODEL_NAME}.sha256; the plugin would reject it")
        asset = export_asset(model, dist, export_python, record_hash, any_hash)  # before the ZIPs: they ship its hash
    else:
        print(f"package: no {model} in this checkout: built the plugin ZIP only", file=sys.stderr)
    files = list(plugin_files())
    lean = write_zip(dist / f"{PLUGIN}-{ver}.zip", files)
    if lean.stat().st_size > REPOSITORY_LIMIT_BYTES:
        size = lean.stat().st_size
        lean.unlink()
        raise SystemExit(f"package: {lean.name} is {size / 1e6:.1f} MB, over the plugin "
                         f"repository's {REPOSITORY_LIMIT_BYTES / 1e6:.0f} MB limit")
    built = {"plugin": lean}
    if asset is None:
        return built
    built["asset"], built["asset.sha256"] = asset, asset.with_name(f"{ASSET_NAME}.sha256")
    copy_file(model, dist / MODEL_NAME)
    built["model"], built["model.sha256"] = dist / MODEL_NAME, write_sha256(dist / MODEL_NAME)
    built["offline"] = write_zip(dist / f"{PLUGIN}-{ver}-with-model.zip", files,
                                 [(asset, f"{PLUGIN}/resources/models/{ASSET_NAME}")])
    return built


def default_export_python() -> str:
    """The checkout's virtual environment (torch, onnx) when there is one, else this Python."""
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", default=str(ROOT / "dist"), help="output folder (default: dist/)")
    parser.add_argument("--export-python", default=default_export_python(),
                        help="the Python with torch and onnx that exports the .onnx asset (default: .venv's)")
    parser.add_argument("--record-asset-hash", action="store_true",
                        help=f"write the exported asset's sha256 to resources/models/{ASSET_NAME}.sha256 "
                             "(when the model or the exporter changed on purpose)")
    parser.add_argument("--any-asset-hash", action="store_true",
                        help="accept an export whose sha256 differs from the shipped one (a torch or onnx other "
                             "than the release's, e.g. a distribution's): for tests, never for a release")
    args = parser.parse_args(argv)
    built = build(Path(args.dist), args.export_python, args.record_asset_hash, args.any_asset_hash)
    for kind, path in built.items():
        print(f"{kind:13} {path}  {path.stat().st_size / 1e6:.1f} MB")
    print("QGIS: Plugins › Manage and Install Plugins › Install from ZIP; then run 'Install ME-Net dependencies' "
          f"and 'Install model' ({ASSET_NAME} runs without torch) from the Processing toolbox")
    return 0


if __name__ == "__main__":
    sys.exit(main())
