"""Rasters in and out: reading Sentinel-2 inputs, band plans, products, polygons, atomic writes."""
