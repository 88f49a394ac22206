"""QGIS-free core: model, channels, tiling, raster I/O, inference, training, metrics.

Everything here imports and runs with plain Python (torch, torchvision,
rasterio, numpy); the ``processing`` package is the thin QGIS layer on top.
"""
