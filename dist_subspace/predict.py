"""Label new texts, or answer new prompts, with a finished run: ``python -m dist_subspace.predict RUN_DIR --data FILE``.

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

A generation run answers prompts instead: ``FILE`` holds its ``data.prompt_field`` column (default ``prompt``; the
task's template goes around each), or for a run on chat records its ``data.messages_field`` column, each record ending
with the user's message (an assistant's answer after it is ignored, with a warning, as a response column is). Each
row is its ``response``, decoded at the mode's point (``--max-new-tokens``, ``--num-beams``: the run's
``eval.max_new_tokens`` and ``eval.num_beams`` by default); ``ensemble:S`` decodes from the mixture of its S points
(greedy) and adds ``entropy`` (the mixture's mean entropy per generated token, nats) and ``disagreement`` (the share
of the S points whose own greedy response differs from the mixture's), each point decoded in the same pass.

Inputs stream ``--chunk`` (256) rows at a time, each chunk one stacked pass, with a progress bar on stderr: a process
holds one read of the file (8,192 rows), never the whole file (a ``.json`` document is read whole: write JSON lines
to stream). Every row is read and checked once before the model loads; a bad row met later (the file changed) is
still one line, exit status 2, and no output file. Under a launcher (``torchrun --nproc_per_node N -m
dist_subspace.predict ...``) the rows of each chunk are shared out between the processes, which agree on every chunk
before its pass, and only the main one writes, each row once, in order; an input's ensemble points depend on its row
number only. A failed write (a full disk, a closed pipe) is one line, exit status 1. More: docs/configuration.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

from dist_subspace.core.cli import USER_ERRORS, OneLineParser, exit_now, user_error
from dist_subspace.core.config import Config, ConfigError, check_eval_mode
from dist_subspace.data.tables import READ_ROWS, table_chunks, table_header, text_chunks
from dist_subspace.data.tasks import GLUE, LOCAL_SUFFIXES, TASKS, Example, TaskSpec
from dist_subspace.data.writing import OUT_SUFFIXES, OutputFailed, row_writer
from dist_subspace.training.preflight import is_main_rank

CHUNK = 256


def say_error(err: BaseException) -> int:
    """:func:`~dist_subspace.core.cli.user_error` from the main process only (every rank meets the same bad input)."""
    return user_error(err) if is_main_rank() else 2


def named_task(cfg: Config) -> TaskSpec | None:
    """The registered task the run of ``cfg`` is on (``glue:`` prefix allowed), or None for a local file."""
    task = cfg.data.task
    name = task[len("glue:") :] if task.startswith("glue:") and task[len("glue:") :] in GLUE else task
    return TASKS.get(name)


def chat_run(cfg: Config) -> bool:
    """Whether the run of ``cfg`` trained on chat records (``data.messages_field`` of a local file)."""
    return named_task(cfg) is None and cfg.data.messages_field is not None


def input_columns(cfg: Config) -> tuple[str, str | None, str | None]:
    """The (text, text pair or None, label or None) columns an input file has for the run of ``cfg``: a named task's
    ``text``/``text_pair``/``label``, a local file's ``data.text_field``/``text_pair_field``/``label_field``; for
    generation the prompts (``data.prompt_field``, or the chat records of ``data.messages_field``), no pair, and
    the response column (``data.response_field``, a named task's ``response``; none for chat records)."""
    from dist_subspace.evaluation.responses import generation_run

    task = named_task(cfg)
    if generation_run(cfg):
        if chat_run(cfg):
            return cfg.data.messages_field, None, None
        return cfg.data.prompt_field, None, "response" if task is not None else cfg.data.response_field
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
    0, unused; ``id`` the row number), in file order (:func:`~dist_subspace.data.tables.text_chunks`); ``chat``:
    ``text`` is a column of chat records, each example's ``messages``.

    Made before the model loads: an unknown type, a missing file and a missing text column (from the header or
    schema; JSON's from its first rows; ``keys`` name the run's config keys for them) are one-line ConfigErrors at
    once; ``labelled`` says whether the file has the ``label`` column. An empty text or a bad chat record (the row
    named) or an unreadable part is a one-line ConfigError raised when its chunk is read: :meth:`count` reads them
    all first, and counts the chat records that end with an answer (``answered``)."""

    def __init__(
        self,
        path: Path,
        text: str,
        pair: str | None,
        label: str | None,
        chunk: int,
        chat: bool = False,
        keys: tuple[str, str] = ("text_field", "text_pair_field"),
    ) -> None:
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise ConfigError(
                f"--data {str(path)!r}: unsupported type {path.suffix.lower() or '(none)'!r}; "
                f"use one of {LOCAL_SUFFIXES}"
            )
        if not path.is_file():
            raise ConfigError(f"--data {str(path)!r} not found; give the file of texts to label")
        self.path, self.text, self.pair, self.chunk, self.chat, self.answered = path, text, pair, chunk, chat, 0
        columns = _refusal(table_header, path)  # None for JSON: no header, its first rows tell
        if columns is None:
            reads = table_chunks(path, READ_ROWS)
            columns = [str(c) for c in _refusal(next, reads).columns]  # a first read, or the file is refused
            reads.close()
        for key, column in zip(keys, (text, pair), strict=True):
            if column is not None and column not in columns:
                raise ConfigError(
                    f"--data {str(path)!r}: no column {column!r} (the run's data.{key}); columns present: {columns}"
                )
        self.labelled = label is not None and label in columns

    def __iter__(self) -> Iterator[list[Example]]:
        chunks = text_chunks(self.path, self.text, self.pair, self.chunk, f"--data {str(self.path)!r}", self.chat)
        while (part := _refusal(next, chunks, None)) is not None:
            yield part

    def count(self) -> int:
        """Read every chunk once and return the number of rows: every refusal of the file, before any work."""
        total, self.answered = 0, 0
        for part in self:
            total += len(part)
            self.answered += sum(bool(e.get("answered")) for e in part)
        return total


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


def predict_chunks(
    run, chunks: Iterable[Sequence[Example]], mode: str, batch_size: int, decoding=None
) -> Iterator[list[dict]]:
    """Label the examples of ``chunks`` (lists of examples, in input order) with a loaded run
    (:class:`~dist_subspace.training.reload.FinishedRun`) in ``mode``: each chunk one stacked pass of the mode's
    points, its rows shared out between the processes; yields each chunk's rows (on every process: the outputs
    are gathered on all). Every process must be given the same chunks (see :func:`agreed_chunks`). A generation
    run answers them instead, decoded as ``decoding`` says
    (:func:`~dist_subspace.evaluation.responses.decode_responses`)."""
    import torch

    from dist_subspace.data.batching import Collator
    from dist_subspace.evaluation.decoding import Decoding
    from dist_subspace.evaluation.points import Query, from_offset, mode_points
    from dist_subspace.evaluation.responses import decode_responses
    from dist_subspace.evaluation.scoring import model_outputs

    kind, number = check_mode(mode)
    points = mode_points(run.model, kind, number, run.cfg.simplex.sampling)
    base, start = run.collator, 0
    for part in agreed_chunks(run.engine, chunks):
        collator = Collator(base.tokenizer, base.task, base.decoder, base.max_length)  # its token cache: one chunk
        shifted = [from_offset(p, start) for p in points]
        if run.task.generation:
            ensemble, decoding = kind == "ensemble", decoding or Decoding()
            answers = decode_responses(run.model, run.engine, part, collator, shifted, ensemble, decoding, batch_size)
            yield answers.rows()
        else:
            logits = model_outputs(run.model, run.engine, [Query(part, p) for p in shifted], collator, batch_size)
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
    parser.add_argument("--max-new-tokens", type=int, help="generation: tokens per response (the run's by default)")
    parser.add_argument("--num-beams", type=int, help="generation: beam search at one point (the run's by default)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from dist_subspace.evaluation.responses import decoding_options, generation_run
    from dist_subspace.training.reload import check_mode_fits, finished_run_config, load_finished_run

    try:  # everything a user can get wrong, before the model loads
        if args.batch_size < 1 or args.chunk < 1:
            raise ConfigError(f"--batch-size and --chunk must be >= 1 (got {args.batch_size}, {args.chunk})")
        kind, number = check_mode(args.mode)
        check_out(args.out)
        cfg = finished_run_config(args.run_dir)
        check_mode_fits(cfg, kind, number)
        text, pair, label = input_columns(cfg)
        task, generation, chat = named_task(cfg), generation_run(cfg), chat_run(cfg)
        if task is not None and task.regression:
            raise ConfigError(f"{task.name} is a regression task; predict labels classification tasks")
        if not generation and (args.max_new_tokens, args.num_beams) != (None, None):
            raise ConfigError("--max-new-tokens and --num-beams are for a generation run; this run labels texts")
        defaults = (cfg.eval.max_new_tokens, cfg.eval.num_beams)
        args.decoding = decoding_options(kind, args.max_new_tokens, args.num_beams, defaults) if generation else None
        keys = ("messages_field" if chat else "prompt_field", "") if generation else ("text_field", "text_pair_field")
        inputs = Inputs(args.data, text, pair, label, args.chunk, chat, keys)
        total = inputs.count()  # every row read and checked once, a chunk at a time
    except USER_ERRORS as err:
        return say_error(err)
    what = "predict generates the response" if generation else "predict only labels texts"
    if is_main_rank() and inputs.labelled:
        print(f"warning: column {label!r} of {args.data} is ignored ({what})", file=sys.stderr)
    if is_main_rank() and inputs.answered:
        ended = f"{inputs.answered} chat record(s) of {args.data} end with the assistant's answer"
        print(f"warning: {ended}, which is ignored ({what})", file=sys.stderr)

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
        for rows in predict_chunks(run, watched(), args.mode, args.batch_size, args.decoding):
            if write is not None and not failed:
                try:
                    write(rows)
                except OutputFailed as err:
                    failed.append(err)
            bar.update(len(rows))


if __name__ == "__main__":
    exit_now(main())
