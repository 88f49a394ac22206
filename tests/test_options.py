"""Each option declared once (menet_qgis/options.py): the front ends generate their arguments and dialog
parameters from the declarations, the jobs read typed parameters with the declared defaults."""
import argparse
import ast
import re
import subprocess
import sys

import pytest

from helpers import ROOT
from menet_qgis import cli, jobs, options

PACKAGE = ROOT / "menet_qgis"

#: The command line before the options were declared once (``git show ec5757e:menet_qgis/cli.py``):
#: command -> flag -> default (and choices, required, repeated). ``--stages`` was a string split later.
OLD_FLAGS = {
    "stages": {"--window": 256},
    "predict": {"--model": None, "--out-dir": None, "--stages": "", "--stage-mode": "compact", "--window": 0,
                "--overlap": 32, "--batch-size": 0, "--device": "auto", "--runtime": "auto", "--threads": 0,
                "--precision": "auto", "--tta": False, "--bands": None, "--dn-offset": None, "--quiet": False,
                "--cloud-mask": "auto", "--mask-layer": None},
    "train": {"--tiles": None, "--out": None, "--epochs": 30, "--batch-size": 8, "--lr": 0.001, "--val-fraction": 0.2,
              "--seed": 0, "--device": "auto", "--imagenet-weights": None, "--history": None, "--recipe": 2,
              "--init": None, "--val-groups": [], "--holdout": [], "--val-names-from": None, "--resume": False,
              "--threads": 0, "--boundary-weight": 0.0, "--refine-width": None, "--train-on-clouds": False},
    "export": {"--out": None, "--stages": False},
    "prepare": {"--bounds": None, "--resampling": "bilinear", "--composite": "medoid", "--masks": None},
    "batch": {"--out-dir": None, "--model": None, "--workers": 0, "--scheduler": None, "--retries": 2,
              "--resources": "", "--stages": "", "--stage-mode": "compact", "--window": 0, "--overlap": 32,
              "--batch-size": 0, "--device": "auto", "--runtime": "auto", "--threads": 0, "--precision": "auto",
              "--tta": False, "--bands": None, "--dn-offset": None, "--no-progress": False, "--data-root": None,
              "--cloud-mask": "auto", "--mask-layer": None},
    "assess": {"--reference": None, "--area": None, "--threshold": None, "--image": None, "--tiles": None,
               "--model": None, "--report": None, "--table": None},
    "stac-map": {"--out": None, "--bounds": None, "--bounds-crs": "EPSG:4326", "--start": None, "--end": None,
                 "--cloud-limit": 40.0, "--max-items": 10, "--api-url": "https://earth-search.aws.element84.com/v1",
                 "--collection": "sentinel-2-l2a", "--composite": None, "--model": None, "--stages": "",
                 "--stage-mode": "compact", "--window": 0, "--overlap": 32, "--batch-size": 0, "--device": "auto",
                 "--runtime": "auto", "--threads": 0, "--precision": "auto", "--tta": False, "--cloud-mask": "auto",
                 "--mask-layer": None},
    "install-deps": {"--variant": "cpu-light", "--wheel-folder": None, "--index-url": None, "--env-dir": None,
                     "--python": None, "--system-site-packages": False, "--fresh": False},
    "install-model": {"--list": False, "--sha256": None, "--name": None, "--timeout": 60, "--allow-http": False},
    "worker": {},
}
OLD_CHOICES = {"--stage-mode": {"compact", "all"}, "--device": {"auto", "cuda", "cpu"},
               "--runtime": {"auto", "torch", "onnxruntime", "openvino"}, "--precision": {"auto", "fp32", "bf16"},
               "--recipe": {1, 2}, "--resampling": {"bilinear", "nearest"}, "--variant": {"cpu-light", "cpu", "cuda"}}
OLD_REQUIRED = {("predict", "--out-dir"), ("train", "--tiles"), ("train", "--out"), ("batch", "--out-dir"),
                ("stac-map", "--out"), ("stac-map", "--bounds"), ("stac-map", "--start"), ("stac-map", "--end")}
