"""QGIS plugin entry: registers the ME-Net Processing provider, nothing else.

No GUI work here: ``qgis_process`` only ever calls ``initProcessing``.
"""
from qgis.core import QgsApplication


class MENetPlugin:
    def __init__(self, iface):
        self.iface = iface
        self.provider = None

    def initProcessing(self):  # noqa: N802 (QGIS's name)
        from .processing.provider import MENetProvider
        if self.provider is None:
            self.provider = MENetProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):  # noqa: N802
        self.initProcessing()

    def unload(self):
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
