"""The commands that only read a finished run (``evaluate``, ``predict``, ``generate``), on a short real run: they
start no experiment tracker (a run trained with one is read where its package is missing), refuse a mode the run
does not have before the backbone loads, print a refusal once (the main process), and let a bug keep its
traceback instead of turning it into a one-line exit 2."""

import json
import shutil

import pandas as pd
import pytest
import yaml

from dist_subspace import evaluate as evaluate_command
from dist_subspace import generate as generate_command
from dist_subspace import predict as predict_command
from dist_subspace.training.engine import Engine, tracker_installed
from tests.conftest import run_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(small_assets, tmp_path_factory):
    """A short real run (4 steps) on the small assets."""
    from dist_subspace.train import main

    model_dir, data = small_assets
    out = tmp_path_factory.mktemp("reading") / "run"
    short = ("train.max_steps=4", "train.eval_every=4", "train.save_every=4", "eval.landscape=false")
    assert main(run_args(model_dir, data, out, *short, "eval.initial_test=false")) == 0
    return out


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.csv"
    pd.DataFrame({"text": ["the film was great", "a dull story", "charming cast"]}).to_csv(path, index=False)
    return path


@pytest.fixture
def no_backbone(monkeypatch):
    """Loading the frozen model fails the test: a refusal must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(Engine, "load_backbone", refuse)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


def test_a_run_trained_with_a_tracker_whose_package_is_missing_is_still_read(run, texts, tmp_path, capsys):
    """``train.report_to=[comet_ml]`` (not installed here) and ``train.tensorboard=true`` in the run's config: every
    command that reads the run works, and no tracker writes anything."""
    assert not tracker_installed("comet_ml")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["train"].update(report_to=["comet_ml"], tensorboard=True)
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    capsys.readouterr()

    assert evaluate_command.main([str(copy), "--split", "dev"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 16
    out = tmp_path / "labels.csv"
    assert predict_command.main([str(copy), "--data", str(texts), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 3
    prompt = "Review: the film was great\nSentiment:"
    assert generate_command.main([str(copy), "--prompt", prompt, "--max-new-tokens", "2"]) == 0
    assert _error_lines(capsys) == []
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before  # no tensorboard/, no tracker files
    assert not (run / "tensorboard").exists()  # nor in train.output_dir, which names the original folder


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_vertex_beyond_the_runs_k_is_refused_before_the_backbone_loads(run, texts, capsys, no_backbone, command):
    capsys.readouterr()
    if command == "evaluate":
        assert evaluate_command.main([str(run), "--mode", "vertex:3"]) == 2
    else:
        assert predict_command.main([str(run), "--data", str(texts), "--mode", "vertex:3"]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "out of range for K=3" in lines[0] and "vertex:0 to vertex:2" in lines[0], lines


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_refusal_is_printed_by_the_main_process_only(run, tmp_path, texts, capsys, monkeypatch, command):
    """Every process meets the same bad input; only rank 0 says so (one line for the job, not one per rank)."""
    argv = [str(tmp_path)] + (["--data", str(texts)] if command == "predict" else [])
    main = evaluate_command.main if command == "evaluate" else predict_command.main
    for rank, printed in (("1", []), ("0", ["is not a run folder"])):
        monkeypatch.setenv("RANK", rank)
        capsys.readouterr()
        assert main(argv) == 2
        lines = _error_lines(capsys)
        assert len(lines) == len(printed) and all(p in line for p, line in zip(printed, lines, strict=True)), lines


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_bug_in_the_model_pass_keeps_its_traceback(run, texts, tmp_path, monkeypatch, command):
    """A ValueError or OSError raised by the code (not a refusal it meant) is not a one-line exit 2."""

    def bug(*args, **kwargs):
        raise ValueError("a bug, not a bad input")

    if command == "evaluate":
        monkeypatch.setattr(evaluate_command, "evaluate_with_outputs", bug)
        with pytest.raises(ValueError, match="a bug, not a bad input"):
            evaluate_command.main([str(run), "--split", "dev"])
    else:
        monkeypatch.setattr(predict_command, "prediction_rows", bug)
        out = tmp_path / "labels.csv"
        with pytest.raises(ValueError, match="a bug, not a bad input"):
            predict_command.main([str(run), "--data", str(texts), "--out", str(out)])
        assert not list(tmp_path.glob("*labels.csv"))  # no output file, not even the temporary one
    # The engine was ended all the same: a later run in this process starts clean.
    monkeypatch.undo()
    assert evaluate_command.main([str(run), "--split", "dev", "--mode", "centroid"]) == 0
