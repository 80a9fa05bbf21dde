"""Prefix-aware attention: SDPA that keeps its causal fast path and grouped key/value heads behind a prefix.

With a prefix of P keys in front of S input tokens, stock transformers gives SDPA an explicit ``[B, 1, S, P+S]``
mask (``is_causal`` only holds when queries and keys are equally many) and, whenever a mask is given, repeats
the key/value heads up to the query heads. Neither is needed: a decoder's pattern is plain causal attention
aligned to the *lower right* of the ``S x (P+S)`` score matrix (the prefix is visible to every query, the input
part is causal), and SDPA groups heads itself (``enable_gqa``). This module registers one implementation,
``prefix_sdpa``, in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (no model code forked):

- the mask function returns **no mask** when padding does not need one: no padding, or right padding (a causal
  query never sees the pads that follow it), and for encoders no padding; a left-padded decoder batch gets
  transformers' own causal + padding mask, an encoder batch a ``[B, 1, 1, P+S]`` key-padding mask;
- the attention function runs the causal pattern without a mask where the kernel allows it (see
  :func:`_causal_without_mask`), never repeats key/value heads, and, where it runs without a mask, keeps the
  prefix visible to sliding-window layers whatever the window (the window applies to input tokens only; a
  given mask is used as it is: :func:`dist_subspace.core.model.prefix_attention_mask` builds prefix-visible ones).

Every path taken is counted in :data:`attention_paths` and logged once (``logging``, INFO). Use it through
:func:`enable`, which :class:`~dist_subspace.core.model.PrefixSubspaceModel` calls on its backbone.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)
from transformers.utils.generic import is_tracing

PREFIX_ATTENTION = "prefix_sdpa"
# torch's CPU flash kernel splits keys in blocks of this many; with is_causal it skips the blocks above the diagonal,
# which pays for P padded query rows once there is more than one block. Measured (P = 16, attention forward and
# backward, 9/3 heads, CPU time over the no-prefix is_causal): up to 512 keys one [S, P+S] mask costs 1.05-1.23x
# and the square 1.10-1.68x; beyond, the square 1.03-1.06x and the mask 1.10-1.45x.
CPU_KEY_BLOCK = 512

logger = logging.getLogger(__name__)
attention_paths: Counter[str] = Counter()  # path name -> calls, over this process (reset it to measure)


def _took(path: str) -> None:
    if path not in attention_paths:
        logger.info("prefix attention: %s", path)
    attention_paths[path] += 1


# ---- masks ---------------------------------------------------------------------------------------
def _right_padded(padding: torch.Tensor, first_query: int) -> bool:
    """Whether a ``[B, kv]`` key mask shows every key before ``first_query`` (the prefix) and pads the input
    only at its end, so that a causal query never sees a pad. One host sync."""
    past, new = padding[:, :first_query], padding[:, first_query:]
    return bool(past.all() & (new[:, 1:] <= new[:, :-1]).all())


def prefix_sdpa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    **kwargs,
) -> torch.Tensor | None:
    """transformers' mask hook for ``prefix_sdpa``: ``None`` where the attention function needs no mask, a
    ``[B, 1, 1, kv]`` key-padding mask for padded encoder batches, transformers' ``[B, 1, S, kv]`` causal +
    padding mask for decoder batches with pads before real tokens; anything else (overlays, packed sequences,
    static caches, chunked attention) is left to transformers' own SDPA mask."""
    args = dict(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=allow_is_causal_skip,
        allow_is_bidirectional_skip=allow_is_bidirectional_skip,
        **kwargs,
    )
    # transformers may answer with no mask when it counts on SDPA's upper-left ``is_causal`` (a static cache's
    # prefill: S queries before empty slots). This path reads no mask as lower-right causal, so where queries and
    # keys differ in number, transformers' fallback must always build the mask.
    args["allow_is_causal_skip"] = allow_is_causal_skip and q_length == kv_length
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # [B, kv] bool or None
    if kv_offset != 0 or isinstance(q_offset, torch.Tensor) or (padding is not None and is_tracing(padding)):
        return sdpa_mask(**args)
    chunked = getattr(kwargs.get("config"), "attention_chunk_size", None) is not None
    if allow_is_causal_skip and not chunked and q_offset + q_length == kv_length:
        # A plain causal (or sliding-window causal) request, queries aligned to the last keys.
        if padding is None or _right_padded(padding, q_offset):
            return None
        # Pads before real tokens: transformers' own mask (causal, its window, padding).
        return sdpa_mask(**args)
    if allow_is_bidirectional_skip and mask_function is bidirectional_mask_function:
        if padding is None or bool(padding.all()):
            return None
        return padding[:, None, None, :]  # [B, 1, 1, kv]: broadcast over heads and queries
    return sdpa_mask(**args)


def visible_keys(
    q_length: int, kv_length: int, prefix_length: int = 0, window: int | None = None, device=None
) -> torch.Tensor:
    """``[S, P+S]`` bool: query i (the (P+i)-th position) sees key j when j <= P + i (lower-right causal) and,
    with a sliding ``window``, when j is one of the last ``window`` keys or one of the ``prefix_length``
    prefix keys."""
    query_pos = torch.arange(q_length, device=device)[:, None] + (kv_length - q_length)
    key_pos = torch.arange(kv_length, device=device)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= (key_pos > query_pos - window) | (key_pos < prefix_length)
    return visible


