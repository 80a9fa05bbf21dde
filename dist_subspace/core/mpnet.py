"""MPNet: the prefix enters through the self-attention, since transformers' MPNet takes no key/value cache.

transformers' ``MPNetSelfAttention`` projects queries, keys and values from the input only and adds to its scores a
relative position bias ``[B, H, S, S]``, computed once per forward in ``MPNetEncoder`` from the input's indices.
:func:`install` turns each such module of a backbone into a :class:`PrefixMPNetSelfAttention`: the class changes,
nothing else (same parameters, names and weights, so loads, ZeRO-3 partitions and state dicts are untouched), and it
computes exactly the stock attention until :func:`prefixed` hands it a prefix for one forward. Then:

- the layer's prefix keys and values ``[B, H, P, D]`` go in front of the input's (like a cache's past keys);
- the relative position bias gets P **zero** columns: a prefix key is a learned context with no position, so it
  scores on content alone, the same way for every query (docs/families.md says why);
- the attention mask gets P visible columns: every query sees the prefix, masked padding keys stay masked;
- the input keeps its positions (``padding_offset``, as RoBERTa: from ``pad_token_id + 1``).

The prefix lives on the backbone's own modules and only while :func:`prefixed` is open, so two models in one process
never see each other's, and nothing global is touched. Under DeepSpeed ZeRO-3 the forward calls the module's own
q, k, v and o projections, which DeepSpeed gathers and releases through its hooks on them, as in the stock forward.
transformers refuses gradient checkpointing for MPNet, so no layer is ever re-run after :func:`prefixed` closes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

LayerPrefix = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # keys, values [B, H, P, D]; visible [B, P]


def prefix_key_mask(
    attention_mask: torch.Tensor | None, visible: torch.Tensor, seq: int, dtype: torch.dtype
) -> torch.Tensor:
    """transformers' additive mask ``[B, 1, S, S]`` (None without padding) and which prefix keys are visible ``[B, P]``
    (bool) -> an additive ``[B, 1, S | 1, P + S]``: 0 for a visible prefix key, the dtype's minimum for a hidden one,
    the input's columns as they were (padded keys stay masked)."""
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        raise ValueError("MPNet's prefix attention expects transformers' additive (eager) mask, got a boolean one")
    dtype = attention_mask.dtype if attention_mask is not None else dtype
    columns = torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]  # [B, 1, 1, P]
    if attention_mask is None:
        return F.pad(columns, (0, seq))
    return torch.cat([columns.expand(-1, 1, attention_mask.shape[2], -1), attention_mask], dim=-1)


class PrefixMPNetSelfAttention(MPNetSelfAttention):
    """MPNet self-attention that puts its layer's prefix (:attr:`prefix`, set by :func:`prefixed`) before the input.

    ``hidden_states`` ``[B, S, H*D]``, ``attention_mask`` additive ``[B, 1, S, S]`` or None, ``position_bias``
    ``[B, H, S, S]`` -> ``(output [B, S, H*D],)`` (plus the probabilities ``[B, H, S, P + S]`` when asked).
    """

    prefix: LayerPrefix | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, ...]:
        if self.prefix is None:
            return super().forward(hidden_states, attention_mask, position_bias, output_attentions, **kwargs)
        prefix_keys, prefix_values, visible = self.prefix
        batch, seq, p = hidden_states.shape[0], hidden_states.shape[1], prefix_keys.shape[2]
        shape = (batch, seq, -1, self.attention_head_size)
        q = self.q(hidden_states).view(shape).transpose(1, 2)  # [B, H, S, D]
        k = torch.cat([prefix_keys, self.k(hidden_states).view(shape).transpose(1, 2)], dim=2)  # [B, H, P + S, D]
        v = torch.cat([prefix_values, self.v(hidden_states).view(shape).transpose(1, 2)], dim=2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)  # [B, H, S, P + S]
        if position_bias is not None:
            scores = scores + F.pad(position_bias, (p, 0))  # no bias for a prefix key: it has no position
        if attention_mask is not None or visible is not None:  # else every key is visible: no mask, as transformers
            if visible is None:
                visible = torch.ones(batch, p, dtype=torch.bool, device=scores.device)
            scores = scores + prefix_key_mask(attention_mask, visible, seq, scores.dtype)
        probs = self.dropout(F.softmax(scores, dim=-1))
        context = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, self.all_head_size)
        out = self.o(context)
        return (out, probs) if output_attentions else (out,)


def install(backbone: nn.Module) -> int:
    """Make every MPNet self-attention of ``backbone`` a :class:`PrefixMPNetSelfAttention` (idempotent; only the class
    changes). Returns how many layers take a prefix."""
    for module in backbone.modules():
        if type(module) is MPNetSelfAttention:
            module.__class__ = PrefixMPNetSelfAttention
    return len(attention_layers(backbone))


def attention_layers(backbone: nn.Module) -> list[PrefixMPNetSelfAttention]:
    """The installed self-attention modules, layer 0 first."""
    return [m for m in backbone.modules() if isinstance(m, PrefixMPNetSelfAttention)]


@contextmanager
def prefixed(backbone: nn.Module, prefix: torch.Tensor, visible: torch.Tensor | None = None) -> Iterator[None]:
    """While open, layer l of ``backbone`` attends to ``prefix[:, l]`` (``prefix`` ``[B, L, 2, H, P, D]``: keys and
    values, in the backbone's compute dtype) before the input. ``visible`` ``[B, P]`` (bool, default all True) hides
    some prefix keys (a masked-out prefix changes nothing). Unbound, not indexed, as ``model.prefix_cache``."""
    layers = attention_layers(backbone)
    if len(layers) != prefix.shape[1]:
        raise ValueError(f"a prefix of {prefix.shape[1]} layers for {len(layers)} prefix-taking MPNet layers")
    for module, layer in zip(layers, prefix.unbind(1), strict=True):
        module.prefix = (*layer.unbind(1), visible)
    try:
        yield
    finally:
        for module in layers:
            module.prefix = None


@torch.no_grad()
def kv_activations(backbone: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """The frozen model's own keys/values for ``token_ids`` ``[N, P]`` -> ``[N, L, 2, H, P, D]``, read off each
    layer's k and v projections by forward hooks (no cache needed)."""
    layers = attention_layers(backbone)
    captured: dict[tuple[int, int], torch.Tensor] = {}

    def keeper(layer: int, kind: int, head_dim: int):
        def keep(module: nn.Module, args, output: torch.Tensor) -> None:
            captured[layer, kind] = output.view(*output.shape[:2], -1, head_dim).transpose(1, 2)  # [N, H, P, D]

        return keep

    hooks = [
        proj.register_forward_hook(keeper(i, kind, module.attention_head_size))
        for i, module in enumerate(layers)
        for kind, proj in enumerate((module.k, module.v))
    ]
    try:
        backbone(input_ids=token_ids, attention_mask=torch.ones_like(token_ids))
    finally:
        for hook in hooks:
            hook.remove()
    pairs = [torch.stack([captured[i, 0], captured[i, 1]], dim=1) for i in range(len(layers))]  # L x [N, 2, H, P, D]
    return torch.stack(pairs, dim=1).float()
