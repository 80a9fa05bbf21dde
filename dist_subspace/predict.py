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

Inputs stream from the file through the model 256 rows at a time (``--chunk``), with a progress bar on stderr: a
process holds one read of the input (8,192 rows, or a chunk if larger), never the whole file (.csv, .tsv, .jsonl
and .parquet are read in parts; a .json file, one JSON document, is read whole: write JSON lines to stream a large
input). Before the model loads, the columns are checked from the file's header (.csv, .tsv) or schema
(.parquet), JSON's from its first rows, and then every row is read once, in parts, so that an empty text anywhere
is refused before any work (and the progress bar knows the total). Should the file change after that check, a
bad row met during the pass is still one line, exit status 2, and no output file; on stdout the rows before it are
already printed.

Under a launcher (``torchrun --nproc_per_node N -m dist_subspace.predict ...``) every process streams the file,
the rows of each chunk are shared out between them, and only the main process writes, each row once, in order;
the processes agree on every chunk before its pass (one small exchange), so a chunk that one of them cannot read
stops them all at the same pass. An input's ensemble points depend on its row number only, never on the chunk or
the number of processes. A failure to write the output (a full disk, a closed pipe) is one line, exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

from dist_subspace.core.cli import USER_ERRORS, OneLineParser, exit_now, user_error
from dist_subspace.core.config import Config, ConfigError, check_eval_mode
from dist_subspace.data.tables import READ_ROWS, table_chunks, table_header, text_chunks
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


class Inputs:
    """``--data``, the texts to label, streamed: iterate it for each chunk's examples (``chunk`` of them; ``label``
    0, unused; ``id`` the row number), in file order (:func:`~dist_subspace.data.tables.text_chunks`).

    Made before the model loads: an unknown type, a missing file and a missing text column (from the header or
    schema; JSON's from its first rows) are one-line ConfigErrors at once; ``labelled`` says whether the file has
    the ``label`` column. An empty text (the row named) or an unreadable part is a one-line ConfigError raised
    when its chunk is read: :meth:`count` reads them all first."""

    def __init__(self, path: Path, text: str, pair: str | None, label: str, chunk: int) -> None:
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise ConfigError(
                f"--data {str(path)!r}: unsupported type {path.suffix.lower() or '(none)'!r}; "
                f"use one of {LOCAL_SUFFIXES}"
            )
        if not path.is_file():
            raise ConfigError(f"--data {str(path)!r} not found; give the file of texts to label")
        self.path, self.text, self.pair, self.chunk = path, text, pair, chunk
        columns = _refusal(table_header, path)  # None for JSON: no header, its first rows tell
        if columns is None:
            reads = table_chunks(path, READ_ROWS)
            columns = [str(c) for c in _refusal(next, reads).columns]  # a first read, or the file is refused
            reads.close()
        for key, column in (("text_field", text), ("text_pair_field", pair)):
            if column is not None and column not in columns:
                raise ConfigError(
                    f"--data {str(path)!r}: no column {column!r} (the run's data.{key}); columns present: {columns}"
                )
        self.labelled = label in columns

    def __iter__(self) -> Iterator[list[Example]]:
        chunks = text_chunks(self.path, self.text, self.pair, self.chunk, f"--data {str(self.path)!r}")
        while (part := _refusal(next, chunks, None)) is not None:
            yield part

    def count(self) -> int:
        """Read every chunk once and return the number of rows: every refusal of the file, before any work."""
        return sum(len(part) for part in self)


def _refusal(read: Callable, *args):
    """``read(*args)``, a read of the input file: its one-line ValueError (a file it cannot read) as a ConfigError."""
    try:
        return read(*args)
    except ValueError as err:
        raise err if isinstance(err, ConfigError) else ConfigError(str(err)) from None


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


class OutputFailed(Exception):
    """Writing the output failed (a full disk, a closed pipe): a fault, not a bad input (exit status 1)."""


@contextmanager
def _writing(where: str) -> Iterator[None]:
    """An OSError of the block (a write, a flush, the rename) as :class:`OutputFailed`, naming ``where``."""
    try:
        yield
    except OSError as err:
        raise OutputFailed(f"{where}: could not write ({err.strerror or err})") from None


