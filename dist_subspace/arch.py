"""Per-architecture facts: how to read the prefix geometry and where a prefixed input's positions start.

One small table instead of ``if "llama" in name`` scattered through the code. Add a family by adding a row
(and a tiny-model test in tests/test_model.py).
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
    """

    kind: Literal["decoder", "encoder"]
    positions: Literal["after_prefix", "from_zero", "padding_offset"]
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("decoder", "after_prefix"),
    "mistral": ArchSpec("decoder", "after_prefix"),
    "qwen2": ArchSpec("decoder", "after_prefix"),
    "qwen3": ArchSpec("decoder", "after_prefix"),
    "bert": ArchSpec("encoder", "from_zero", ("query", "value")),
    "roberta": ArchSpec("encoder", "padding_offset", ("query", "value")),
}


@dataclass(frozen=True)
class PrefixGeometry:
    """L layers, H_kv key/value heads (grouped-query attention aware), D head dim."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def arch_spec(config) -> ArchSpec:
    """The table row for a transformers config; a clear error for an unsupported family."""
    spec = ARCHITECTURES.get(config.model_type)
    if spec is None:
        raise ValueError(
            f"model type {config.model_type!r} is not supported; supported: {sorted(ARCHITECTURES)} "
            "(add a row to dist_subspace/arch.py::ARCHITECTURES)"
        )
    return spec


def prefix_geometry(config) -> PrefixGeometry:
    """Read L, H_kv and D from a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return PrefixGeometry(config.num_hidden_layers, kv_heads, head_dim)


def input_position_ids(spec: ArchSpec, attention_mask: torch.Tensor, prefix_length: int, config) -> torch.Tensor:
    """Position ids ``[B, S]`` for a prefixed input with its ``[B, S]`` mask (left or right padding)."""
    mask = attention_mask.long()
    rank = (mask.cumsum(-1) - 1).clamp(min=0)  # 0, 1, ... over real tokens, padding clamped
    if spec.positions == "after_prefix":
        return rank + prefix_length
    if spec.positions == "from_zero":
        return rank
    return (rank + 1) * mask + config.pad_token_id  # RoBERTa: pad -> pad_token_id, tokens from pad_token_id + 1
