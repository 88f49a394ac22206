"""The command line: stage table, predict over several inputs, one-line errors."""
import json
import subprocess
import sys

from helpers import ROOT, read, write_s2


def cli(*args):
    return subprocess.run([sys.executable, "-m", "menet_qgis", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_stages_prints_the_table():
    proc = cli("stages")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["stage", "torchvision"]
    assert any(l.startswith("stage5") and "layer4" in l and "8×8×2048" in l for l in lines)
    assert any(l.startswith("stage4") and "16×16×1024" in l for l in lines)


def test_predict_two_inputs(untrained_path, tmp_path):
    a, b = write_s2(tmp_path / "north.tif", 60, 70), write_s2(tmp_path / "south.tif", 50, 40, seed=2)
    proc = cli("predict", a, b, "--model", untrained_path, "--out-dir", tmp_path / "out", "--window", 64,
               "--overlap", 32, "--stages", "stage2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert [s["probability"] for s in summary] == [str(tmp_path / "out" / "north_probability.tif"),
                                                   str(tmp_path / "out" / "south_probability.tif")]
    assert read(summary[1]["probability"]).shape == (1, 50, 40)
    assert (tmp_path / "out" / "north_probability_stage2.tif").is_file()


def test_errors_are_one_line_and_leave_nothing(untrained_path, tmp_path):
    bad = tmp_path / "x.tif"
    bad.write_text("nope")
    proc = cli("predict", bad, "--model", untrained_path, "--out-dir", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("menet_qgis: error:")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    proc = cli("predict", write_s2(tmp_path / "ok.tif", 20, 20), "--model", tmp_path / "none.pt", "--out-dir", tmp_path)
    assert proc.returncode == 2 and "model file not found" in proc.stderr


def test_every_command_prints_its_help():
    """The generated arguments render (argparse formats help texts with %: a stray one breaks --help)."""
    for command in ("stages", "predict", "train", "export", "prepare", "batch", "assess", "install-deps",
                    "install-model", "worker"):
        proc = cli(command, "--help")
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: python -m menet_qgis {command}"), proc.stderr
