"""Processing algorithm "Install ME-Net dependencies", id ``menet:installdependencies``.

Builds the plugin-managed Python environment the ME-Net worker runs in.  Runs
inside QGIS but imports nothing heavy: ``python -m venv``, pip and the
verification (which imports torch) are child processes whose output streams
into the log; Cancel kills them.  The environment in use stays in use until a
new one has passed its check (see ``environment_installer``).
"""
from __future__ import annotations

from qgis.core import (QgsProcessingException, QgsProcessingOutputString, QgsProcessingParameterBoolean,
                       QgsProcessingParameterEnum, QgsProcessingParameterFile, QgsProcessingParameterString)

from .. import environment_installer as installer
from .. import user_paths
from .common import MENetAlgorithm, advanced

VARIANT_LABELS = {"cpu-light": "cpu-light — mapping on the CPU through ONNX Runtime, no PyTorch (~0.3 GB)",
                  "cpu": "cpu — everything on the CPU, PyTorch's CPU build from PyTorch's own index (~1.2 GB)",
                  "cuda": "cuda — everything on an NVIDIA GPU, PyTorch with CUDA (~5.7 GB)"}


class FeedbackReporter:
    """Installer/model-store reporter that writes to QgsProcessingFeedback."""

    def __init__(self, feedback):
        self.feedback = feedback

    def info(self, message):
        self.feedback.pushInfo(message)

    def warn(self, message):
        self.feedback.pushWarning(message)

    def progress(self, percent):
        self.feedback.setProgress(percent)

    def cancelled(self):
        return self.feedback.isCanceled()


class InstallDependenciesAlgorithm(MENetAlgorithm):
    VARIANT, WHEEL_FOLDER, INDEX_URL, FRESH, SYSTEM_SITE = "VARIANT", "WHEEL_FOLDER", "INDEX_URL", "FRESH", "SYSTEM_SITE"
    PYTHON, VERSIONS = "PYTHON", "VERSIONS"

    def name(self):
        return "installdependencies"

    def displayName(self):  # noqa: N802
        return "Install ME-Net dependencies"

    def shortDescription(self):  # noqa: N802
        return "Creates the Python environment ME-Net runs in (PyTorch or ONNX Runtime), in your QGIS profile"

    def shortHelpString(self):  # noqa: N802
        return (
            "<p>Creates a Python environment for ME-Net in your QGIS profile "
            f"(<i>{user_paths.managed_env_dir()}</i>) and installs its pinned requirements with pip. "
            "QGIS itself never loads PyTorch: ME-Net's algorithms run in this environment's Python.</p>"
            "<p><b>Variant</b>: <i>cpu-light</i> (the default) maps mangroves on the CPU through ONNX Runtime "
            "(smallest); <i>cpu</i> adds PyTorch's CPU build (stage layers, training) from PyTorch's own index "
            "(download.pytorch.org: when it cannot be reached the install stops at once and says so, rather than "
            "take PyPI's 5 GB CUDA build); <i>cuda</i> adds PyTorch with CUDA for an NVIDIA GPU (large "
            "download).</p>"
            "<p><b>Wheel folder</b> (offline machines): a folder of wheels made elsewhere with "
            "<i>pip download -r menet_qgis/requirements/&lt;variant&gt;.txt -d wheels</i>; nothing is "
            "downloaded. <b>Index URL</b>: a PyPI mirror to use instead.</p>"
            "<p>Running it again is quick when everything is installed; it re-checks the environment. "
            "It ends by importing every package in the new environment and reporting versions and the device "
            "PyTorch sees; only an environment that passed is used. A new variant is built beside the one in "
            "use and replaces it only once it has passed, so a cancelled or failed install leaves the installed "
            "environment as it was, still in use (both are on disk meanwhile).</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        labels = [VARIANT_LABELS[v] for v in installer.VARIANTS]
        self.addParameter(QgsProcessingParameterEnum(self.VARIANT, "Variant", labels,
                                                     defaultValue=installer.VARIANTS.index(installer.DEFAULT_VARIANT)))
        wheels = QgsProcessingParameterFile(self.WHEEL_FOLDER, "Wheel folder (offline)",
                                            behavior=QgsProcessingParameterFile.Behavior.Folder, optional=True)
        wheels.setHelp("A folder of wheels for machines without internet (pip --no-index --find-links); "
                       "empty = download")
        index = QgsProcessingParameterString(self.INDEX_URL, "Package index URL", optional=True)
        index.setHelp("A PyPI mirror to use instead of PyPI; empty = PyPI")
        fresh = QgsProcessingParameterBoolean(self.FRESH, "Rebuild even if up to date", False)
        fresh.setHelp("Build a new environment even when the installed one has the variant's packages (it stays "
                      "in use until the new one has passed its check)")
        system = QgsProcessingParameterBoolean(self.SYSTEM_SITE, "See system Python packages", False)
        system.setHelp("Let the environment see the system's Python packages (e.g. the distribution's "
                       "rasterio/GDAL); isolated by default")
        for param in [wheels, index] + advanced([fresh, system]):
            self.addParameter(param)
        self.addOutput(QgsProcessingOutputString(self.PYTHON, "Python of the environment"))
        self.addOutput(QgsProcessingOutputString(self.VERSIONS, "Verified package versions"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        variant = installer.VARIANTS[self.parameterAsEnum(parameters, self.VARIANT, context)]
        wheel_folder = self.parameterAsFile(parameters, self.WHEEL_FOLDER, context) or None
        index_url = self.parameterAsString(parameters, self.INDEX_URL, context).strip() or None
        try:
            result = installer.install_environment(
                variant, wheel_folder=wheel_folder, index_url=index_url,
                fresh=self.parameterAsBoolean(parameters, self.FRESH, context),
                system_site_packages=self.parameterAsBoolean(parameters, self.SYSTEM_SITE, context),
                reporter=FeedbackReporter(feedback))
        except installer.InstallError as exc:
            raise QgsProcessingException(str(exc)) from None
        verification = result.verification
        feedback.pushInfo(("already installed and verified" if result.already_installed else "installed and verified")
                          + f" in {result.seconds:.0f} s: {verification.summary()}")
        return {self.PYTHON: str(result.python), self.VERSIONS: verification.summary()}
