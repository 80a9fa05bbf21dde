"""Shared fixtures: tiny random-config models of every supported family (no hub, no files)."""

from __future__ import annotations

import sys

import absl.logging
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    MPNetConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    RobertaConfig,
)

# absl (which rouge-score imports) builds its stderr handler on the sys.stderr of its import: under pytest, the
# capture file, which a later test's study run was seen to find closed ("lost sys.stderr", the session dead).
# Imported here and pointed at the real stderr, its handler holds nothing of pytest's.
absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
WINDOW = 8  # sliding-window families: tests run sequences longer than this
_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GEMMA = dict(_COMMON, num_key_value_heads=1, head_dim=16, sliding_window=WINDOW, **_SPECIAL)
# Decoders with grouped-query attention (4 heads, 2 key/value heads); no dropout so forwards are deterministic.
DECODER_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, num_key_value_heads=2, pad_token_id=0),
    "mistral": lambda: MistralConfig(**_COMMON, num_key_value_heads=2, pad_token_id=0, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_key_value_heads=2, pad_token_id=0),
    "qwen3": lambda: Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=8, pad_token_id=0),
    # Gemma: head_dim from the config (16, not hidden / heads = 8), one key/value head, a sliding layer then a full one.
    "gemma2": lambda: Gemma2Config(**_GEMMA, query_pre_attn_scalar=16),
    "gemma3_text": lambda: Gemma3TextConfig(**_GEMMA, layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: Phi3Config(**_COMMON, num_key_value_heads=2, sliding_window=WINDOW, **_SPECIAL),  # fused qkv
    "gpt_neox": lambda: GPTNeoXConfig(**_COMMON, rotary_pct=0.25, **_SPECIAL),  # rotary on a quarter of the head
    "mixtral": lambda: MixtralConfig(**_COMMON, num_key_value_heads=2, num_local_experts=4, **_SPECIAL),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **_COMMON,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        pad_token_id=0,
    ),
}
_ENC = dict(_COMMON, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
ENCODER_CONFIGS = {
    "bert": lambda: BertConfig(**_ENC),
    "roberta": lambda: RobertaConfig(**_ENC, pad_token_id=1, max_position_embeddings=64),
    # No key/value cache: the prefix enters through its self-attention (core/mpnet.py); relative position bias.
    "mpnet": lambda: MPNetConfig(**_ENC, pad_token_id=1, max_position_embeddings=64),
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
        "model.dtype=float32",  # exact comparisons (resume, world sizes, PEFT); auto would be bf16 on bf16 CPUs
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
