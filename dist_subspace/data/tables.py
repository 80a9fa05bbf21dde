"""Reading labelled tables: local files (csv, tsv, json lines, parquet) as pandas frames, whole or a chunk of rows at
a time (:func:`table_chunks`, for inputs larger than memory), with a one-line error for a missing, empty, unreadable
or cut-short file, and their rows as examples (text, pair, label, id; :func:`text_chunks` streams unlabelled ones, or
chat records to answer)."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
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


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} not found; check data.task / data.data_files")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty; give a file with a header and rows")


def _unreadable(path: Path, err: BaseException) -> ValueError:
    """The one-line error for a file its reader failed on (``err``): the first line that is not JSON, or the
    reader's own first line."""
    line = _first_bad_json_line(path) if path.suffix.lower() in (".json", ".jsonl") else None
    where = f" (line {line} is not valid JSON)" if line else f" ({str(err).strip().splitlines()[0][:200]})"
    return ValueError(
        f"data file {str(path)!r} cannot be read as {path.suffix.lower()}{where}; is it cut short or damaged?"
    )


def _no_rows(path: Path) -> ValueError:
    return ValueError(f"data file {str(path)!r} holds no rows; give a file with labelled examples")


# pandas' and pyarrow's parse errors are ValueErrors (UnicodeDecodeError is one too)
_READ_ERRORS = (ValueError, OSError)
READ_ROWS = 8192  # rows per read of text_chunks (at least a chunk): a few MB of text, a reader call per few thousand


def read_table(path: str | Path):
    """A local .csv/.tsv/.json/.jsonl/.parquet file as a pandas DataFrame (cells kept as written); a one-line
    error for a missing, empty, unreadable or cut-short file."""
    path = Path(path)
    _check_file(path)
    try:
        frame = _read_table(path)
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from None
    if len(frame) == 0:
        raise _no_rows(path)
    return frame


def table_header(path: str | Path) -> list[str] | None:
    """The column names of a .csv/.tsv file (its header) or a .parquet file (its schema), read without its rows;
    None for JSON, which has no header (its first rows tell). A one-line ValueError as :func:`read_table`'s."""
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return [str(c) for c in _read_csv(path, nrows=0).columns]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return [str(name) for name in pq.read_schema(path).names]
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from None
    return None


def table_chunks(path: str | Path, rows: int, columns: Sequence[str] | None = None) -> Iterator:
    """A local file as :func:`read_table` reads it, as pandas DataFrames of at most ``rows`` rows each, in file
    order, holding one chunk at a time: .csv/.tsv (pandas' chunked reader), .jsonl (JSON lines, read ``rows``
    lines at a time) and .parquet (pyarrow's record batches). A .json file (one JSON document) is read whole, then
    cut. ``columns``: read only these (.csv/.tsv/.parquet; every name must be in :func:`table_header`); text
    columns of .csv/.tsv are then kept exactly as written (``1.50`` stays ``1.50``).

    A missing, empty or row-less file, or one that cannot be read, is a one-line ValueError as :func:`read_table`'s,
    raised when the chunk that holds the fault is read (a later chunk's after the earlier ones were yielded)."""
    path = Path(path)
    _check_file(path)
    yielded = False
    try:
        for frame in _chunks(path, rows, columns):
            if len(frame):
                yielded = True
                yield frame
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from None
    if not yielded:
        raise _no_rows(path)


def text_chunks(
    path: str | Path, text: str, pair: str | None, chunk: int, where: str, chat: bool = False
) -> Iterator[list[Example]]:
    """The rows of ``path`` as unlabelled examples (``label`` 0, ``id`` the row number), ``chunk`` at a time in file
    order, read ``max(chunk, READ_ROWS)`` rows at a time: one read held at a time, chunks running across reads.
    Only the text columns are read from .csv/.tsv/.parquet (each must be in :func:`table_header`). ``chat``: column
    ``text`` holds chat records to answer, each example's ``messages`` (:func:`chat_prompt`; ``text`` empty).

    A row whose text (or pair text) is empty, only whitespace, or absent from a JSON row, or (``chat``) not a chat
    record ending with the user's message, is a one-line ValueError naming the row (``where`` first), raised when its
    chunk is made; an unreadable part as :func:`table_chunks`'s."""
    path = Path(path)
    wanted = [c for c in (text, pair) if c is not None] if path.suffix.lower() in (".csv", ".tsv", ".parquet") else None
    start, texts, pairs = 0, [], []  # the rows read and not yet yielded
    for frame in table_chunks(path, max(chunk, READ_ROWS), wanted):
        texts, pairs = texts + _column(frame, text, chat), pairs + _column(frame, pair)
        at = 0
        while len(texts) - at >= chunk:
            yield _unlabelled(texts[at : at + chunk], pairs[at : at + chunk], start + at, where, text, pair, chat)
            at += chunk
        texts, pairs, start = texts[at:], pairs[at:], start + at
    if texts:
        yield _unlabelled(texts, pairs, start, where, text, pair, chat)


