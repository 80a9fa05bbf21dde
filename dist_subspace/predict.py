"""Label new texts with a finished run: ``python -m dist_subspace.predict RUN_DIR --data FILE [--out FILE]``.

    python -m dist_subspace.predict runs/default --data new.csv --out labelled.csv
    python -m dist_subspace.predict runs/default --data new.jsonl --mode ensemble:8 > labelled.jsonl

``FILE`` is a ``.csv``, ``.tsv``, ``.json``/``.jsonl`` (JSON lines) or ``.parquet`` file holding the run's text
column(s): ``data.text_field`` (and ``data.text_pair_field``) of the run's ``config.yaml`` for a run on a local
file, ``text`` (and ``text_pair``) for a named task. A label column is ignored (a warning says so).

Writes one row per input, in input order: ``label`` (the predicted label's name) and ``prob_<label name>`` for
every class; with ``--mode ensemble:S`` (the mean class probabilities of S points sampled per input) also
``spread``, the sample SD over the S points of the probability of the predicted label, and ``disagreement``, the
share of the S points whose own argmax is not the predicted label (0, 1/S, ..., 1). ``--out``'s extension picks
the format (``.csv .tsv .jsonl .parquet``), written to a temporary file beside it and renamed at the end (a
failure leaves no partial file); without ``--out``, JSON lines on stdout.

Inputs stream through the model 256 at a time (``--chunk``), with a progress bar on stderr. Under a launcher
(``torchrun --nproc_per_node N -m dist_subspace.predict ...``) every process reads the file, the rows of each
chunk are shared out between them, and only the main process writes, each row once, in order. An input's
ensemble points depend on its row number only, never on the chunk or the number of processes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

from dist_subspace.core.cli import USER_ERRORS, OneLineParser, exit_now, user_error
from dist_subspace.core.config import Config, ConfigError, check_eval_mode
from dist_subspace.data.tables import read_table
from dist_subspace.data.tasks import GLUE, LOCAL_SUFFIXES, TASKS, Example, TaskSpec
from dist_subspace.training.preflight import is_main_rank

OUT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
CHUNK = 256


def say_error(err: BaseException) -> int:
    """:func:`~dist_subspace.core.cli.user_error` from the main process only (every rank meets the same bad input)."""
    return user_error(err) if is_main_rank() else 2


def named_task(cfg: Config) -> TaskSpec | None:
    """The registered task the run of ``cfg`` is on (``glue:`` prefix allowed), or None for a local file."""
    task = cfg.data.task
    name = task[len("glue:") :] if task.startswith("glue:") and task[len("glue:") :] in GLUE else task
    return TASKS.get(name)


def input_columns(cfg: Config) -> tuple[str, str | None, str]:
    """The (text, text pair or None, label) columns an input file has for the run of ``cfg``: a named task's
    ``text``/``text_pair``/``label``, a local file's ``data.text_field``/``text_pair_field``/``label_field``."""
    task = named_task(cfg)
    if task is not None:
        return "text", "text_pair" if task.has_pair else None, "label"
    return cfg.data.text_field, cfg.data.text_pair_field, cfg.data.label_field


def check_mode(mode: str) -> tuple[str, int | None]:
    """``centroid``, ``vertex:I`` or ``ensemble:S``: the modes that predict one label per input."""
    kind, number = check_eval_mode(mode)
    if kind in ("sampled", "models"):
        raise ConfigError(
            f"--mode {mode}: {kind}:S scores S separate models, it predicts no one label; use ensemble:S, "
            "centroid or vertex:I"
        )
    return kind, number


def _cell(value) -> str:
    return "" if value is None or value != value else str(value)  # None / NaN -> ""


def read_inputs(path: Path, text: str, pair: str | None, label: str) -> tuple[list[Example], bool]:
    """The rows of ``path`` as examples (``label`` 0, unused) in file order, and whether it has a ``label``
    column. A missing text column, an empty text, an empty, unreadable or unknown file: a one-line ValueError."""
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise ConfigError(
            f"--data {str(path)!r}: unsupported type {path.suffix.lower() or '(none)'!r}; use one of {LOCAL_SUFFIXES}"
        )
    if not path.is_file():
        raise ConfigError(f"--data {str(path)!r} not found; give the file of texts to label")
    frame = read_table(path)
    for key, column in (("text_field", text), ("text_pair_field", pair)):
        if column is not None and column not in frame.columns:
            raise ConfigError(
                f"--data {str(path)!r}: no column {column!r} (the run's data.{key}); columns present: "
                f"{[str(c) for c in frame.columns]}"
            )
    texts = [_cell(v) for v in frame[text].tolist()]
    pairs = [_cell(v) for v in frame[pair].tolist()] if pair else [None] * len(texts)
    examples = []
    for i, (t, p) in enumerate(zip(texts, pairs, strict=True)):
        empty = [c for c, v in ((text, t), (pair, p)) if c is not None and not v.strip()]
        if empty:
            raise ConfigError(
                f"--data {str(path)!r}: row {i} has an empty text in column {empty[0]!r}; fill or remove it"
            )
        examples.append({"text": t, "text_pair": p, "label": 0, "id": i})
    return examples, label in frame.columns


def check_out(out: Path | None) -> None:
    """``--out``: a known extension, in an existing folder."""
    if out is None:
        return
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise ConfigError(f"--out {str(out)!r}: unknown extension {out.suffix!r}; use one of {OUT_SUFFIXES}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist; create it first")
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give a file name")