OLD_POSITIONALS = {"predict": ["inputs"], "export": ["model"], "prepare": ["folder", "out"], "batch": ["inputs"],
                   "assess": ["prediction"], "install-model": ["source"]}


def subparsers(parser=None):
    parser = parser or cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def flag_actions(parser):
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"}


def all_options():
    seen = {}
    for group in options.GROUPS.values():
        for option in group:
            seen[id(option)] = option
    return list(seen.values())


# --- a front end that declares an option by hand fails --------------------------------------------------------
def string_constants(tree):
    """Names (module or class level, also ``A, B = "A", "B"``) bound to string literals."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = []
                if isinstance(target, ast.Name):
                    pairs = [(target, node.value)]
                elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(target.elts, node.value.elts))
                for name, value in pairs:
                    if isinstance(name, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                        found[name.id] = value.value
    return found


def call_name(node):
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def first_argument(node, keyword):
    if node.args:
        return node.args[0]
    return next((k.value for k in node.keywords if k.arg == keyword), None)


def literal(node, constants):
    """The string a name argument stands for: a literal, NAME or self.NAME bound to one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Attribute):
        return constants.get(node.attr)
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


def test_the_cli_declares_no_option_by_hand():
    """Every flag comes from the declarations in options.py: cli.py may add positional arguments only
    (and argparse's own --version)."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    declared = {o.cli_flag for o in all_options() if "cli" in o.fronts}
    by_hand = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and call_name(node) == "add_argument" and not any(
                k.arg == "action" and getattr(k.value, "value", None) == "version" for k in node.keywords):
            flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            by_hand += [f"line {node.lineno}: {f}" + (" (a declared option)" if f in declared else "")
                        for f in flags if f.startswith("-")]
    assert not by_hand, "flags declared by hand in cli.py instead of options.py: " + ", ".join(by_hand)


def test_processing_declares_no_option_by_hand():
    """No algorithm builds a QgsProcessingParameter* for a declared option: processing/parameters.py
    generates them from options.py."""
    declared = {o.param_name for o in all_options() if "processing" in o.fronts}
    declared |= {name for name, _ in options.BAND_PARAMS}
    by_hand = []
    for path in sorted((PACKAGE / "processing").glob("*.py")):
        if path.name == "parameters.py":
            continue
        tree = ast.parse(path.read_text())
        constants = string_constants(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and call_name(node).startswith("QgsProcessingParameter"):
                name = literal(first_argument(node, "name"), constants)
                if name in declared:
                    by_hand.append(f"{path.name}:{node.lineno} {call_name(node)}({name})")
    assert not by_hand, "Processing parameters declared by hand: " + ", ".join(by_hand)


# --- the generated command line is the one users had -----------------------------------------------------------
def test_the_generated_parser_has_the_old_flags_and_defaults():
    commands = subparsers()
    assert set(commands) == set(OLD_FLAGS)
    for command, old in OLD_FLAGS.items():
        parser = commands[command]
        actions = flag_actions(parser)
        assert set(actions) == set(old), command
        for flag, default in old.items():
            action = actions[flag]
            if flag == "--stages" and default == "":  # was split into names later, now parsed into the list
                default = []
            assert action.default == default, (command, flag)
            assert type(action.default) is type(default) or {type(action.default), type(default)} <= {int, float}
            if flag in OLD_CHOICES and action.choices is not None:
                assert set(action.choices) == OLD_CHOICES[flag], (command, flag)
            assert action.required == ((command, flag) in OLD_REQUIRED), (command, flag)
        positionals = [a.dest for a in parser._actions if not a.option_strings]
        assert positionals == OLD_POSITIONALS.get(command, []), command


def test_the_generated_parser_reads_values_as_before():
    parse = cli.build_parser().parse_args
    args = parse(["predict", "a.tif", "--out-dir", "o", "--stages", "stage1,stage3", "--bands", "1,2,3,4,5",
                  "--dn-offset", "-1000", "--tta", "--batch-size", "4"])
    assert (args.stages, args.bands, args.dn_offset, args.tta, args.batch_size) == (
        ["stage1", "stage3"], [1, 2, 3, 4, 5], -1000.0, True, 4)
    args = parse(["train", "--tiles", "a", "--tiles", "b:weight=2", "--out", "m.pt", "--val-groups", "s:1,s:2",
                  "--holdout", "t", "--init", "x.pt", "--recipe", "1"])
    assert (args.tiles, args.output, args.val_groups, args.holdout_groups, args.init_from, args.recipe) == (
        ["a", "b:weight=2"], "m.pt", ["s:1", "s:2"], ["t"], "x.pt", 1)
    assert parse(["prepare", "f", "o.tif", "--bounds", "1,2,3.5,4"]).bounds == [1.0, 2.0, 3.5, 4.0]


@pytest.mark.parametrize("argv, words", [
    (["predict", "a.tif", "--out-dir", "o", "--batch-size", "-1"], "--batch-size: must be from 0 to 1024, got -1"),
    (["train", "--tiles", "a", "--out", "m.pt", "--val-fraction", "0.9"], "must be from 0.05 to 0.5, got 0.9"),
    (["batch", "a.tif", "--out-dir", "o", "--retries", "x"], "must be a whole number, got 'x'"),
])
def test_out_of_range_values_are_refused_by_the_parser(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_help_texts_leave_numbers_to_the_docs():
    """Measured gains and speed-ups drift: the help says it in words and points at docs/."""
    study_numbers = re.compile(r"\bF1\b|\d\s*%|\d(\.\d+)?\s*[x×]\s*(faster|slower)|[+±~]\s*0?\.\d|\d-\d\.\d")
    for option in all_options():
        assert not study_numbers.search(option.help), (option.name, option.help)
    for docs in re.findall(r"docs/[\w/.-]+\.md", " ".join(o.help for o in all_options())):
        assert (ROOT / docs).is_file(), docs


# --- one declaration, every front end ---------------------------------------------------------------------------
def test_batch_and_predict_take_the_same_engine_options():
    for command in ("predict", "batch"):
        groups = cli.SUBCOMMANDS[command][2]
        assert any(group is options.ENGINE for group in groups), command
        assert any(group is options.INPUT for group in groups), command
    commands = subparsers()
    predict, batch = flag_actions(commands["predict"]), flag_actions(commands["batch"])
    for option in options.ENGINE + options.INPUT:
        a, b = predict[option.cli_flag], batch[option.cli_flag]
        assert (a.dest, a.default, a.choices, a.help, a.required) == (b.dest, b.default, b.choices, b.help, b.required)


def test_engine_and_device_take_the_declared_defaults_and_choices():
    from dataclasses import fields

    from menet_qgis.core.inference import device, engine, runtimes
    declared = options.defaults(options.ENGINE)
    defaults = {f.name: f.default for f in fields(engine.EngineOptions)}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items() if k in declared} == declared
    assert set(declared) <= set(defaults)
    assert device.DEVICE_CHOICES is options.DEVICES
    assert runtimes.RUNTIMES is options.RUNTIMES and runtimes.PRECISIONS is options.PRECISIONS


def test_the_training_loop_defaults_are_the_declared_ones():
    """core.training.TrainOptions (what callers outside jobs use) starts from the same declared defaults."""
    from dataclasses import fields

    from menet_qgis.core.training.train import TrainOptions
    own = {f.name: f.default for f in fields(TrainOptions)}
    for option in options.TRAIN:
        if option.name in own and option.name != "recipe":  # the loop takes the Recipe itself
            declared = options.defaults([option])[option.name]
            assert (list(own[option.name]) if isinstance(own[option.name], tuple) else own[option.name]) == declared
    assert own["recipe"].version == options.by_name(options.TRAIN, "recipe").default


def test_batch_options_take_the_declared_defaults():
    from menet_qgis.batch import BatchOptions
    batch = BatchOptions()
    for name in ("workers", "retries"):
        assert getattr(batch, name) == options.by_name(options.BATCH, name).default


def test_declared_choices_match_the_modules_that_use_them():
    from menet_qgis import environment_installer
    from menet_qgis.core.model import channels
    from menet_qgis.core.model.stages import STAGE_NAMES
    assert options.VARIANTS == environment_installer.VARIANTS
    assert options.by_name(options.INSTALL_DEPS, "variant").default == environment_installer.DEFAULT_VARIANT
    assert set(options.RECIPE_VERSIONS) == set(channels.RECIPES)
    assert options.by_name(options.TRAIN, "recipe").default == channels.DEFAULT_RECIPE.version
    assert options.by_name(options.ENGINE, "stages").choices == tuple(STAGE_NAMES)


def test_declarations_are_complete():
    for option in all_options():
        if option.kind in ("choice", "multichoice"):
            assert option.choices, option.name
        if option.kind == "choice":
            assert option.default in option.choices, option.name
        if "processing" in option.fronts:
            assert option.label, option.name
        assert option.help and option.cli_flag.startswith("--") and option.param_name.isupper()
    for name, group in options.GROUPS.items():
        assert len({o.name for o in group}) == len(group), name
        assert len({o.cli_flag for o in group}) == len(group), name


@pytest.mark.integration
def test_options_import_the_standard_library_only():
    code = ("import sys; import menet_qgis.options; "
            "heavy = {'numpy', 'torch', 'rasterio', 'qgis', 'onnxruntime'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --- typed job parameters --------------------------------------------------------------------------------------
JOB_CLASSES = [jobs.ExtractJob, jobs.PrepareJob, jobs.ExportChannelsJob, jobs.TrainJob, jobs.AssessJob]
MINIMAL = {"extract": {"input": "a.tif", "output": "p.tif"}, "prepare": {"folder": "f", "output": "s.tif"},
           "export_channels": {"input": "a.tif", "output": "c.tif"}, "train": {"tiles": "t", "output": "m.pt"},
           "assess": {"prediction": "p.tif", "reference": "r.tif"}}


@pytest.mark.parametrize("job_class", JOB_CLASSES, ids=lambda c: c.JOB)
def test_unknown_job_keys_are_refused_in_one_line(job_class):
    with pytest.raises(ValueError, match=rf"^unknown {job_class.JOB} parameter overlapp; known: ") as error:
        job_class.from_dict(dict(MINIMAL[job_class.JOB], overlapp=32))
    assert "\n" not in str(error.value)


def test_jobs_run_refuses_unknown_keys_and_engine_options_before_any_work(tmp_path):
    out = tmp_path / "p.tif"
    with pytest.raises(ValueError, match="unknown extract parameter"):
        jobs.run("extract", {"input": "missing.tif", "output": str(out), "windw": 64}, None)
    with pytest.raises(ValueError, match=r"^unknown engine option windw \(did you mean window\?\); known: stages, stage_mode, window, "):
        jobs.run("extract", {"input": "missing.tif", "output": str(out), "options": {"windw": 64}}, None)
    with pytest.raises(ValueError, match="^overlap must be from 0 to 1024, got -32$"):
        jobs.run("extract", {"input": "missing.tif", "output": str(out), "options": {"overlap": -32}}, None)
    with pytest.raises(ValueError, match="^the train job needs output$"):
        jobs.run("train", {"tiles": str(tmp_path)}, None)
    with pytest.raises(ValueError, match=r"^recipe must be one of 2, 1, got 3$"):
        jobs.run("train", {"tiles": str(tmp_path), "output": str(tmp_path / "m.pt"), "recipe": 3}, None)
    assert not list(tmp_path.iterdir())


def test_job_defaults_are_the_declared_ones():
    train = jobs.TrainJob.from_dict({"tiles": "t", "output": "m.pt", "epochs": None, "device": None})
    for option in options.TRAIN:
        if option.name not in ("tiles", "output"):
            assert getattr(train, option.name) == options.defaults([option])[option.name], option.name
    assert train.tiles == ["t"]
    prepare = jobs.PrepareJob.from_dict(MINIMAL["prepare"])
    assert prepare.resampling == options.by_name(options.PREPARE, "resampling").default
    extract = jobs.ExtractJob.from_dict(dict(MINIMAL["extract"], options={"stages": ("stage1",), "tta": 1}))
    assert extract.engine_options().stages == ["stage1"] and extract.engine_options().tta is True
    assert jobs.ExtractJob.from_dict(dict(MINIMAL["extract"], options=None)).engine_options() == \
        jobs.ExtractJob.from_dict(MINIMAL["extract"]).engine_options()
