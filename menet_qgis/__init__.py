"""ME-Net mangrove extraction for QGIS: a Processing provider over a QGIS-free core.

QGIS calls ``classFactory``; ``qgis_process`` calls only ``initProcessing`` on
the returned object.  Nothing here imports torch, so the plugin still loads
(and says what is missing) when PyTorch is not installed.
"""


def classFactory(iface):  # noqa: N802 (QGIS's name)
    from .plugin import MENetPlugin
    return MENetPlugin(iface)
