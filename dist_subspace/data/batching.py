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

    Generation tasks: the prompt, then the response and the end-of-sequence token; ``labels`` ``[B, S]`` holds the
    response's ids and -100 on the prompt and the padding. A too-long example keeps its whole response and loses
    the prompt's first tokens (:func:`generation_ids`). :meth:`prompts` gives the prompts alone, left-padded, to
    decode from.
    """

    def __init__(self, tokenizer, task: TaskSpec, decoder: bool, max_length: int = 256) -> None:
        self.tokenizer, self.task, self.decoder, self.max_length = tokenizer, task, decoder, max_length
        if task.generation:
            check_generation_tokenizer(tokenizer, task, decoder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._encoded: dict[tuple, dict[str, list[int]]] = {}  # each example tokenised once: the loop only pads

    def prompt(self, example: Example) -> str:
        """A decoder's input: the task's template around the example's text (pair); a chat record's messages
        through the tokenizer's chat template, up to where the assistant's answer starts."""
        if example.get("messages") is not None:
            return self.tokenizer.apply_chat_template(example["messages"], tokenize=False, add_generation_prompt=True)
        return self.task.template.format(text=example["text"], text_pair=example.get("text_pair") or "")

    def encode(self, example: Example) -> dict[str, list[int]]:
        """One example's token ids (and segment ids; for generation the response's ``labels``), truncated,
        unpadded; cached by its text."""
        if self.task.generation:
            key = (example["text"], str(example.get("messages")), example["label"])
            if key not in self._encoded:
                prompt = self.tokenizer(self.prompt(example), add_special_tokens=example.get("messages") is None)
                response = self.tokenizer(example["label"], add_special_tokens=False)["input_ids"]
                ids, labels = generation_ids(
                    prompt["input_ids"], [*response, self.tokenizer.eos_token_id], self.max_length, example
                )
                self._encoded[key] = {"input_ids": ids, "labels": labels}
            return self._encoded[key]
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
        tokens = torch.full((len(encoded), width), -100, dtype=torch.long)  # generation: the response's labels
        for row, e in enumerate(encoded):  # right padding
            n = len(e["input_ids"])
            input_ids[row, :n] = torch.tensor(e["input_ids"])
            mask[row, :n] = 1
            if "token_type_ids" in e:
                segments[row, :n] = torch.tensor(e["token_type_ids"])
            if "labels" in e:
                tokens[row, :n] = torch.tensor(e["labels"])
        if self.task.generation:
            labels = tokens
        else:
            dtype = torch.float32 if self.task.regression else torch.long
            labels = torch.tensor([e["label"] for e in examples], dtype=dtype)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "index": index}
        if "token_type_ids" in encoded[0]:  # BERT: segment ids tell a pair's two texts apart
            batch["token_type_ids"] = segments
        return batch

    def prompts(self, items: Sequence[tuple[int, Example]]) -> dict[str, torch.Tensor]:
        """A generation batch's prompts alone, left-padded for decoding: ``input_ids``/``attention_mask`` ``[B, S]``
        (cut as :meth:`encode` cuts them), ``index`` ``[B]``."""
        prompts = []
        for _, example in items:
            encoded = self.encode(example)
            prompts.append([t for t, y in zip(encoded["input_ids"], encoded["labels"], strict=True) if y == -100])
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "index": torch.tensor([i for i, _ in items])}

    def _full_length(self, example: Example) -> int:
        """A generation example's prompt + response + end-of-sequence tokens, uncut."""
        prompt = self.tokenizer(self.prompt(example), add_special_tokens=example.get("messages") is None)
        return (
            len(prompt["input_ids"]) + len(self.tokenizer(example["label"], add_special_tokens=False)["input_ids"]) + 1
        )

    def count_truncated(self, examples: Sequence[Example]) -> int:
        """How many of ``examples`` are longer than ``max_length`` tokens, so that this collator cuts them (for
        generation: whose prompt loses its first tokens; a response that cannot fit is refused here)."""
        if self.task.generation:
            return sum(len(self.encode(e)["input_ids"]) < self._full_length(e) for e in examples)
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


def generation_ids(
    prompt: list[int], response: list[int], max_length: int, example: Example
) -> tuple[list[int], list[int]]:
    """Prompt ids then response ids (ending with the end-of-sequence id) -> ``input_ids`` and ``labels`` (-100 on
    the prompt) of at most ``max_length`` tokens: the whole response, after the prompt's last tokens. A response
    that leaves no room for one prompt token is refused (one line naming the example)."""
    if len(response) >= max_length:
        raise ValueError(
            f"example {example.get('id')}: its response is {len(response)} tokens (with the end-of-sequence "
            f"token), model.max_length is {max_length}; raise model.max_length or shorten the response"
        )
    prompt = prompt[-(max_length - len(response)) :]
    return prompt + response, [-100] * len(prompt) + response


def check_generation_tokenizer(tokenizer, task: TaskSpec, decoder: bool) -> None:
    """What a generation task needs before anything loads: a decoder, and a tokenizer with an end-of-sequence
    token (the response ends with it, decoding stops at it)."""
    if not decoder:
        raise ValueError(f"task {task.name} generates text: use a decoder (model.name_or_path=smollm2-135m, ...)")
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"task {task.name}: the tokenizer has no end-of-sequence token, which ends each response; set one "
            "(tokenizer.eos_token) in the model folder's tokenizer_config.json"
        )


def check_chat(tokenizer, examples: Sequence[Example]) -> None:
    """Chat records need the tokenizer's own chat template."""
    if any(e.get("messages") is not None for e in examples) and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat records (data.messages_field) need a tokenizer with a chat template, and this one has none; use a "
            "chat model (smollm2-135m ships ChatML), or prompt/response fields with data.template"
        )


def truncation_report(collator: Collator, splits: dict[str, Sequence[Example]]) -> str:
    """The truncation policy and how many examples of each split it cuts, for the log."""
    counts = ", ".join(f"{collator.count_truncated(ex)} of {len(ex)} {name}" for name, ex in splits.items())
    if collator.task.generation:
        policy = "each keeps its whole response and loses its prompt's first tokens"
    elif collator.decoder:
        policy = "their last tokens are kept (the prompt's end, where the answer is read)"
    else:
        policy = "their first tokens are kept (of a pair, the longer text is cut)"
    return f"truncation: inputs over model.max_length={collator.max_length} tokens are cut, {policy}: {counts}"
