"""What a Dask scheduler or worker answers before any scene is sent to it: which menet_qgis it can import.

The runner ships ``installed_version`` *by value* (``cloudpickle.register_pickle_by_value``), so it runs
where menet_qgis is missing too — which is what it is there to find out.  Keep this module free of
imports from menet_qgis at module level.
"""


def installed_version():
    """The version of the menet_qgis this process imports, or None when it cannot import it."""
    try:
        from menet_qgis.version import version
    except ImportError:
        return None
    return version()
