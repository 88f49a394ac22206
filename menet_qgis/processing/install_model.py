"""Processing algorithm "Install model", id ``menet:installmodel``.

Downloads (or copies) a model, verifies its sha256 and stores it in the user's
model store (the profile's, which the engine is pointed at); the installed
``menet_coasts_v2.onnx`` (or ``.pt``) becomes MODEL's default.
"""
from __future__ import annotations

from qgis.core import QgsProcessingException, QgsProcessingOutputFile, QgsProcessingParameterFile

from .. import model_store, options, user_paths
from ..resources import DEFAULT_ASSET_NAME, DEFAULT_CHECKPOINT_NAME
from .base import MENetAlgorithm
from .install_dependencies import FeedbackReporter

#: Processing › Options › Providers › ME-Net: where 'Install model' downloads from by default.
MODEL_URL_SETTING = "MENET_MODEL_URL"
#: SOURCE's file picker shows models first; "All files (*)" also makes the parameter accept any text, so a
#: typed URL passes QGIS's check (a filter with extensions alone refuses values without one, e.g. '...?id=3').
SOURCE_FILTER = "ME-Net models (*.onnx *.pt);;All files (*)"


def register_settings(provider_name: str) -> None:
    """Adds the download-location setting to the provider's options (call from the provider's load())."""
    from processing.core.ProcessingConfig import ProcessingConfig, Setting
    ProcessingConfig.addSetting(Setting(provider_name, MODEL_URL_SETTING,
                                        "Model download URL for 'Install model' (no public release yet)",
                                        model_store.default_model_url()))
    ProcessingConfig.readSettings()


def unregister_settings() -> None:
    """Removes the setting; a no-op when it is already gone (QGIS may unload the provider twice at exit,
    and an exception there becomes a modal error dialog that blocks QGIS from closing)."""
    from processing.core.ProcessingConfig import ProcessingConfig
    if MODEL_URL_SETTING in ProcessingConfig.settings:
        ProcessingConfig.removeSetting(MODEL_URL_SETTING)


def configured_model_url() -> str:
    """The provider setting, else MENET_MODEL_URL, else '' (the project has no public release yet)."""
    try:
        from processing.core.ProcessingConfig import ProcessingConfig
        value = ProcessingConfig.getSetting(MODEL_URL_SETTING)
    except Exception:  # noqa: BLE001 (Processing not loaded: plain default)
        value = None
    return (value or model_store.default_model_url() or "").strip()


class InstallModelAlgorithm(MENetAlgorithm):
    SOURCE, OUTPUT = "SOURCE", "OUTPUT"
    guide = "install-model"  # no engine job: the model store is filled here, in QGIS's process (``execute``)

    def name(self):
        return "installmodel"

    def displayName(self):  # noqa: N802
        return "Install model"

    def shortDescription(self):  # noqa: N802
        return "Downloads or copies an ME-Net model, checks its sha256 and stores it for every ME-Net algorithm"

    def shortHelpString(self):  # noqa: N802
        return (
            "<p>Installs an ME-Net model into your model store "
            f"(<i>{user_paths.installed_models_dir()}</i>), where every ME-Net algorithm looks for the default "
            f"model. Installed as <i>{DEFAULT_ASSET_NAME}</i> (runs with ONNX Runtime or OpenVINO, no PyTorch "
            f"needed) or <i>{DEFAULT_CHECKPOINT_NAME}</i> (PyTorch: training, fine-tuning, a CUDA GPU), it is "
            "the model 'Extract mangroves' uses when MODEL is empty: the .onnx, unless the engine runs PyTorch "
            "on a CUDA GPU and the .pt is installed.</p>"
            f"<p><b>Source</b>: a model file (pick it, e.g. <i>{DEFAULT_ASSET_NAME}</i> next to the plugin ZIP) "
            "or type an http(s) URL. Empty = the download location set in Processing › Options › Providers › "
            "ME-Net. <b>The project has no public model release yet</b>, so that location is empty until you "
            "set it.</p>"
            "<p><b>SHA256</b>: the expected checksum; empty = read from <i>&lt;source&gt;.sha256</i> beside it "
            "(or the checksum the plugin ships for its default model); the log says which. A file that does "
            "not match is not installed; a download that breaks off leaves nothing behind, and a model "
            "installed before stays as it was.</p>"
            "<p><b>Downloads</b> go over https (redirects to other hosts, e.g. a release CDN, are followed and "
            "logged; a redirect from https to plain http is refused). Plain http only from this machine, or with "
            "<b>Allow plain http</b> together with a SHA256 from a source you trust. A download may be at most "
            "2 GB; a partial file left by an install that was killed is removed by the next one.</p>"
            "<p>The log ends with the store's index: every installed model with its version, channel recipe, "
            "threshold, size, sha256 and source.</p>")

    def initAlgorithm(self, config=None):  # noqa: N802
        source = QgsProcessingParameterFile(self.SOURCE, "Source: model file or URL", fileFilter=SOURCE_FILTER,
                                            defaultValue=configured_model_url() or None, optional=True)
        source.setHelp("A model file (.onnx or .pt), or an http(s) URL typed in; empty = the configured "
                       "download location")
        self.addParameter(source)
        self.add_options(options.INSTALL_MODEL)
        self.addOutput(QgsProcessingOutputFile(self.OUTPUT, "Installed model"))

    def job_parameters(self, parameters, context, values):
        return {"source": self.parameterAsFile(parameters, self.SOURCE, context).strip() or configured_model_url(),
                **values}

    def execute(self, job, feedback):
        try:
            return model_store.install_model(job["source"], name=job["name"], sha256=job["sha256"],
                                             allow_http=job["allow_http"], reporter=FeedbackReporter(feedback))
        except model_store.ModelStoreError as exc:
            raise QgsProcessingException(str(exc)) from None

    def load_outputs(self, parameters, context, feedback, job, result):
        for line in model_store.listing_lines(result.path.parent):
            feedback.pushInfo(line)
        return {self.OUTPUT: str(result.path)}
