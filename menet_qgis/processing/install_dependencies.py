"""Processing algorithm "Install ME-Net dependencies", id ``menet:installdependencies``.

Builds the plugin-managed Python environment the ME-Net worker runs in.  Runs
inside QGIS but imports nothing heavy: ``python -m venv``, pip and the
verification (which imports torch) are child processes whose output streams
into the log; Cancel kills them.  The environment in use stays in use until a
new one has passed its check (see ``environment_installer``).
"""
from __future__ import annotations

from qgis.core import QgsProcessingException, QgsProcessingOutputString

from .. import environment_installer as installer
from .. import options, user_paths
from .base import MENetAlgorithm

#: The installer's options in dialog order.
SHOWN = ("variant", "wheel_folder", "index_url", "fresh", "system_site_packages")


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
    PYTHON, VERSIONS = "PYTHON", "VERSIONS"
    guide = "install-dependencies"  # no engine job: the installer runs here, in QGIS's process (``execute``)

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
        self.add_options(options.by_name(options.INSTALL_DEPS, name) for name in SHOWN)
        self.addOutput(QgsProcessingOutputString(self.PYTHON, "Python of the environment"))
        self.addOutput(QgsProcessingOutputString(self.VERSIONS, "Verified package versions"))

    def job_parameters(self, parameters, context, values):
        return values

    def execute(self, job, feedback):
        try:
            return installer.install_environment(**job, reporter=FeedbackReporter(feedback))
        except installer.InstallError as exc:
            raise QgsProcessingException(str(exc)) from None

    def load_outputs(self, parameters, context, feedback, job, result):
        summary = result.verification.summary()
        feedback.pushInfo(("already installed and verified" if result.already_installed else "installed and verified")
                          + f" in {result.seconds:.0f} s: {summary}")
        return {self.PYTHON: str(result.python), self.VERSIONS: summary}