# ---- attention -----------------------------------------------------------------------------------
def _flash_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, gqa: bool) -> bool:
    """Whether CUDA flash attention accepts these inputs (it aligns causal attention to the lower right)."""
    if not query.is_cuda:
        return False
    params = torch.backends.cuda.SDPAParams(query, key, value, None, dropout, False, gqa)
    return torch.backends.cuda.can_use_flash_attention(params)


def _causal_without_mask(query, key, value, sdpa, dropout: float, gqa: bool) -> tuple[torch.Tensor, str]:
    """Lower-right causal attention, query ``[B, H, S, D]`` over key/value ``[B, H_kv, P+S, D]``, without a
    ``[B, 1, S, P+S]`` mask. Returns the output ``[B, H, S, D]`` and the path's name.

    - P = 0: SDPA's ``is_causal``, the no-prefix fast path;
    - CUDA flash available: a ``causal_lower_right`` bias, which SDPA hands to flash attention natively;
    - otherwise (CPU: beyond one key block): the query padded with P zero rows in front, so queries and keys are equally
      many and ``is_causal`` (upper-left aligned) is exactly the lower-right pattern; the P rows are dropped;
    - CPU, up to one key block: one ``[S, P+S]`` mask shared by the batch and the heads (cheaper there).
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == kv_len:
        return sdpa(query, key, value, is_causal=True), "causal, no prefix: is_causal"
    if q_len == 1:
        return sdpa(query, key, value), "causal, one query: no mask"
    if _flash_takes(query, key, value, dropout, gqa):
        return sdpa(query, key, value, attn_mask=causal_lower_right(q_len, kv_len)), "causal: lower-right bias (flash)"
    if query.device.type != "cpu" or kv_len > CPU_KEY_BLOCK:
        pad = kv_len - q_len
        out = sdpa(F.pad(query, (0, 0, pad, 0)), key, value, is_causal=True)[:, :, pad:]
        return out, "causal: query padded to a square, is_causal"
    mask = visible_keys(q_len, kv_len, device=query.device)
    return sdpa(query, key, value, attn_mask=mask), "causal: one [S, P+S] mask for the batch"


def prefix_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    prefix_length: int = 0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention hook for ``prefix_sdpa``: query ``[B, H, S, D]``, key/value ``[B, H_kv, P+S, D]``
    (the prefix first), the mask from :func:`prefix_sdpa_mask` -> output ``[B, S, H, D]``, no weights.

    Without a mask, ``prefix_length`` (forwarded by the caller; 0: transformers' rule) marks the keys a sliding
    window never hides; the window comes from the layer (``sliding_window``, or the module's attribute for
    families that do not pass it).
    """
    for name in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{PREFIX_ATTENTION} does not support {name}; load the model with eager attention")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = (sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)) or None
    q_len, kv_len = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]  # grouped key/value heads: SDPA groups them, nothing is repeated
    sdpa = partial(F.scaled_dot_product_attention, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    window_bites = causal and window is not None and kv_len - prefix_length > window
    if attention_mask is not None:  # causality, padding and any window are in it (model.prefix_attention_mask)
        out = sdpa(query, key, value, attn_mask=attention_mask)
        kind = "causal" if causal else "bidirectional"
        path = f"{kind}: {'[B, 1, 1, P+S]' if attention_mask.shape[-2] == 1 else '[B, 1, S, P+S]'} mask"
    elif not causal:
        out, path = sdpa(query, key, value), "bidirectional: no mask"
    elif window_bites:
        band = visible_keys(q_len, kv_len, prefix_length, window, query.device)  # [S, P+S]
        out, path = sdpa(query, key, value, attn_mask=band), "causal, sliding window: one [S, P+S] mask for the batch"
    else:
        out, path = _causal_without_mask(query, key, value, sdpa, dropout, gqa)
    _took(path)
    return out.transpose(1, 2).contiguous(), None


# ---- registration --------------------------------------------------------------------------------
def register() -> None:
    """Make ``prefix_sdpa`` known to transformers (idempotent)."""
    AttentionInterface.register(PREFIX_ATTENTION, prefix_sdpa_attention)
    AttentionMaskInterface.register(PREFIX_ATTENTION, prefix_sdpa_mask)


def enable(backbone: nn.Module) -> bool:
    """Switch ``backbone`` from transformers' SDPA to ``prefix_sdpa``; a backbone that runs another
    implementation (eager, flash-attention, flex: the user's choice, or the family's only one) keeps it.
    Returns whether the prefix path is on."""
    config = backbone.config
    if config._attn_implementation == PREFIX_ATTENTION:
        return True
    if config._attn_implementation != "sdpa" or getattr(config, "attention_chunk_size", None) is not None:
        logger.info("prefix attention: %s keeps %s", config.model_type, config._attn_implementation)
        return False
    register()
    backbone.set_attn_implementation(PREFIX_ATTENTION)
    return True


def disable(backbone: nn.Module) -> None:
    """Back to transformers' SDPA (the default path: an explicit mask, repeated key/value heads)."""
    if backbone.config._attn_implementation == PREFIX_ATTENTION:
        backbone.set_attn_implementation("sdpa")
