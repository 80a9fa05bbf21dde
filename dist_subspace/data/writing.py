"""Writing rows (dicts with the same keys) to a table file whole or not at all: ``.csv``, ``.tsv``, ``.jsonl`` or
``.parquet`` by the file's extension, into a temporary file beside it, flushed to disk and renamed at the end; or JSON
lines on stdout. What ``predict`` writes its rows with; a failed write is :class:`OutputFailed`."""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

OUT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


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
