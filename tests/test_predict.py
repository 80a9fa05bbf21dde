"""The commands that read a finished run, on a short real run: ``predict`` (labels for new texts, in input order,
in every output format, with the subspace's uncertainty, on 1 and 2 processes; every bad input one line, exit 2,
no file) and the calibration ``evaluate`` now prints."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from dist_subspace import evaluate as evaluate_command
from dist_subspace import predict as predict_command
from dist_subspace.data.tables import read_table
from dist_subspace.predict import row_writer
from tests.conftest import run_args
from tests.two_nodes import BIN, ROOT, free_port

pytestmark = pytest.mark.slow

N = 30
NAMES = ("negative", "positive")
PROBS = [f"prob_{name}" for name in NAMES]


@pytest.fixture(scope="module")
def run(small_assets, tmp_path_factory):
    """A short real run (4 steps) on the small assets."""
    from dist_subspace.train import main

    model_dir, data = small_assets
    out = tmp_path_factory.mktemp("predict") / "run"
    short = ("train.max_steps=4", "train.eval_every=4", "train.save_every=4", "eval.landscape=false")
    assert main(run_args(model_dir, data, out, *short, "eval.initial_test=false")) == 0
    return out


@pytest.fixture(scope="module")
def inputs(small_assets, tmp_path_factory):
    """The first N reviews as a CSV of texts only, and as JSON lines with their label column."""
    _, data = small_assets
    rows = [json.loads(line) for line in data.read_text().splitlines()[:N]]
    folder = tmp_path_factory.mktemp("inputs")
    pd.DataFrame({"text": [r["text"] for r in rows]}).to_csv(folder / "texts.csv", index=False)
    (folder / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"texts": [r["text"] for r in rows], "csv": folder / "texts.csv", "jsonl": folder / "labelled.jsonl"}


@pytest.fixture(scope="module")
def reference(run, inputs):
    """What evaluate's model outputs give for the same texts, scored as one list: the centroid's probabilities
    ``[N, C]`` and the 4 ensemble points' ``[4, N, C]``."""
    from dist_subspace.core import simplex
    from dist_subspace.evaluation.scoring import Query, mode_points, model_outputs
    from dist_subspace.training.reload import finished_run_config, load_finished_run

    loaded = load_finished_run(run, finished_run_config(run))
    try:
        examples = [{"text": t, "text_pair": None, "label": 0, "id": i} for i, t in enumerate(inputs["texts"])]
        points = [simplex.centroid_alpha(3), *mode_points(loaded.model, "ensemble", 4, "example_layer")]
        outputs = model_outputs(loaded.model, loaded.engine, [Query(examples, p) for p in points], loaded.collator, 16)
    finally:
        loaded.end()
    probs = torch.stack(outputs).softmax(-1).double().numpy()
    return {"centroid": probs[0], "ensemble": probs[1:]}


def predict(*args) -> int:
    return predict_command.main([str(a) for a in args])


@pytest.fixture(scope="module")
def ensemble_one(run, inputs, tmp_path_factory):
    """``--mode ensemble:4 --chunk 16`` on one process, as CSV."""
    out = tmp_path_factory.mktemp("ensemble") / "one.csv"
    assert predict(run, "--data", inputs["csv"], "--out", out, "--mode", "ensemble:4", "--chunk", 16) == 0
    return out