def prediction_rows(label_names: Sequence[str], point_probs, ensemble: bool) -> list[dict]:
    """One dict per input from the points' probabilities ``[S, N, C]``: ``label``, ``prob_<name>`` per class, and
    for an ensemble ``spread`` and ``disagreement`` (see ``calibration.ensemble_uncertainty``)."""
    from dist_subspace.evaluation.calibration import ensemble_uncertainty

    summary = ensemble_uncertainty(point_probs)
    rows = []
    for n, label in enumerate(summary["label"].tolist()):
        row = {"label": label_names[label]}
        row.update({f"prob_{name}": float(p) for name, p in zip(label_names, summary["probs"][n], strict=True)})
        if ensemble:
            row.update(spread=float(summary["spread"][n]), disagreement=float(summary["disagreement"][n]))
        rows.append(row)
    return rows


def _json_lines(stream) -> Callable[[list[dict]], None]:
    def write(rows: list[dict]) -> None:
        stream.write("".join(json.dumps(row) + "\n" for row in rows))
        stream.flush()

    return write


def _file_writer(kind: str, tmp: Path, stack: ExitStack) -> Callable[[list[dict]], None]:
    """A function writing rows to ``tmp`` in format ``kind``; ``stack`` closes the file."""
    if kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        parquet: list = []  # the writer, made with the first rows' schema

        def write_parquet(rows: list[dict]) -> None:
            table = pa.Table.from_pylist(rows)
            if not parquet:
                parquet.append(stack.enter_context(pq.ParquetWriter(str(tmp), table.schema)))
            parquet[0].write_table(table)

        return write_parquet
    if kind == ".jsonl":
        return _json_lines(stack.enter_context(open(tmp, "w", encoding="utf-8")))
    stream = stack.enter_context(tmp.open("w", newline="", encoding="utf-8"))
    table: list = []  # the DictWriter, made with the first rows' columns

    def write_table(rows: list[dict]) -> None:
        if not table:
            table.append(csv.DictWriter(stream, fieldnames=list(rows[0]), delimiter="," if kind == ".csv" else "\t"))
            table[0].writeheader()
        table[0].writerows(rows)

    return write_table


@contextmanager
def row_writer(out: Path | None) -> Iterator[Callable[[list[dict]], None]]:
    """A function that writes rows (dicts with the same keys) to ``out`` in the format of its extension: into
    ``.tmp-NAME`` beside it, flushed to disk and renamed over ``out`` when the block ends; an error in the block
    removes the temporary file (no partial output). JSON lines on stdout when ``out`` is None."""
    if out is None:
        yield _json_lines(sys.stdout)
        return
    tmp = out.with_name(f".tmp-{out.name}")
    try:
        with ExitStack() as stack:
            yield _file_writer(out.suffix.lower(), tmp, stack)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def predict_chunks(run, examples: Sequence[Example], mode: str, chunk: int, batch_size: int) -> Iterator[list[dict]]:
    """Label ``examples`` with a loaded run (:class:`~dist_subspace.training.reload.FinishedRun`) in ``mode``:
    ``chunk`` inputs at a time, each chunk one stacked pass of the mode's points; yields each chunk's rows (on
    every process: the outputs are gathered on all). Every process must draw every chunk (the passes are
    collective)."""
    import torch

    from dist_subspace.data.batching import Collator
    from dist_subspace.evaluation.scoring import Query, from_offset, mode_points, model_outputs

    kind, number = check_mode(mode)
    points = mode_points(run.model, kind, number, run.cfg.simplex.sampling)
    base = run.collator
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        collator = Collator(base.tokenizer, base.task, base.decoder, base.max_length)  # its token cache: one chunk
        queries = [Query(part, from_offset(p, start)) for p in points]
        logits = model_outputs(run.model, run.engine, queries, collator, batch_size)
        yield prediction_rows(run.task.label_names, torch.stack(logits).softmax(-1), kind == "ensemble")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m dist_subspace.predict", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="inputs: .csv .tsv .json .jsonl .parquet")
    parser.add_argument("--out", type=Path, help="output: .csv .tsv .jsonl .parquet (default: JSON lines on stdout)")
    parser.add_argument("--mode", default="centroid", help="centroid | vertex:I | ensemble:S (default: centroid)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows (input x point) per forward")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="inputs per stacked pass")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from dist_subspace.training.reload import finished_run_config, load_finished_run

    try:  # everything a user can get wrong, before the model loads
        if args.batch_size < 1 or args.chunk < 1:
            raise ConfigError(f"--batch-size and --chunk must be >= 1 (got {args.batch_size}, {args.chunk})")
        check_mode(args.mode)
        check_out(args.out)
        cfg = finished_run_config(args.run_dir)
        text, pair, label = input_columns(cfg)
        task = named_task(cfg)
        if task is not None and task.regression:
            raise ConfigError(f"{task.name} is a regression task; predict labels classification tasks")
        examples, labelled = read_inputs(args.data, text, pair, label)
    except USER_ERRORS as err:
        return say_error(err)
    if labelled and is_main_rank():
        print(f"warning: column {label!r} of {args.data} is ignored (predict only labels texts)", file=sys.stderr)

    run = None
    try:
        run = load_finished_run(args.run_dir, cfg)
        from tqdm import tqdm

        main_process = run.engine.is_main
        with row_writer(args.out) if main_process else nullcontext(None) as write:
            bar = tqdm(total=len(examples), desc="predict", unit="input", file=sys.stderr, disable=not main_process)
            for rows in predict_chunks(run, examples, args.mode, args.chunk, args.batch_size):
                if write is not None:
                    write(rows)
                bar.update(len(rows))
            bar.close()
    except USER_ERRORS as err:
        if run is not None:
            run.end()
        return say_error(err)
    run.end()
    return 0


if __name__ == "__main__":
    exit_now(main())
