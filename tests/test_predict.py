"""The commands that read a finished run, on a short real run: ``predict`` (labels for new texts, in input order,
in every output format, with the subspace's uncertainty, on 1 and 2 processes; the input streamed a chunk at a
time; every bad input one line, exit 2, no file) and the calibration ``evaluate`` now prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
    from dist_subspace.evaluation.points import Query, mode_points
    from dist_subspace.evaluation.scoring import model_outputs
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
        ("decoding_option", "--max-new-tokens and --num-beams are for a generation run; this run labels texts"),
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
    elif case == "decoding_option":
        extra = ["--max-new-tokens", "4"]
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
def test_two_processes_write_the_file_one_process_writes(run, inputs, reference, tmp_path):
    """3 points x chunks of 13, 13 and 4 inputs: 39 rows a pass do not split evenly over 2 processes, so one of
    them pads its share by repeating rows; each input must still come out once, in input order."""
    out = tmp_path / "two.csv"
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    args = [str(run), "--data", str(inputs["csv"]), "--out", str(out), "--mode", "ensemble:3", "--chunk", "13"]
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # none left from this process
    env = {k: v for k, v in os.environ.items() if k not in launcher} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [*torchrun, "-m", "dist_subspace.predict", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (13 * 3) % 2 == 1 and N % 13 == 4  # the padding path runs, and the last chunk is short
    two = pd.read_csv(out)
    assert len(two) == N  # each input once
    mean = reference["ensemble"][:3].mean(0)  # ensemble:3 draws the first 3 of ensemble:4's points: [N, C]
    np.testing.assert_allclose(two[PROBS].to_numpy(), mean, atol=1e-5)  # row i is input i
    assert two["label"].tolist() == [NAMES[i] for i in mean.argmax(1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.csv"]


# ---- streaming: one chunk of the input at a time --------------------------------------------------------------------
def _never_whole(monkeypatch, data) -> None:
    """Reading the file ``data`` whole (what read_table does) fails the test (the run's own data may be)."""
    from dist_subspace.data import tables

    read_whole = tables._read_table

    def whole(path):
        assert Path(path).resolve() != Path(data).resolve(), f"{path} was read whole"
        return read_whole(path)

    monkeypatch.setattr(tables, "_read_table", whole)


def test_the_input_streams_through_the_model_one_chunk_at_a_time(run, inputs, reference, tmp_path, monkeypatch):
    """The file is never read whole, no pass sees more than --chunk inputs, and the output is what one pass over
    the whole list gives, in input order."""
    from dist_subspace.evaluation import scoring

    _never_whole(monkeypatch, inputs["csv"])
    passes, model_outputs = [], scoring.model_outputs

    def counted(model, engine, queries, *args, **kwargs):
        passes.append(len(queries[0].examples))
        return model_outputs(model, engine, queries, *args, **kwargs)

    monkeypatch.setattr(scoring, "model_outputs", counted)
    out = tmp_path / "labels.csv"
    assert predict(run, "--data", inputs["csv"], "--out", out, "--chunk", 8) == 0
    assert passes == [8, 8, 8, 6]
    np.testing.assert_allclose(pd.read_csv(out)[PROBS].to_numpy(), reference["centroid"], atol=1e-5)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet", ".json"])
def test_inputs_are_read_a_chunk_at_a_time_in_every_format(tmp_path, monkeypatch, suffix):
    """Chunks of --chunk rows (the last one shorter), numbered by their row in the file, across the file's reads
    (of 5 rows here); only .json (one JSON document) is read whole. The label column is seen from the header (or
    the first rows of JSON)."""
    frame = pd.DataFrame({"label": ["positive"] * 11, "text": [f"review {i}, '1.50'" for i in range(11)]})
    path = tmp_path / f"in{suffix}"
    if suffix in (".csv", ".tsv"):
        frame.to_csv(path, index=False, sep="," if suffix == ".csv" else "\t")
    elif suffix == ".parquet":
        frame.to_parquet(path, row_group_size=4)
    else:
        frame.to_json(path, orient="records", lines=suffix == ".jsonl")
    if suffix != ".json":
        _never_whole(monkeypatch, path)
    from dist_subspace.data import tables

    monkeypatch.setattr(tables, "READ_ROWS", 5)
    inputs = predict_command.Inputs(path, "text", None, "label", 4)
    chunks = list(inputs)
    assert inputs.labelled and inputs.count() == 11 and [len(c) for c in chunks] == [4, 4, 3]
    assert [e["id"] for c in chunks for e in c] == list(range(11))
    assert [e["text"] for c in chunks for e in c] == frame["text"].tolist()


def test_a_bad_row_in_a_late_chunk_is_refused_before_the_model_loads(run, tmp_path, capsys, monkeypatch):
    from dist_subspace.training.engine import Engine

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(Engine, "load_backbone", refuse)
    data, out = tmp_path / "in.csv", tmp_path / "out" / "labels.csv"
    out.parent.mkdir()
    texts = [f"the film {i}" if i != 37 else " " for i in range(40)]
    pd.DataFrame({"text": texts, "source": "web"}).to_csv(data, index=False)
    capsys.readouterr()
    assert predict(run, "--data", data, "--out", out, "--chunk", 8) == 2
    assert "row 37 has an empty text in column 'text'" in _one_line_error(capsys)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("out_suffix", [".csv", ".parquet"])
def test_a_bad_row_met_after_output_started_leaves_no_file(run, inputs, tmp_path, capsys, monkeypatch, out_suffix):
    """The file changes after it was checked (a row with no text appended while the model loads): the row is met
    in the fourth chunk, after three were written: one line naming it, exit 2, nothing left in the folder."""
    from dist_subspace.training import reload

    data, out = tmp_path / "in.csv", tmp_path / "out" / f"labels{out_suffix}"
    out.parent.mkdir()
    pd.DataFrame({"text": inputs["texts"]}).to_csv(data, index=False)
    load = reload.load_finished_run

    def load_then_damage(*args, **kwargs):
        loaded = load(*args, **kwargs)
        with open(data, "a") as f:
            f.write('""\n')  # row 30: an empty text
        return loaded

    monkeypatch.setattr(reload, "load_finished_run", load_then_damage)
    capsys.readouterr()
    assert predict(run, "--data", data, "--out", out, "--chunk", 8) == 2
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()  # the progress bar's, then the error
    assert [line for line in lines if line.startswith("error")] == lines[-1:]
    assert "row 30 has an empty text in column 'text'" in lines[-1]
    assert list(out.parent.iterdir()) == []


class _TwoRanks:
    """Rank 0's view of a 2-process engine: ``gather_objects`` pairs this rank's object with the other's next."""

    def __init__(self, other: list) -> None:
        self.other = iter(other)

    def gather_objects(self, obj) -> list:
        return [obj, next(self.other)]


def test_the_processes_agree_on_every_chunk_before_its_pass():
    """One exchange per chunk: a refusal in any process, or a different number of rows, stops every process at that
    chunk (with the same error), so that none is left waiting in a collective the others never run."""
    from dist_subspace.core.config import ConfigError
    from dist_subspace.predict import agreed_chunks

    chunks = [[{"id": 0}, {"id": 1}], [{"id": 2}]]
    assert list(agreed_chunks(_TwoRanks([(2, None), (1, None), (None, None)]), chunks)) == chunks
    late = ConfigError("--data 'in.csv': row 2 has an empty text in column 'text'; fill or remove it")
    got = agreed_chunks(_TwoRanks([(2, None), (None, late)]), chunks)
    assert next(got) == chunks[0]
    with pytest.raises(ConfigError, match="row 2 has an empty text"):
        next(got)
    with pytest.raises(ConfigError, match=r"read different rows from row 2 on \(chunk sizes \[1, 3\], by rank\)"):
        list(agreed_chunks(_TwoRanks([(2, None), (3, None)]), chunks))


def test_a_failed_write_is_one_line_exit_1_and_leaves_no_file(run, inputs, tmp_path, capsys, monkeypatch):
    """A full disk while the output is written: a fault, not a bad input (exit 1, as training's), nothing left."""
    import errno

    def full_disk(kind, tmp, stack):
        tmp.write_text("")  # the temporary file exists, as a real writer makes it

        def write(rows):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return write

    from dist_subspace.data import writing

    monkeypatch.setattr(writing, "_file_writer", full_disk)
    out = tmp_path / "out" / "labels.csv"
    out.parent.mkdir()
    capsys.readouterr()
    assert predict(run, "--data", inputs["csv"], "--out", out, "--chunk", 8) == 1
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert [line for line in lines if line.startswith("error")] == lines[-1:]
    assert lines[-1] == f"error: --out {str(out)!r}: could not write (No space left on device)"
    assert list(out.parent.iterdir()) == []