def _guarded(write: Callable[[list[dict]], None], where: str) -> Callable[[list[dict]], None]:
    def guarded(rows: list[dict]) -> None:
        with _writing(where):
            write(rows)

    return guarded


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
    removes the temporary file (no partial output). JSON lines on stdout when ``out`` is None. A write that fails
    (an OSError: a full disk, a closed pipe) is :class:`OutputFailed`."""
    if out is None:
        yield _guarded(_json_lines(sys.stdout), "stdout")
        return
    tmp, where = out.with_name(f".tmp-{out.name}"), f"--out {str(out)!r}"
    try:
        with ExitStack() as stack:
            with _writing(where):
                write = _file_writer(out.suffix.lower(), tmp, stack)
            yield _guarded(write, where)
            with _writing(where):
                stack.close()  # the last flush, where a full disk shows
        with _writing(where):
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def agreed_chunks(engine, chunks: Iterable[Sequence[Example]]) -> Iterator[Sequence[Example]]:
    """``chunks`` (each process reads its own copy of the input), each yielded once every process has read its
    own: one exchange of (rows, refusal) per chunk, so that the processes run the same passes. A ConfigError or
    :class:`OutputFailed` from any process's ``chunks`` (a bad row; the main process's failed write) is raised on
    every process at the same chunk, the lowest rank's first, and processes that read different numbers of rows
    raise a ConfigError, instead of leaving the others waiting in a collective."""
    iterator, start = iter(chunks), 0
    while True:
        try:
            part, problem = next(iterator, None), None
        except (ConfigError, OutputFailed) as err:
            part, problem = None, err
        views = engine.gather_objects((None if part is None else len(part), problem))
        problems = [p for _, p in views if p is not None]
        if problems:
            raise problems[0]
        sizes = [n for n, _ in views]
        if len(set(sizes)) > 1:
            raise ConfigError(
                f"--data: the processes read different rows from row {start} on (chunk sizes {sizes}, by rank); "
                "give every process the same file"
            )
        if part is None:
            return
        yield part
        start += len(part)


def predict_chunks(run, chunks: Iterable[Sequence[Example]], mode: str, batch_size: int) -> Iterator[list[dict]]:
    """Label the examples of ``chunks`` (lists of examples, in input order) with a loaded run
    (:class:`~dist_subspace.training.reload.FinishedRun`) in ``mode``: each chunk one stacked pass of the mode's
    points, its rows shared out between the processes; yields each chunk's rows (on every process: the outputs
    are gathered on all). Every process must be given the same chunks (see :func:`agreed_chunks`)."""
    import torch

    from dist_subspace.data.batching import Collator
    from dist_subspace.evaluation.points import Query, from_offset, mode_points
    from dist_subspace.evaluation.scoring import model_outputs

    kind, number = check_mode(mode)
    points = mode_points(run.model, kind, number, run.cfg.simplex.sampling)
    base, start = run.collator, 0
    for part in agreed_chunks(run.engine, chunks):
        collator = Collator(base.tokenizer, base.task, base.decoder, base.max_length)  # its token cache: one chunk
        queries = [Query(part, from_offset(p, start)) for p in points]
        logits = model_outputs(run.model, run.engine, queries, collator, batch_size)  # [N, C] per point
        yield prediction_rows(run.task.label_names, torch.stack(logits).softmax(-1), kind == "ensemble")
        start += len(part)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m dist_subspace.predict", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="inputs: .csv .tsv .json .jsonl .parquet")
    parser.add_argument("--out", type=Path, help="output: .csv .tsv .jsonl .parquet (default: JSON lines on stdout)")
    parser.add_argument("--mode", default="centroid", help="centroid | vertex:I | ensemble:S (default: centroid)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows (input x point) per forward")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="inputs per stacked pass (and per read)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from dist_subspace.training.reload import check_mode_fits, finished_run_config, load_finished_run

    try:  # everything a user can get wrong, before the model loads
        if args.batch_size < 1 or args.chunk < 1:
            raise ConfigError(f"--batch-size and --chunk must be >= 1 (got {args.batch_size}, {args.chunk})")
        kind, number = check_mode(args.mode)
        check_out(args.out)
        cfg = finished_run_config(args.run_dir)
        check_mode_fits(cfg, kind, number)
        text, pair, label = input_columns(cfg)
        task = named_task(cfg)
        if task is not None and task.regression:
            raise ConfigError(f"{task.name} is a regression task; predict labels classification tasks")
        inputs = Inputs(args.data, text, pair, label, args.chunk)
        total = inputs.count()  # every row read and checked once, a chunk at a time
    except USER_ERRORS as err:
        return say_error(err)
    if inputs.labelled and is_main_rank():
        print(f"warning: column {label!r} of {args.data} is ignored (predict only labels texts)", file=sys.stderr)

    try:
        run = load_finished_run(args.run_dir, cfg)  # its own files (model, tokenizer, data): their refusals
    except USER_ERRORS as err:
        return say_error(err)
    try:  # only the refusals meant: the input changed since it was checked, a write failed; a bug keeps its traceback
        label_all(run, inputs, total, args)
    except ConfigError as err:
        return say_error(err)
    except OutputFailed as err:
        if is_main_rank():
            print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        run.end()  # a later run in this process (a notebook, a test) starts clean
    return 0


def label_all(run, inputs: Iterable[Sequence[Example]], total: int, args: argparse.Namespace) -> None:
    """Label ``inputs`` (``total`` rows) in ``args.mode`` and write the rows to ``args.out`` (main process), with a
    progress bar. A write that fails stops every process at the next chunk (:class:`OutputFailed`)."""
    from tqdm import tqdm

    failed: list[OutputFailed] = []

    def watched() -> Iterator[Sequence[Example]]:
        for part in inputs:
            if failed:
                raise failed[0]
            yield part
        if failed:
            raise failed[0]

    main_process = run.engine.is_main
    bar = tqdm(total=total, desc="predict", unit="input", file=sys.stderr, disable=not main_process)
    with bar, row_writer(args.out) if main_process else nullcontext(None) as write:  # an error ends the bar's line
        for rows in predict_chunks(run, watched(), args.mode, args.batch_size):
            if write is not None and not failed:
                try:
                    write(rows)
                except OutputFailed as err:
                    failed.append(err)
            bar.update(len(rows))


if __name__ == "__main__":
    exit_now(main())
