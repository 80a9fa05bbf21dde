"""Per-architecture facts: how to read the prefix geometry and where a prefixed input's positions start.

One small table instead of ``if "llama" in name`` scattered through the code. Add a family by adding a row and
a tiny random config in tests/conftest.py (tests/test_model.py then runs it; tests/test_families.py holds the
family-specific checks). Known families that cannot take a prefix are refused with the reason (``REFUSED``).
Sliding-window layers never hide the prefix (:func:`sliding_window`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class ArchSpec:
    """kind: ``decoder`` classifies with a verbalizer, ``encoder`` with a simplex head.

    positions: ``after_prefix`` (decoders: the input continues after the P prefix tokens, as in prefix
    tuning), ``from_zero`` (BERT: the input keeps its pretrained positions 0..S-1, so a masked-out prefix
    is a no-op), ``padding_offset`` (RoBERTa: positions start at ``pad_token_id + 1``).
    lora_targets: the attention query and value projections, where the LoRA baseline goes.
    injection: ``cache`` (a transformers cache returns the prefix keys/values before the input's), ``attention``
    (the family's attention has no cache: its self-attention takes the prefix itself, MPNet: core/mpnet.py).
    """

    kind: Literal["decoder", "encoder"]
    positions: Literal["after_prefix", "from_zero", "padding_offset"]
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    injection: Literal["cache", "attention"] = "cache"


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("decoder", "after_prefix"),
    "mistral": ArchSpec("decoder", "after_prefix"),
    "qwen2": ArchSpec("decoder", "after_prefix"),
    "qwen3": ArchSpec("decoder", "after_prefix"),
    "gemma2": ArchSpec("decoder", "after_prefix"),
    "gemma3_text": ArchSpec("decoder", "after_prefix"),
    "phi3": ArchSpec("decoder", "after_prefix", ("qkv_proj",)),
    "gpt_neox": ArchSpec("decoder", "after_prefix", ("query_key_value",)),
    "mixtral": ArchSpec("decoder", "after_prefix"),
    "qwen2_moe": ArchSpec("decoder", "after_prefix"),
    "bert": ArchSpec("encoder", "from_zero", ("query", "value")),
    "roberta": ArchSpec("encoder", "padding_offset", ("query", "value")),
    "mpnet": ArchSpec("encoder", "padding_offset", ("q", "v"), injection="attention"),  # positions from pad + 1
}

# Families we know and refuse, with what is missing (one line each, shown to the user as is).
REFUSED: dict[str, str] = {
    "deberta-v2": (
        "its disentangled attention takes no key/value cache (transformers' DebertaV2 layers have no past keys) "
        "and its content-to-position terms need a relative position for every key, which a prefix has none of"
    ),
    "deberta": "same as deberta-v2: disentangled attention with no key/value cache and no position for a prefix key",
    "gemma3": "this is the multimodal Gemma 3 wrapper; load its text model (model_type gemma3_text) instead",
}


@dataclass(frozen=True)
class PrefixGeometry:
    """L layers, H_kv key/value heads (grouped-query attention aware), D head dim."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def arch_spec(config) -> ArchSpec:
    """The table row for a transformers config; a clear error for an unsupported family."""
    model_type = config.model_type
    if model_type in REFUSED:
        raise ValueError(f"model type {model_type!r} is not supported: {REFUSED[model_type]}")
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise ValueError(
            f"model type {model_type!r} is not supported: no row for it in dist_subspace/core/arch.py::ARCHITECTURES "
            f"(its prefix geometry and position rule are not known here); supported: {sorted(ARCHITECTURES)}"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"model type {model_type!r} with use_bidirectional_attention is not supported: not causal")
    return spec


def prefix_geometry(config) -> PrefixGeometry:
    """Read L, H_kv and D from a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return PrefixGeometry(config.num_hidden_layers, kv_heads, head_dim)


def sliding_window(config) -> int | None:
    """The window of the model's sliding-window attention layers, or None when every layer attends to all keys.

    A prefix stays visible to every query whatever the window (as in prefix tuning: it is a learned context, not
    past text that scrolls out); :func:`dist_subspace.core.model.prefix_attention_mask` builds the masks that say so.
    """
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return getattr(config, "sliding_window", None) or None  # Qwen2-MoE stores 0 for "no window"


def input_position_ids(spec: ArchSpec, attention_mask: torch.Tensor, prefix_length: int, config) -> torch.Tensor:
    """Position ids ``[B, S]`` for a prefixed input with its ``[B, S]`` mask (left or right padding)."""
    mask = attention_mask.long()
    rank = (mask.cumsum(-1) - 1).clamp(min=0)  # 0, 1, ... over real tokens, padding clamped
    if spec.positions == "after_prefix":
        return rank + prefix_length
    if spec.positions == "from_zero":
        return rank
    return (rank + 1) * mask + config.pad_token_id  # RoBERTa: pad -> pad_token_id, tokens from pad_token_id + 1
