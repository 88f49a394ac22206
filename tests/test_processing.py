"""The algorithm inside QGIS: processing.run, loading into the project, batch rows, errors."""
from pathlib import Path

import numpy as np
import pytest
from qgis.core import (QgsLayerTreeGroup, QgsLayerTreeRegistryBridge, QgsProcessingContext, QgsProcessingException,
                       QgsProcessingFeedback, QgsProcessingOutputLayerDefinition, QgsProcessingUtils, QgsProject,
                       QgsRasterLayer, QgsSingleBandPseudoColorRenderer)

from helpers import raster_profile, read, s2_reflectance, write_raster, write_s2

ALG = "menet:extractmangroves"
FAST = {"WINDOW_SIZE": 64, "OVERLAP": 32}


class LogFeedback(QgsProcessingFeedback):
    def __init__(self):
        super().__init__()
        self.lines = []

    def pushInfo(self, info):  # noqa: N802
        self.lines.append(info)

    def pushWarning(self, warning):  # noqa: N802
        self.lines.append(warning)

    def reportError(self, error, fatalError=False):  # noqa: N802,N803
        self.lines.append(error)


@pytest.fixture
def processing(menet_provider):
    import processing as qgis_processing
    return qgis_processing


def test_provider_lists_the_algorithm(menet_provider):
    ids = sorted(a.id() for a in menet_provider.algorithms())
    assert ids == ["menet:assessaccuracy", "menet:exportchannels", "menet:extractmangroves",
                   "menet:installdependencies", "menet:installmodel", "menet:mapfromstac", "menet:preparesentinel2",
                   "menet:trainmenet"]
    alg = menet_provider.algorithm("extractmangroves")
    assert "stage5" in alg.shortHelpString() and "8×8×2048" in alg.shortHelpString()


@pytest.mark.integration
def test_processing_run_writes_georeferenced_probability(processing, untrained_path, tmp_path):
    src = write_s2(tmp_path / "in.tif", 100, 140)
    feedback = LogFeedback()
    result = processing.run(ALG, {"INPUT": str(src), "MODEL": str(untrained_path), "OUTPUT": str(tmp_path / "p.tif"),
                                  "STAGES": [1, 5], **FAST}, feedback=feedback)
    out = raster_profile(result["OUTPUT"])
    inp = raster_profile(src)
    assert (out["crs"], out["transform"], out["width"], out["height"]) == (inp["crs"], inp["transform"], 140, 100)
    assert sorted(p.rsplit("_", 1)[1] for p in result["STAGE_LAYERS"]) == ["stage1.tif", "stage5.tif"]
    log = "\n".join(feedback.lines)
    assert "device: CPU" in log and "windows:" in log and "batch size" in log and "UNTRAINED" in log


@pytest.mark.integration
def test_advanced_engine_parameters_reach_the_engine(processing, untrained_path, tmp_path):
    """Runtime, threads and test-time flips chosen in the dialog are what the engine runs (its log says so)."""
    src = write_s2(tmp_path / "in.tif", 64, 64)
    feedback = LogFeedback()
    processing.run(ALG, {"INPUT": str(src), "MODEL": str(untrained_path), "OUTPUT": str(tmp_path / "p.tif"),
                         "RUNTIME": 1, "THREADS": 1, "TTA": True, **FAST}, feedback=feedback)
    log = "\n".join(feedback.lines)
    assert "runtime: torch (asked for)" in log and "device: CPU, 1 thread" in log
    assert "test-time flips: each window's probability is the mean over its 8 flips" in log


@pytest.fixture
def desktop_selects_added_layers():
    """What QGIS's main window does with every layer added to the tree (QgisApp::autoSelectAddedLayer):
    it becomes the active layer — so without care a run leaves its last loaded result active."""
    import qgis.utils
    bridge = QgsProject.instance().layerTreeRegistryBridge()

    def select(layers):
        qgis.utils.iface.setActiveLayer(layers[0])

    bridge.addedLayersToLayerTree.connect(select)
    yield qgis.utils.iface
    bridge.addedLayersToLayerTree.disconnect(select)
    QgsProject.instance().clear()


