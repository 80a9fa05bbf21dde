"""Small real files for integration tests: a truncated SmolLM2 and a labelled JSONL file."""

from __future__ import annotations

import json
import random
from pathlib import Path

from transformers import AutoTokenizer, LlamaForCausalLM

from dist_subspace.core.embedded import resolve_model

POSITIVE = ["great", "wonderful", "moving", "brilliant", "funny", "charming", "superb", "delightful"]
NEGATIVE = ["boring", "awful", "dull", "clumsy", "tedious", "bland", "messy", "lifeless"]
FILLER = ["the", "film", "story", "cast", "plot", "was", "really", "quite", "and", "a", "movie", "ending"]


def make_small_smollm2(folder: Path, num_layers: int = 4) -> Path:
    """The real SmolLM2-135M cut to its first ``num_layers`` layers (pretrained weights, real tokenizer, GQA
    9/3 heads): small enough for multi-process tests, real enough that a prefix learns in a few steps."""
    path = resolve_model("smollm2-135m")
    model = LlamaForCausalLM.from_pretrained(path, num_hidden_layers=num_layers)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(path).save_pretrained(folder)
    return folder


def make_sentiment_file(path: Path, n: int = 400, seed: int = 0) -> Path:
    """A JSONL file of short synthetic reviews labelled ``positive``/``negative`` by their key word."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.choice(["negative", "positive"])
            words = [*rng.sample(FILLER, 4), rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path
