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