def run_and_load(alg_id, params):
    """A run as the algorithm and batch dialogs make it: a context from Processing's own
    ``dataobjects.createContext``, ``alg.run``, then QGIS's own post-processing
    (``processing.gui.Postprocessing.handleAlgorithmResults``), which loads each result into the
    project and calls its post-processor."""
    from processing.gui.Postprocessing import handleAlgorithmResults
    from processing.tools import dataobjects
    from qgis.core import QgsApplication
    feedback = LogFeedback()
    alg = QgsApplication.processingRegistry().algorithmById(alg_id)
    context = dataobjects.createContext(feedback)
    results, ok = alg.run(params, context, feedback)
    assert ok, "\n".join(feedback.lines)
    for path, details in context.layersToLoadOnCompletion().items():
        assert details.layerTypeHint == QgsProcessingUtils.LayerHint.Raster, path  # no "[OGR] Cannot open" first
    assert handleAlgorithmResults(alg, context, feedback, parameters=params)  # 3.22 also takes showResults (unused)
    return results


def tree_rows(group, depth=0):
    """The layer panel top to bottom: (depth, name, file name of a layer's source or None for a group)."""
    rows = []
    for child in group.children():
        is_group = isinstance(child, QgsLayerTreeGroup)
        rows.append((depth, child.name(), None if is_group else Path(child.layer().source()).name))
        if is_group:
            rows += tree_rows(child, depth + 1)
    return rows


@pytest.mark.integration
@pytest.mark.parametrize("stages_first", [False, True])
def test_results_load_styled_and_stage_layers_grouped(processing, untrained_path, tmp_path, stages_first,
                                                      desktop_selects_added_layers):
    """Probability on top, named after the input, on a ramp whose 0 is not white; the stage group right
    below it, collapsed and unchecked, stages in order with a single-band stretch — whatever order
    QGIS loads the layers in (it loads them by path: the stage folder decides).  Afterwards the input
    is the active layer again and a layer added next lands on top, not in the hidden group."""
    iface = desktop_selects_added_layers
    project = QgsProject.instance()
    project.clear()
    project.addMapLayer(QgsRasterLayer(str(write_s2(tmp_path / "other.tif", 20, 20)), "older layer"))
    src = write_s2(tmp_path / "scene.tif", 64, 64)
    layer = QgsRasterLayer(str(src), "scene")
    project.addMapLayer(layer)
    first, second_dir = (tmp_path / "a", tmp_path / "b") if not stages_first else (tmp_path / "b", tmp_path / "a")
    second_dir.mkdir()
    out = str(first / "p.tif")
    params = {"INPUT": layer.id(), "MODEL": str(untrained_path), "STAGES": [3, 0], "STAGE_FOLDER": str(second_dir),
              **FAST, "OUTPUT": QgsProcessingOutputLayerDefinition(out, project)}  # = "open output file after running"
    run_and_load(ALG, params)
    root = project.layerTreeRoot()
    top, second = root.children()[0], root.children()[1]
    assert top.layer().source() == out and top.name() == "scene mangrove probability"
    renderer = top.layer().renderer()
    assert isinstance(renderer, QgsSingleBandPseudoColorRenderer) and renderer.classificationMax() == 1.0
    zero = renderer.shader().rasterShaderFunction().colorRampItemList()[0].color
    assert min(zero.red(), zero.green(), zero.blue()) < 128  # 0 is dark: not the white canvas
    assert isinstance(second, QgsLayerTreeGroup) and second.name() == "ME-Net stages — scene"
    assert not second.isExpanded() and not second.itemVisibilityChecked()
    assert [child.name() for child in second.children()] == ["scene stage0", "scene stage3"]
    stage_renderer = second.children()[0].layer().renderer()
    assert isinstance(stage_renderer, QgsSingleBandPseudoColorRenderer) and stage_renderer.band() == 1
    assert stage_renderer.classificationMax() > stage_renderer.classificationMin()
    assert [n.name() for n in root.children()[2:]] == ["scene", "older layer"]
    assert iface.activeLayer().id() == layer.id(), f"active: {iface.activeLayer().name()}"
    project.addMapLayer(QgsRasterLayer(str(src), "added next"))
    assert root.children()[0].name() == "added next", tree_rows(root)