def test_centroid_predictions_in_input_order_equal_the_model_outputs(run, inputs, reference, tmp_path, capsys):
    out = tmp_path / "labels.csv"
    assert predict(run, "--data", inputs["csv"], "--out", out) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["label", *PROBS] and len(frame) == N
    probs = frame[PROBS].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-9)
    want = reference["centroid"]
    assert np.ptp(want[:, 1]) > 1e-3  # the texts score differently, so row order shows
    np.testing.assert_allclose(probs, want, atol=1e-5)  # row i is input i
    assert frame["label"].tolist() == [NAMES[i] for i in want.argmax(1)]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    capsys.readouterr()
    assert predict(run, "--data", inputs["jsonl"]) == 0  # JSON lines in, JSON lines on stdout; the label column warns
    printed = capsys.readouterr()
    rows = [json.loads(line) for line in printed.out.splitlines()]
    assert [r["label"] for r in rows] == frame["label"].tolist()
    np.testing.assert_allclose([[r[p] for p in PROBS] for r in rows], probs, atol=1e-9)
    warnings = [line for line in printed.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'label'" in warnings[0] and "ignored" in warnings[0]


def test_ensemble_gives_the_subspaces_uncertainty_whatever_the_chunk(run, inputs, reference, ensemble_one, tmp_path):
    frame = pd.read_csv(ensemble_one)
    assert list(frame.columns) == ["label", *PROBS, "spread", "disagreement"] and len(frame) == N
    points = reference["ensemble"]  # [4, N, C]
    mean = points.mean(0)
    np.testing.assert_allclose(frame[PROBS].to_numpy(), mean, atol=1e-5)
    assert frame["label"].tolist() == [NAMES[i] for i in mean.argmax(1)]
    share = frame["disagreement"].to_numpy() * 4
    np.testing.assert_allclose(share, np.round(share), atol=1e-9)
    assert set(np.round(share).astype(int).tolist()) <= {0, 1, 2, 3, 4}
    np.testing.assert_allclose(share, (points.argmax(-1) != mean.argmax(1)).sum(0), atol=1e-9)
    own = np.take_along_axis(points, mean.argmax(1)[None, :, None], -1)[..., 0]
    np.testing.assert_allclose(frame["spread"].to_numpy(), own.std(0, ddof=1), atol=1e-5)
    # The default chunk (all 30 inputs at once), as Parquet: the same predictions.
    whole = tmp_path / "whole.parquet"
    assert predict(run, "--data", inputs["csv"], "--out", whole, "--mode", "ensemble:4") == 0
    other, columns = pd.read_parquet(whole), [*PROBS, "spread", "disagreement"]
    assert other["label"].tolist() == frame["label"].tolist()
    np.testing.assert_allclose(other[columns].to_numpy(), frame[columns].to_numpy(), atol=1e-5)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("missing_column", "columns present: ['body', 'label']"),
        ("empty_file", "is empty"),
        ("header_only", "holds no rows"),
        ("not_a_run", "is not a run folder"),
        ("unreadable", "line 2 is not valid JSON"),
        ("unknown_extension", "unsupported type '.txt'"),
        ("unknown_out_extension", "unknown extension '.xlsx'"),
        ("not_a_mode", "sampled:S scores S separate models"),
    ],
)
def test_bad_inputs_are_one_line_exit_2_and_leave_no_file(run, tmp_path, capsys, case, expect):
    data, folder, out = tmp_path / "in.csv", run, tmp_path / "out" / "labels.csv"
    out.parent.mkdir()
    data.write_text("text\nthe film was great\n")
    extra = []
    if case == "missing_column":
        data.write_text("body,label\nthe film was great,positive\n")
    elif case == "empty_file":
        data.write_text("")
    elif case == "header_only":
        data.write_text("text\n")
    elif case == "not_a_run":
        folder = tmp_path
    elif case == "unreadable":
        data = tmp_path / "in.jsonl"
        data.write_text('{"text": "fine"}\n{"text": "cut sh')
    elif case == "unknown_extension":
        data = tmp_path / "in.txt"
        data.write_text("the film was great\n")
    elif case == "unknown_out_extension":
        out = out.with_suffix(".xlsx")
    else:
        extra = ["--mode", "sampled:2"]
    capsys.readouterr()
    assert predict(folder, "--data", data, "--out", out, *extra) == 2
    assert expect in _one_line_error(capsys)
    assert list(out.parent.iterdir()) == []


def test_from_the_shell_a_bad_input_exits_2_in_one_line(run, tmp_path):
    data = tmp_path / "in.csv"
    data.write_text("review\nthe film was great\n")
    out = tmp_path / "labels.csv"
    command = [sys.executable, "-m", "dist_subspace", "predict", str(run), "--data", str(data), "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: --data {str(data)!r}: no column 'text' (the run's data.text_field); columns present: ['review']"
    ]
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_row_writer_writes_each_format_and_leaves_nothing_when_it_fails(tmp_path, suffix):
    rows = [{"label": "positive", "prob_negative": 0.25, "prob_positive": 0.75}]
    out = tmp_path / f"out{suffix}"
    with row_writer(out) as write:
        write(rows)
        write([{**rows[0], "label": "negative"}])
        assert not out.exists()  # only the temporary file, until the end
    back = read_table(out)
    assert back["label"].tolist() == ["positive", "negative"] and back["prob_positive"].tolist() == [0.75, 0.75]
    failed = tmp_path / f"failed{suffix}"
    with pytest.raises(RuntimeError), row_writer(failed) as write:
        write(rows)
        raise RuntimeError("a fault half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_evaluate_prints_the_calibration_of_the_mode(run, tmp_path, capsys):
    plot = tmp_path / "reliability.png"
    capsys.readouterr()
    assert evaluate_command.main([str(run), "--mode", "ensemble:3", "--plot", str(plot)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    calibration = {"nll", "brier", "ece"}
    selective = {"selective_accuracy_disagreement", "selective_accuracy_centroid", "selective_coverage"}
    assert {"metric", "value", "mode", "split", "n", "accuracy", "plot", *calibration, *selective} <= set(result)
    assert result["n"] == 41 and result["selective_coverage"] == 0.8
    assert result["nll"] > 0 and 0 <= result["brier"] <= 1 and 0 <= result["ece"] <= 1
    for key in selective - {"selective_coverage"}:
        assert result[key] * 33 == pytest.approx(round(result[key] * 33))  # a share of the 33 = ceil(0.8 * 41) kept
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert evaluate_command.main([str(run), "--mode", "centroid", "--split", "dev"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calibration <= set(result) and not selective & set(result)


@pytest.mark.distributed
def test_two_processes_write_the_file_one_process_writes(run, inputs, ensemble_one, tmp_path):
    out = tmp_path / "two.csv"
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    args = [str(run), "--data", str(inputs["csv"]), "--out", str(out), "--mode", "ensemble:4", "--chunk", "16"]
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # none left from this process
    env = {k: v for k, v in os.environ.items() if k not in launcher} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [*torchrun, "-m", "dist_subspace.predict", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = pd.read_csv(ensemble_one), pd.read_csv(out)
    assert list(two.columns) == list(one.columns) and two["label"].tolist() == one["label"].tolist()
    np.testing.assert_allclose(two.drop(columns="label").to_numpy(), one.drop(columns="label").to_numpy(), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.csv"]
