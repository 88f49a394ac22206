"""The base of every ME-Net algorithm: it owns the run, as QGIS's own ``GdalAlgorithm`` does.

An algorithm only declares its parameters (``initAlgorithm``, the shared options through
``add_options``) and maps values and results (``job_parameters``, ``load_outputs``); the run is
the template method ``processAlgorithm``.  Nothing here (or anywhere in the QGIS process) imports
torch or rasterio: the job runs in the engine process (``engine_client.run_job``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List

from qgis.core import QgsProcessingAlgorithm, QgsProcessingException
from qgis.PyQt.QtGui import QIcon

from ..core.files import InputError  # stdlib only
from ..resources import icon_path
from .engine_client import run_job
from .parameters import check_values, parameters_for, values_from

#: The documentation site as ``make docs`` builds it in a source checkout (a plugin ZIP has none).
DOCS_SITE = Path(__file__).resolve().parents[2] / "build" / "site"


class MENetAlgorithm(QgsProcessingAlgorithm):
    """Icon, fresh instances, the help link and the run shared by every ME-Net algorithm.

    ``processAlgorithm`` (a) reads the declared options the algorithm shows into a dict of job
    fields, (b) asks ``job_parameters`` for the job's parameters (paths, layers, those values),
    (c) runs ``job`` of ``jobs.py`` in the engine process (``execute``) and (d) returns what
    ``load_outputs`` makes of the job's result.
    """

    #: The function of ``jobs.py`` the engine process runs ("extract", "train", ...).
    job = ""
    #: The algorithm's page of the user guide (docs/guide/<guide>.md).
    guide = ""

    def __init__(self):
        super().__init__()
        #: The options of ``options.py`` this algorithm shows (``add_options``), in dialog order.
        self.declared_options: List = []

    def icon(self):
        return QIcon(str(icon_path()))

    def createInstance(self):  # noqa: N802
        return type(self)()

    def group(self):
        return ""  # every ME-Net algorithm sits at the top of the provider

    def groupId(self):  # noqa: N802
        return ""

    def helpUrl(self):  # noqa: N802
        """The algorithm's guide page where the documentation site was built (there is no public one)."""
        page = DOCS_SITE / "guide" / f"{self.guide}.html"
        return page.as_uri() if self.guide and page.is_file() else ""

    def add_options(self, options: Iterable) -> None:
        """Show those of the declared ``options`` (``options.py``) that Processing shows, as parameters
        generated from their declaration; ``processAlgorithm`` reads them back for ``job_parameters``."""
        for option in options:
            if "processing" not in option.fronts:
                continue
            for param in parameters_for(option):
                self.addParameter(param)
            self.declared_options.append(option)

    def checkParameterValues(self, parameters, context):  # noqa: N802
        problem = check_values(self, parameters, context, self.declared_options)
        if problem:
            return False, problem
        return super().checkParameterValues(parameters, context)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        values = values_from(self, parameters, context, self.declared_options)
        try:
            job = self.job_parameters(parameters, context, values)
        except InputError as exc:  # e.g. an output that is one of the inputs
            raise QgsProcessingException(str(exc)) from None
        result = self.execute(job, feedback)
        return self.load_outputs(parameters, context, feedback, job, result)

    def job_parameters(self, parameters, context, values: Dict) -> Dict:
        """The job's parameters: ``values`` (declared options by job field) plus the algorithm's own
        (paths of layers and files).  Bad input raises QgsProcessingException, before anything runs."""
        raise NotImplementedError

    def execute(self, job: Dict, feedback) -> Dict:
        """Run the job in the engine process; the files it writes are removed when it fails."""
        return run_job(self.job, job, feedback, outputs=self.files_written(job))

    def files_written(self, job: Dict) -> List[str]:
        """The files the job writes (the engine client removes them if the job fails or is cancelled)."""
        return [job["output"]] if job.get("output") else []

    def load_outputs(self, parameters, context, feedback, job: Dict, result: Dict) -> Dict:
        """The algorithm's outputs from the job's result (and layers to load into the project)."""
        raise NotImplementedError