@pytest.mark.integration
def test_batch_rows_each_keep_their_own_stage_group(processing, untrained_path, tmp_path,
                                                    desktop_selects_added_layers):
    """The batch dialog's path, rows on the same input layer (so their stage groups share a name): each
    row's probability lands at the top level, each stage group holds only its own row's stages, the
    input is active afterwards.  Before the second row the insertion point is put inside the first
    row's stage group — where QGIS's rule put it once a stage was the last layer loaded, and where
    a user's click on a stage layer puts it — and the result still lands outside."""
    iface = desktop_selects_added_layers
    project = QgsProject.instance()
    project.clear()
    scene = QgsRasterLayer(str(write_s2(tmp_path / "scene.tif", 64, 64)), "scene")
    project.addMapLayer(scene)
    root = project.layerTreeRoot()
    for name, stages in (("b1", [5]), ("b2", []), ("b3", [0, 5])):
        params = {"INPUT": scene.id(), "MODEL": str(untrained_path), "STAGES": stages, **FAST,
                  "OUTPUT": QgsProcessingOutputLayerDefinition(str(tmp_path / f"{name}.tif"), project)}
        run_and_load(ALG, params)
        if name == "b1":
            group = root.children()[1]
            project.layerTreeRegistryBridge().setLayerInsertionPoint(
                QgsLayerTreeRegistryBridge.InsertionPoint(group, 0))
    stage_group = "ME-Net stages — scene"
    assert tree_rows(root) == [
        (0, "scene mangrove probability", "b3.tif"), (0, stage_group, None),
        (1, "scene stage0", "b3_stage0.tif"), (1, "scene stage5", "b3_stage5.tif"),
        (0, "scene mangrove probability", "b2.tif"),
        (0, "scene mangrove probability", "b1.tif"), (0, stage_group, None),
        (1, "scene stage5", "b1_stage5.tif"),
        (0, "scene", "scene.tif")]
    assert iface.activeLayer().id() == scene.id(), f"active: {iface.activeLayer().name()}"
    project.addMapLayer(QgsRasterLayer(str(tmp_path / "scene.tif"), "added next"))
    assert root.children()[0].name() == "added next", tree_rows(root)


@pytest.mark.integration
def test_nothing_loads_when_the_user_does_not_load_results(processing, untrained_path, tmp_path,
                                                         desktop_selects_added_layers):
    """The batch dialog's "Load layers on completion" off (or "Open output file after running"): the
    probability is not loaded, and its stage layers are not loaded on their own either."""
    project = QgsProject.instance()
    project.clear()
    scene = QgsRasterLayer(str(write_s2(tmp_path / "scene.tif", 64, 64)), "scene")
    project.addMapLayer(scene)
    run_and_load(ALG, {"INPUT": scene.id(), "MODEL": str(untrained_path), "STAGES": [5], **FAST,
                       "OUTPUT": QgsProcessingOutputLayerDefinition(str(tmp_path / "p.tif"), None)})
    assert (tmp_path / "p_stage5.tif").is_file()
    assert tree_rows(project.layerTreeRoot()) == [(0, "scene", "scene.tif")]


@pytest.mark.integration
@pytest.mark.parametrize("make_input, params, message", [
    (lambda d: write_raster(d / "rgb.tif", np.ones((3, 20, 20), "float32"), ["Red", "Green", "Blue"]), {},
     "cannot identify Sentinel-2 bands"),
    (lambda d: write_raster(d / "nocrs.tif", s2_reflectance(20, 20), ["Blue", "Green", "Red", "NIR", "SWIR1", "SWIR2"],
                            crs=None), {}, "no coordinate reference system"),
    (lambda d: write_s2(d / "ok.tif", 20, 20), {"MODEL": "/nonexistent/model.pt"}, "model file not found"),
    (lambda d: write_s2(d / "ok.tif", 20, 20), {"EXTENT": "0,10,0,10 [EPSG:32717]"}, "does not overlap"),
])
def test_bad_input_raises_clear_exception_and_writes_nothing(processing, untrained_path, tmp_path, make_input,
                                                             params, message):
    src = make_input(tmp_path)
    out = tmp_path / "out" / "p.tif"
    with pytest.raises(QgsProcessingException, match=message):
        processing.run(ALG, {"INPUT": str(src), "MODEL": str(untrained_path), "OUTPUT": str(out), **FAST, **params})
    assert not out.exists()


