"""The "ME-Net" Processing provider (id ``menet``) and its setting "Python with PyTorch"."""
from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from ..resources import icon_path
from .assess_accuracy import AssessAccuracyAlgorithm
from .export_channels import ExportChannelsAlgorithm
from .extract_mangroves import ExtractMangrovesAlgorithm
from .install_dependencies import InstallDependenciesAlgorithm
from .install_model import InstallModelAlgorithm, register_settings, unregister_settings
from .map_from_stac import MapFromStacAlgorithm
from .prepare_sentinel2 import PrepareSentinel2Algorithm
from .train_menet import TrainMENetAlgorithm
from .engine_client import SETTING

ALGORITHMS = [
    ExtractMangrovesAlgorithm,
    PrepareSentinel2Algorithm,
    MapFromStacAlgorithm,
    ExportChannelsAlgorithm,
    TrainMENetAlgorithm,
    AssessAccuracyAlgorithm,
    InstallDependenciesAlgorithm,
    InstallModelAlgorithm,
]


def _processing_config():
    """processing's ProcessingConfig where the Processing plugin is there (desktop, qgis_process), else None."""
    try:
        from processing.core.ProcessingConfig import ProcessingConfig, Setting
    except ImportError:
        return None, None
    return ProcessingConfig, Setting


class MENetProvider(QgsProcessingProvider):
    def id(self):
        return "menet"

    def name(self):
        return "ME-Net"

    def longName(self):  # noqa: N802
        return "ME-Net mangrove extraction"

    def icon(self):
        return QIcon(str(icon_path()))

    def load(self):
        register_settings(self.name())
        """Adds "Python with PyTorch" under Processing › Options › Providers › ME-Net."""
        config, setting = _processing_config()
        if config is not None:
            config.settingIcons[self.name()] = self.icon()
            config.addSetting(setting(self.name(), SETTING, "Python with PyTorch (empty = automatic)", "",
                                      valuetype=setting.FILE))
            config.readSettings()
        self.refreshAlgorithms()
        return True

    def unload(self):
        unregister_settings()
        config, _setting = _processing_config()
        if config is not None and SETTING in config.settings:  # already gone when unloaded twice
            config.removeSetting(SETTING)

    def loadAlgorithms(self):  # noqa: N802
        for alg in ALGORITHMS:
            self.addAlgorithm(alg())
