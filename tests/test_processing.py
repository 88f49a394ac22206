"""The algorithm inside QGIS: processing.run, loading into the project, batch rows, errors."""
import numpy as np
import pytest
from qgis.core import (QgsLayerTreeGroup, QgsProcessingContext, QgsProcessingException,
                       QgsProcessingFeedback, QgsProcessingOutputLayerDefinition, QgsProcessingUtils, QgsProject, QgsRasterLayer,
                       QgsSingleBandPseudoColorRenderer)

from helpers import read, s2_reflectance, write_raster, write_s2
from menet_qgis.core import raster_io

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
                   "menet:installdependencies", "menet:installmodel", "menet:preparesentinel2", "menet:trainmenet"]
    alg = menet_provider.algorithm("extractmangroves")
    assert "stage5" in alg.shortHelpString() and "8×8×2048" in alg.shortHelpString()


def test_processing_run_writes_georeferenced_probability(processing, untrained_path, tmp_path):
    src = write_s2(tmp_path / "in.tif", 100, 140)
    feedback = LogFeedback()
    result = processing.run(ALG, {"INPUT": str(src), "MODEL": str(untrained_path), "OUTPUT": str(tmp_path / "p.tif"),
                                  "STAGES": [1, 5], **FAST}, feedback=feedback)
    out = raster_io.raster_profile(result["OUTPUT"])
    inp = raster_io.raster_profile(src)
    assert (out["crs"], out["transform"], out["width"], out["height"]) == (inp["crs"], inp["transform"], 140, 100)
    assert sorted(p.rsplit("_", 1)[1] for p in result["STAGE_LAYERS"]) == ["stage1.tif", "stage5.tif"]
    log = "\n".join(feedback.lines)
    assert "device: CPU" in log and "windows:" in log and "batch size" in log and "UNTRAINED" in log


def test_advanced_engine_parameters_reach_the_engine(processing, untrained_path, tmp_path):
    """Runtime, threads and test-time flips chosen in the dialog are what the engine runs (its log says so)."""
    src = write_s2(tmp_path / "in.tif", 64, 64)
    feedback = LogFeedback()
    processing.run(ALG, {"INPUT": str(src), "MODEL": str(untrained_path), "OUTPUT": str(tmp_path / "p.tif"),
                         "RUNTIME": 1, "THREADS": 1, "TTA": True, **FAST}, feedback=feedback)
    log = "\n".join(feedback.lines)
    assert "runtime: torch (asked for)" in log and "device: CPU, 1 thread" in log
    assert "test-time flips: each window's probability is the mean over its 8 flips" in log


def load_like_processing(context, project, order):
    """What QGIS does with context.layersToLoadOnCompletion() after a run (any version): load each
    layer with its type hint, add it to the project, call its post-processor.  Done here on a real
    project so the test does not depend on the desktop's layer tree view."""
    items = sorted(context.layersToLoadOnCompletion().items(), key=lambda kv: order(kv[0]))
    for path, details in items:
        assert details.layerTypeHint == QgsProcessingUtils.LayerHint.Raster  # no "[OGR] Cannot open" first
        layer = QgsRasterLayer(path, details.name, "gdal")
        assert layer.isValid(), path
        project.addMapLayer(layer)
        details.postProcessor().postProcessLayer(layer, context, QgsProcessingFeedback())


@pytest.mark.parametrize("stages_first", [False, True])
def test_results_load_styled_and_stage_layers_grouped(processing, untrained_path, tmp_path, stages_first):
    """Probability on top, named after the input, on a ramp whose 0 is not white; the stage group right
    below it, collapsed and unchecked, stages in order with a single-band stretch — whatever order
    QGIS loads the layers in."""
    project = QgsProject.instance()
    project.clear()
    project.addMapLayer(QgsRasterLayer(str(write_s2(tmp_path / "other.tif", 20, 20)), "older layer"))
    src = write_s2(tmp_path / "scene.tif", 64, 64)
    layer = QgsRasterLayer(str(src), "scene")
    project.addMapLayer(layer)
    context = QgsProcessingContext()
    context.setProject(project)
    out = str(tmp_path / "p.tif")
    params = {"INPUT": layer, "MODEL": str(untrained_path), "STAGES": [3, 0], **FAST,
              "OUTPUT": QgsProcessingOutputLayerDefinition(out, project)}  # = "open output file after running"
    processing.run(ALG, params, context=context)
    load_like_processing(context, project, lambda path: (path == out) == stages_first)
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
    project.clear()


def test_batch_of_two_inputs(processing, menet_provider, untrained_path, tmp_path):
    """What the batch dialog does: one algorithm, one parameter row per input."""
    alg = menet_provider.algorithm("extractmangroves")
    rows = [{"INPUT": str(write_s2(tmp_path / f"in{i}.tif", 70 + 10 * i, 80, seed=i)), "MODEL": str(untrained_path),
             "OUTPUT": str(tmp_path / f"out{i}.tif"), **FAST} for i in range(2)]
    for row in rows:
        context = QgsProcessingContext()
        ok, msg = alg.checkParameterValues(row, context)
        assert ok, msg
        results = processing.run(alg.id(), row, context=context)
        assert results["OUTPUT"] == row["OUTPUT"]
    shapes = [read(r["OUTPUT"]).shape for r in rows]
    assert shapes == [(1, 70, 80), (1, 80, 80)]


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
    with pytest.raises(QgsProcessingException, match="is the input raster itself"):
        processing.run(ALG, {"INPUT": str(src), "MODEL": str(untrained_path), "OUTPUT": str(tmp_path / "link.tif")})
    assert read(src).shape == (6, 20, 20)


def test_export_channels_help_lists_the_recipe():
    from menet_qgis.core.channels import RECIPE_V1, RECIPE_V2
    from menet_qgis.processing.export_channels import CHANNEL_HELP
    help_text = " ".join(f"{name} {formula}" for name, formula in CHANNEL_HELP)
    for recipe in (RECIPE_V1, RECIPE_V2):  # the help cannot drift from either recipe
        for c in recipe.channels[:-1]:
            assert c.name in help_text and c.formula in help_text, (recipe.label, c.name)