def test_not_a_raster_is_refused(processing, untrained_path, tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster")
    with pytest.raises(QgsProcessingException):
        processing.run(ALG, {"INPUT": str(bad), "MODEL": str(untrained_path), "OUTPUT": str(tmp_path / "p.tif")})


def test_window_parameters_checked_at_the_edge(menet_provider, untrained_path, tmp_path):
    alg = menet_provider.algorithm("extractmangroves")
    params = {"INPUT": str(write_s2(tmp_path / "in.tif", 20, 20)), "OUTPUT": str(tmp_path / "p.tif"),
              "WINDOW_SIZE": 250, "OVERLAP": 64}
    ok, message = alg.checkParameterValues(params, QgsProcessingContext())
    assert not ok and "multiple of 32" in message
    params.update(WINDOW_SIZE=256, BAND_RED=3)
    ok, message = alg.checkParameterValues(params, QgsProcessingContext())
    assert not ok and "Set the band parameters B2, B3, B4, B8 and B11" in message


def test_dialog_details_a_user_sees(menet_provider, tmp_path):
    """Labels short enough for batch headers, no label saying "optional" (QGIS adds it), stage options
    with stride and channels, a stage folder that is an input (no "[Skip output]"), tooltips."""
    for alg in menet_provider.algorithms():
        assert alg.shortDescription(), alg.id()
        for param in alg.parameterDefinitions():
            assert "optional" not in param.description().lower(), (alg.id(), param.description())
            assert len(param.description()) <= 32, (alg.id(), param.description())
    extract = menet_provider.algorithm("extractmangroves")
    options = extract.parameterDefinition("STAGES").options()
    assert options[5] == "stage5 — 1/32 resolution, 2048 channels"
    folder = extract.parameterDefinition("STAGE_FOLDER")
    assert not folder.isDestination() and "beside the probability" in folder.help()
    assert "<table" in extract.shortHelpString() and "<pre>" not in extract.shortHelpString()


#: What graphical models, batch dialogs and qgis_process calls address: each algorithm's parameters (in
#: dialog order) and outputs.  Renaming or reordering one breaks saved models and batch files.
INTERFACE = {
    "menet:assessaccuracy": (["PREDICTION", "REFERENCE_RASTER", "REFERENCE_POLYGONS", "AREA", "THRESHOLD", "IMAGE",
                              "TILE_FOLDER", "OUTPUT_TABLE", "OUTPUT_HTML"],
                             ["OUTPUT_TABLE", "OUTPUT_HTML", "F1", "IOU", "KAPPA", "OVERALL_ACCURACY", "BEST_THRESHOLD"]),
    "menet:exportchannels": (["INPUT", "MODEL", "BAND_BLUE", "BAND_GREEN", "BAND_RED", "BAND_NIR", "BAND_SWIR1",
                              "BAND_SWIR2", "DN_OFFSET", "OUTPUT"], ["OUTPUT"]),
    "menet:extractmangroves": (["INPUT", "MODEL", "EXTENT", "STAGES", "STAGE_MODE", "STAGE_FOLDER", "BAND_BLUE",
                                "BAND_GREEN", "BAND_RED", "BAND_NIR", "BAND_SWIR1", "BAND_SWIR2", "DN_OFFSET",
                                "WINDOW_SIZE", "OVERLAP", "BATCH_SIZE", "DEVICE", "RUNTIME", "THREADS", "PRECISION",
                                "TTA", "CLOUD_MASK", "MASK_LAYER", "OUTPUT"],
                               ["OUTPUT", "STAGE_LAYERS", "THRESHOLD", "QUALITY", "MASKED"]),
    "menet:installdependencies": (["VARIANT", "WHEEL_FOLDER", "INDEX_URL", "FRESH", "SYSTEM_SITE"],
                                  ["PYTHON", "VERSIONS"]),
    "menet:installmodel": (["SOURCE", "SHA256", "NAME", "ALLOW_HTTP"], ["OUTPUT"]),
    "menet:mapfromstac": (["EXTENT", "AREA", "START_DATE", "END_DATE", "CLOUD_LIMIT", "MAX_ITEMS", "API_URL",
                           "COLLECTION", "MODEL", "WINDOW_SIZE", "OVERLAP", "BATCH_SIZE", "DEVICE", "RUNTIME", "THREADS",
                           "PRECISION", "TTA", "CLOUD_MASK", "MASK_LAYER", "OUTPUT", "OUTPUT_COMPOSITE"],
                          ["OUTPUT", "OUTPUT_COMPOSITE", "THRESHOLD"]),
    "menet:preparesentinel2": (["INPUT_FOLDER", "MORE_DATES", "EXTENT", "CLIP_LAYER", "RESAMPLING", "COMPOSITE",
                                "OUTPUT"], ["OUTPUT"]),
    "menet:trainmenet": (["TILE_FOLDER", "IMAGES", "LABEL_RASTER", "LABEL_POLYGONS", "EPOCHS", "BATCH_SIZE",
                          "LEARNING_RATE", "VAL_FRACTION", "SEED", "DEVICE", "IMAGENET_WEIGHTS", "RECIPE", "INIT_MODEL",
                          "RESUME", "TRAIN_ON_CLOUDS", "OUTPUT_MODEL"],
                         ["OUTPUT_MODEL", "VAL_F1", "VAL_IOU", "VAL_KAPPA", "THRESHOLD"]),
}


def test_algorithms_keep_the_parameters_saved_models_use(menet_provider):
    interface = {alg.id(): ([p.name() for p in alg.parameterDefinitions()], [o.name() for o in alg.outputDefinitions()])
                 for alg in menet_provider.algorithms()}
    assert interface == INTERFACE


def test_options_left_alone_give_the_declared_defaults(menet_provider, tmp_path):
    """A dialog left at its defaults sends the job what options.py declares (what the CLI sends), and an
    Extract run's engine options are exactly the declared engine options."""
    from menet_qgis import options
    from menet_qgis.processing.parameters import values_from
    context = QgsProcessingContext()
    for alg in menet_provider.algorithms():
        assert values_from(alg, {}, context, alg.declared_options) == options.defaults(alg.declared_options), alg.id()
    extract = menet_provider.algorithm("extractmangroves")
    params = {"INPUT": str(write_s2(tmp_path / "in.tif", 20, 20)), "OUTPUT": str(tmp_path / "p.tif")}
    job = extract.job_parameters(params, context, values_from(extract, params, context, extract.declared_options))
    assert job["options"] == options.defaults(options.ENGINE)
    assert (job["model"], job["bands"], job["dn_offset"], job["bounds"], job["stage_dir"]) == (None,) * 5
    params.update(STAGES=[0, 5], STAGE_FOLDER=str(tmp_path / "stages"))
    job = extract.job_parameters(params, context, values_from(extract, params, context, extract.declared_options))
    assert extract.files_written(job) == [str(tmp_path / "p.tif"), str(tmp_path / "stages" / "p_stage0.tif"),
                                          str(tmp_path / "stages" / "p_stage5.tif"), str(tmp_path / "p_quality.tif")]


def test_train_output_is_never_a_temporary_file(menet_provider):
    from qgis.core import QgsProcessing
    train = menet_provider.algorithm("trainmenet")
    default = train.parameterDefinition("OUTPUT_MODEL").defaultValue()
    assert default.endswith(".pt") and QgsProcessing.TEMPORARY_OUTPUT not in default
    ok, message = train.checkParameterValues({"TILE_FOLDER": "/tmp", "OUTPUT_MODEL": QgsProcessing.TEMPORARY_OUTPUT},
                                             QgsProcessingContext())
    assert not ok and "temporary" in message


def test_assess_refuses_the_sentinel2_image_as_the_map(menet_provider, tmp_path):
    """The map combo box starts on the active layer, typically the Sentinel-2 image: refused before running."""
    assess = menet_provider.algorithm("assessaccuracy")
    image = write_s2(tmp_path / "scene.tif", 20, 20)
    ok, message = assess.checkParameterValues({"PREDICTION": str(image), "REFERENCE_RASTER": str(image),
                                               "OUTPUT_TABLE": str(tmp_path / "t.csv")}, QgsProcessingContext())
    assert not ok and "has 6 bands" in message


def test_output_may_not_overwrite_the_input(processing, untrained_path, tmp_path):
    src = write_s2(tmp_path / "in.tif", 20, 20)
    (tmp_path / "link.tif").symlink_to(src)
    with pytest.raises(QgsProcessingException, match="is the input .*in.tif: writing it would destroy the input"):
        processing.run(ALG, {"INPUT": str(src), "MODEL": str(untrained_path), "OUTPUT": str(tmp_path / "link.tif")})
    assert read(src).shape == (6, 20, 20)


def test_export_channels_help_lists_the_recipe():
    from menet_qgis.core.model.channels import RECIPE_V1, RECIPE_V2
    from menet_qgis.processing.export_channels import CHANNEL_HELP
    help_text = " ".join(f"{name} {formula}" for name, formula in CHANNEL_HELP)
    for recipe in (RECIPE_V1, RECIPE_V2):  # the help cannot drift from either recipe
        for c in recipe.channels[:-1]:
            assert c.name in help_text and c.formula in help_text, (recipe.label, c.name)
