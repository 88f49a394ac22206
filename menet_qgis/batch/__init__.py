"""Many scenes at once on Dask distributed: resumable, fault-tolerant, the same engine.

Python API::

    from menet_qgis.batch import BatchOptions, run_batch
    manifest = run_batch(["scenes/*.tif", "catalog.json"], "out", "menet_coasts_v2.onnx",
                         BatchOptions(workers=2, engine_options={"runtime": "openvino"}))

``model`` None = the default model, as for Extract; each scene goes through
``jobs.extract`` (the same model loading, runtime and precision choice).

``inputs`` and ``manifest`` are plain Python; only ``runner`` imports Dask, and
it is imported here lazily, so nothing in the QGIS plugin's process loads Dask.
"""

__all__ = ["BatchOptions", "run_batch"]


def __getattr__(name):
    if name in __all__:
        from . import runner
        return getattr(runner, name)
    raise AttributeError(name)
