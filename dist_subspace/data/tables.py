"""Reading labelled tables: local files (csv, tsv, json lines, parquet) as pandas frames, with a one-line error for
a missing, empty, unreadable or cut-short file, and their rows as examples (text, pair, label, id)."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

from dist_subspace.data.tasks import LOCAL_SUFFIXES, Example


def _first_bad_json_line(path: Path) -> int | None:
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    return number
    return None


def read_table(path: str | Path):
    """A local .csv/.tsv/.json/.jsonl/.parquet file as a pandas DataFrame (cells kept as written); a one-line
    error for a missing, empty, unreadable or cut-short file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} not found; check data.task / data.data_files")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty; give a file with a header and rows")
    try:
        frame = _read_table(path)
    except (ValueError, OSError, UnicodeDecodeError) as err:  # pandas' and pyarrow's parse errors are ValueErrors
        line = _first_bad_json_line(path) if path.suffix.lower() in (".json", ".jsonl") else None
        where = f" (line {line} is not valid JSON)" if line else f" ({str(err).strip().splitlines()[0][:200]})"
        raise ValueError(
            f"data file {str(path)!r} cannot be read as {path.suffix.lower()}{where}; is it cut short or damaged?"
        ) from None
    if len(frame) == 0:
        raise ValueError(f"data file {str(path)!r} holds no rows; give a file with labelled examples")
    return frame


def _read_table(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False)
    if suffix == ".tsv":  # GLUE-style TSV: tabs separate, quotes are text
        return pd.read_csv(path, sep="\t", keep_default_na=False, quoting=csv.QUOTE_NONE)
    if suffix == ".jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    if suffix == ".json":
        try:
            return pd.read_json(path, dtype=False)
        except ValueError:  # JSON lines under a .json name
            return pd.read_json(path, lines=True, dtype=False)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise ValueError(f"data file {str(path)!r}: unsupported type {suffix!r}; use one of {LOCAL_SUFFIXES}")


def _text(value) -> str:
    return "" if value is None or value != value else str(value)  # None / NaN -> ""


def require_columns(frame, where: str, **columns: str | None) -> None:
    """A clear error naming the columns present when a ``data.<key>=column`` is missing from ``frame``."""
    for key, column in columns.items():
        if column is not None and column not in frame.columns:
            raise ValueError(
                f"{where}: no column {column!r}; columns present: {list(frame.columns)}; set data.{key} to one"
            )


def table_examples(
    frame, where: str, text: str, pair: str | None, label: str, to_label: Callable, skip_empty: bool = False
) -> list[Example]:
    """Rows -> examples (``id`` = row index); rows whose label maps to None (GLUE's unlabelled -1) are skipped.

    A row whose text (or pair text) is empty or only whitespace is refused, naming the row; ``skip_empty``
    drops it instead (hub downloads, which the user cannot edit).
    """
    require_columns(frame, where, text_field=text, text_pair_field=pair, label_field=label)
    pairs = frame[pair].tolist() if pair else [None] * len(frame)
    rows = zip(frame[text].tolist(), pairs, frame[label].tolist(), strict=True)
    examples = []
    for i, (t, p, y) in enumerate(rows):
        y = to_label(y)
        if y is None:
            continue
        t, p = _text(t), None if pair is None else _text(p)
        empty = [c for c, v in ((text, t), (pair, p)) if c is not None and not v.strip()]
        if empty and skip_empty:
            continue
        if empty:
            raise ValueError(f"{where}: row {i} has an empty text in column {empty[0]!r}; fill or remove such rows")
        examples.append({"text": t, "text_pair": p, "label": y, "id": i})
    return examples


def label_index(names: Sequence[str], where: str) -> Callable:
    """A label cell -> its class index: a label name or an index into ``names``; -1 (unlabelled) -> None."""

    def convert(value) -> int | None:
        if isinstance(value, str) and value in names:
            return names.index(value)
        try:
            index = int(value)
        except (TypeError, ValueError):
            index = None
        if index == -1:
            return None
        if index is None or not 0 <= index < len(names):
            raise ValueError(f"{where}: label {value!r} is neither one of {list(names)} nor an index into them")
        return index

    return convert


def _label_kind(value) -> str:
    if isinstance(value, bool):
        return "booleans"
    return "numbers" if isinstance(value, (int, float)) else "strings"


def check_labels(values: list, where: str) -> None:
    """Labels of a user's file: none missing (an empty cell, often a file cut short), and all of one kind."""
    for i, value in enumerate(values):
        if value is None or value != value or (isinstance(value, str) and not value.strip()):  # None, NaN, ""
            raise ValueError(f"{where}: row {i} has no label (an empty cell: is the file cut short?); label every row")
    kinds: dict[str, object] = {}
    for value in values:
        kinds.setdefault(_label_kind(value), value)
    if len(kinds) > 1:
        shown = " and ".join(f"{kind} (e.g. {example!r})" for kind, example in sorted(kinds.items()))
        raise ValueError(f"{where} mixes {shown}; write every label the same way")