def _column(frame, column: str | None, raw: bool = False) -> list:
    """A read's cells of ``column`` as text (None for no column; empty where a JSON read lacks it); ``raw``: as
    read (None where a JSON read lacks it)."""
    if column is None:
        return [None] * len(frame)
    if column not in frame.columns:
        return [None if raw else ""] * len(frame)
    return frame[column].tolist() if raw else [_text(v) for v in frame[column].tolist()]


def _unlabelled(
    texts: list, pairs: list, start: int, where: str, text: str, pair: str | None, chat: bool = False
) -> list[Example]:
    examples = []
    for i, (t, p) in enumerate(zip(texts, pairs, strict=True), start):
        if chat:
            messages, answered = chat_prompt(t, f"{where}: row {i} of column {text!r}")
            chat_row = {"text": "", "text_pair": None, "messages": messages, "answered": answered}
            examples.append({**chat_row, "label": 0, "id": i})
            continue
        empty = [c for c, v in ((text, t), (pair, p)) if c is not None and not v.strip()]
        if empty:
            raise ValueError(f"{where}: row {i} has an empty text in column {empty[0]!r}; fill or remove such rows")
        examples.append({"text": t, "text_pair": p, "label": 0, "id": i})
    return examples


def chat_prompt(record, where: str) -> tuple[list[dict], bool]:
    """A chat record to answer -> its messages (``{"role", "content"}``, contents as text) up to the user's last
    message, and whether it went on with an assistant's answer (dropped: the answer is what is to be generated).
    Anything else (not a list of such messages, no user's message last) is a one-line ValueError (``where``)."""
    if hasattr(record, "tolist") and not isinstance(record, str):
        record = record.tolist()  # parquet's list of structs: a numpy array of dicts
    messages = list(record) if isinstance(record, (list, tuple)) else []
    valid = bool(messages) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)
    answered = valid and messages[-1]["role"] == "assistant"
    messages = messages[:-1] if answered else messages
    if not valid or not messages or messages[-1]["role"] != "user" or not str(messages[-1]["content"]).strip():
        raise ValueError(
            f'{where} is not a chat record ending with the user\'s message: a list of {{"role", "content"}} messages '
            'whose last is {"role": "user", "content": "..."} (or an assistant\'s answer after it, which is ignored)'
        )
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages], answered


def _chunks(path: Path, rows: int, columns: Sequence[str] | None) -> Iterator:
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        text = {"usecols": list(columns), "dtype": dict.fromkeys(columns, str)} if columns is not None else {}
        with _read_csv(path, chunksize=rows, **text) as reader:
            yield from reader
    elif suffix == ".jsonl":
        with pd.read_json(path, lines=True, dtype=False, chunksize=rows) as reader:
            yield from reader
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(batch_size=rows, columns=None if columns is None else list(columns)):
                yield batch.to_pandas()
    else:  # .json: one document, no chunked reader
        frame = _read_table(path)
        for start in range(0, len(frame), rows):
            yield frame.iloc[start : start + rows]


def _read_csv(path: Path, **kwargs):
    """pandas' read_csv as :func:`read_table` reads .csv and .tsv (GLUE-style TSV: tabs separate, quotes are
    text), with ``kwargs`` (``nrows``, ``chunksize``, ``usecols``, ...)."""
    import pandas as pd

    if path.suffix.lower() == ".tsv":
        return pd.read_csv(path, sep="\t", keep_default_na=False, quoting=csv.QUOTE_NONE, **kwargs)
    return pd.read_csv(path, keep_default_na=False, **kwargs)


def _read_table(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_csv(path)
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
