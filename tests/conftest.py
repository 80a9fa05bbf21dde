"""Shared fixtures: tiny random-config models of every supported family (no hub, no files)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
)

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# Decoders with grouped-query attention (4 heads, 2 key/value heads); no dropout so forwards are deterministic.
DECODER_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, num_key_value_heads=2, pad_token_id=0),
    "mistral": lambda: MistralConfig(**_COMMON, num_key_value_heads=2, pad_token_id=0, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_key_value_heads=2, pad_token_id=0),
    "qwen3": lambda: Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=8, pad_token_id=0),
}
_ENC = dict(_COMMON, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
ENCODER_CONFIGS = {
    "bert": lambda: BertConfig(**_ENC),
    "roberta": lambda: RobertaConfig(**_ENC, pad_token_id=1, max_position_embeddings=64),
}


def tiny_backbone(family: str, seed: int = 0):
    """A randomly initialised tiny model of ``family`` in eval mode."""
    torch.manual_seed(seed)
    if family in DECODER_CONFIGS:
        return AutoModelForCausalLM.from_config(DECODER_CONFIGS[family]()).eval()
    return AutoModel.from_config(ENCODER_CONFIGS[family](), add_pooling_layer=False).eval()


@pytest.fixture
def batch():
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # one left-padded row (decoders pad on the left)
    return ids, mask


@pytest.fixture(scope="session")
def small_assets(tmp_path_factory):
    """(model folder, data file): SmolLM2 cut to 4 layers and 400 labelled synthetic reviews."""
    from tests.assets import make_sentiment_file, make_small_smollm2

    root = tmp_path_factory.mktemp("assets")
    return make_small_smollm2(root / "smollm2-4l"), make_sentiment_file(root / "reviews.jsonl")


def run_args(model_dir, data_file, out_dir, *extra: str) -> list[str]:
    """Overrides for a short real run on the small assets (each test adds its own)."""
    return [
        f"model.name_or_path={model_dir}",
        f"data.task={data_file}",
        "data.shots_per_class=8",
        "data.test_size=41",
        f"train.output_dir={out_dir}",
        "train.max_steps=12",
        "train.micro_batch_size=4",
        "train.eval_every=6",
        "train.save_every=6",
        "train.log_every=2",
        "train.progress=false",
        "train.warmup_steps=2",
        "eval.landscape_resolution=3",
        *extra,
    ]
