"""Batching: verbalizer token ids, the :class:`Collator` (examples -> padded tensors), and the truncation
policy stated in the log."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_subspace.data.tasks import Example, TaskSpec


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
    """Examples -> ``input_ids``/``attention_mask`` ``[B, S]``, ``labels`` ``[B]``, ``index`` ``[B]`` (and
    ``token_type_ids`` ``[B, S]`` for encoders whose tokenizer gives them).

    Decoders see the task's prompt, right-padded (a causal query never sees the pads after it, so attention needs
    no mask; the model reads each example's last real token) and truncated on the left (the prompt's end, the
    answer position, is always kept); encoders see the raw text (pair), right-padded and truncated. ``index`` is
    the example's position in its split: with the step it seeds the example's alpha.
    """

    def __init__(self, tokenizer, task: TaskSpec, decoder: bool, max_length: int = 256) -> None:
        self.tokenizer, self.task, self.decoder, self.max_length = tokenizer, task, decoder, max_length
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._encoded: dict[tuple, dict[str, list[int]]] = {}  # each example tokenised once: the loop only pads

    def prompt(self, example: Example) -> str:
        """A decoder's input: the task's template around the example's text (pair)."""
        return self.task.template.format(text=example["text"], text_pair=example.get("text_pair") or "")

    def encode(self, example: Example) -> dict[str, list[int]]:
        """One example's token ids (and segment ids), truncated, unpadded; cached by its text."""
        key = (example["text"], example.get("text_pair"))
        if key not in self._encoded:
            self.tokenizer.truncation_side = "left" if self.decoder else "right"
            if self.decoder:
                enc = self.tokenizer(self.prompt(example), truncation=True, max_length=self.max_length)
            else:
                pair = example["text_pair"] if self.task.has_pair else None
                enc = self.tokenizer(example["text"], pair, truncation=True, max_length=self.max_length)
            keep = ("input_ids",) if self.decoder else ("input_ids", "token_type_ids")
            self._encoded[key] = {k: list(enc[k]) for k in keep if k in enc}
        return self._encoded[key]

    def __call__(self, items: Sequence[tuple[int, Example]]) -> dict[str, torch.Tensor]:
        index = torch.tensor([i for i, _ in items], dtype=torch.long)
        examples = [e for _, e in items]
        encoded = [self.encode(e) for e in examples]
        width = max(len(e["input_ids"]) for e in encoded)
        input_ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(encoded), width, dtype=torch.long)
        segments = torch.zeros(len(encoded), width, dtype=torch.long)
        for row, e in enumerate(encoded):  # right padding
            n = len(e["input_ids"])
            input_ids[row, :n] = torch.tensor(e["input_ids"])
            mask[row, :n] = 1
            if "token_type_ids" in e:
                segments[row, :n] = torch.tensor(e["token_type_ids"])
        dtype = torch.float32 if self.task.regression else torch.long
        labels = torch.tensor([e["label"] for e in examples], dtype=dtype)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "index": index}
        if "token_type_ids" in encoded[0]:  # BERT: segment ids tell a pair's two texts apart
            batch["token_type_ids"] = segments
        return batch

    def count_truncated(self, examples: Sequence[Example]) -> int:
        """How many of ``examples`` are longer than ``max_length`` tokens, so that this collator cuts them."""
        count = 0
        for start in range(0, len(examples), 512):
            chunk = examples[start : start + 512]
            if self.decoder:
                enc = self.tokenizer([self.prompt(e) for e in chunk], verbose=False)
            else:
                pairs = [e["text_pair"] for e in chunk] if self.task.has_pair else None
                enc = self.tokenizer([e["text"] for e in chunk], pairs, verbose=False)
            count += sum(len(ids) > self.max_length for ids in enc["input_ids"])
        return count


def truncation_report(collator: Collator, splits: dict[str, Sequence[Example]]) -> str:
    """The truncation policy and how many examples of each split it cuts, for the log."""
    counts = ", ".join(f"{collator.count_truncated(ex)} of {len(ex)} {name}" for name, ex in splits.items())
    if collator.decoder:
        policy = "their last tokens are kept (the prompt's end, where the answer is read)"
    else:
        policy = "their first tokens are kept (of a pair, the longer text is cut)"
    return f"truncation: inputs over model.max_length={collator.max_length} tokens are cut, {policy}: {counts}"
