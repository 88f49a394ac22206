"""The wheel of ``pip install .`` (pyproject.toml) holds what the plugin ZIP holds, from the same two places:
the version is ``metadata.txt``'s and the files are ``scripts/package.py``'s ``plugin_files`` (the package,
metadata.txt, LICENSE, resources without weights), so installed menet_qgis finds its metadata.txt,
requirement files and model hashes where the plugin has them."""
import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("menet_package", ROOT / "scripts" / "package.py")
package = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(package)


class BuildAsThePlugin(build_py):
    """The Python modules as usual, then every other file of the plugin ZIP, at its place there."""

    def run(self):
        shutil.rmtree(self.build_lib, ignore_errors=True)  # no file a checkout has since dropped
        super().run()
        for path, name in package.plugin_files():
            if path.suffix != ".py":
                target = Path(self.build_lib) / name
                self.mkpath(str(target.parent))
                self.copy_file(str(path), str(target))


(ROOT / "build").mkdir(exist_ok=True)
setup(version=package.version(), cmdclass={"build_py": BuildAsThePlugin},
      options={"egg_info": {"egg_base": "build"}})  # not menet_qgis.egg-info beside the package
