"""The "ME-Net" Processing provider (id ``menet``)."""
from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from ..resources import icon_path
from .assess_accuracy import AssessAccuracyAlgorithm
from .export_channels import ExportChannelsAlgorithm
from .extract_mangroves import ExtractMangrovesAlgorithm
from .install_dependencies import InstallDependenciesAlgorithm
from .install_model import InstallModelAlgorithm, register_settings, unregister_settings
from .prepare_sentinel2 import PrepareSentinel2Algorithm
from .train_menet import TrainMENetAlgorithm


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
        self.refreshAlgorithms()
        return True

    def unload(self):
        unregister_settings()

    def loadAlgorithms(self):  # noqa: N802
        for alg in (ExtractMangrovesAlgorithm(), PrepareSentinel2Algorithm(), ExportChannelsAlgorithm(),
                    TrainMENetAlgorithm(), AssessAccuracyAlgorithm(),
                    InstallDependenciesAlgorithm(), InstallModelAlgorithm()):
            self.addAlgorithm(alg)
