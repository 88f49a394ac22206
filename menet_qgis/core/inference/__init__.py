"""Mapping a raster: the window grid and blender, the engine loop, runtimes, ONNX export, devices."""
