"""Decoding from a prefix subspace: each example's response, from one point of the simplex or from a mixture of
several, with the prefix in the cache.

A *group* is what decodes one response: one row (a point: the centroid, a vertex, one sampled draw) or S rows (the
S points of ``ensemble:S``, each with its own prefix and its own cache). At every step the next-token distribution
of a group is the mean of its rows' distributions (a mixture; one row: its own), the group picks one token
(greedy, or sampled with ``temperature``), and every row of the group is fed that token. So ``ensemble:S`` decodes
S points together in one batched pass per token, and any mix of groups (an ensemble beside each of its points
alone, as predict does) shares the same forwards.

Beam search (``num_beams > 1``) runs transformers' own ``generate`` for one-row groups: the prefix fills the first
P positions of a ``DynamicCache``, the prompt follows P placeholder ids (which the cache already covers, so they are
never fed), and the attention mask counts the prefix; positions then continue after the prefix as in training.
``generate`` expands its tensors to ``num_beams`` rows per prompt but not a cache handed to it, so the cache holds
each row's prefix ``num_beams`` times already, in the order of its expansion (each prompt's beams side by side).

Distributed (ZeRO-3): every rank decodes an equal share of the groups, batches padded to the same count, and every
batch runs until the last rank's last group has ended (one all-reduce of a flag per step): every rank runs the
same number of forwards, as transformers' ``synced_gpus`` does, so the gathers of the sharded backbone never
hang. The texts are gathered on every rank, in example order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dist_subspace.core.arch import input_position_ids
from dist_subspace.core.model import PrefixSubspaceModel, prefix_attention_mask
from dist_subspace.data.batching import Collator
from dist_subspace.data.tasks import Example
from dist_subspace.evaluation.points import Point, rows_alpha, shard


@dataclass(frozen=True)
class Decoding:
    """How responses are decoded: greedy (``temperature`` 0), sampled, or beam search (``num_beams`` > 1)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    num_beams: int = 1
    seed: int = 0


@dataclass(frozen=True)
class DecodeQuery:
    """Decode every example of ``examples`` from ``points`` (one: that point; several: their mixture), with the
    simplex of seed replica ``replica``."""

    examples: Sequence[Example]
    points: Sequence[Point]
    replica: int = 0


@dataclass
class Decoded:
    """One query's responses: ``texts`` and new token ids per example, and the entropy (nats) of the distribution each
    token was drawn from, per generated token (the end-of-sequence token counted): the mixture's for an ensemble,
    the point's own for one point; 0 under beam search."""

    texts: list[str]
    token_ids: list[list[int]]
    entropy: list[float]


def _cache(prefix: torch.Tensor):
    """A ``DynamicCache`` holding the prefix ``[B, L, 2, H_kv, P, D]`` in its first P positions (full layers: a
    sliding-window layer's cache would drop the prefix; the masks keep the window among the input's tokens)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(prefix.shape[1]):
        cache.update(prefix[:, layer, 0], prefix[:, layer, 1], layer)
    return cache


@torch.no_grad()
def decode_rows(
    model: PrefixSubspaceModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    alpha: torch.Tensor,
    replica: torch.Tensor,
    groups: torch.Tensor,
    decoding: Decoding,
    eos_token_id: int,
    still_going=lambda going: going,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``[R, S]`` left-padded prompts, row r at ``alpha[r]`` ``[L(+1), K]`` of ``replica[r]``, rows of one
    group (``groups`` ``[R]``: ids 0..G-1) mixed -> each group's new tokens ``[G, N]`` (N <= max_new_tokens; after
    its end-of-sequence token, more of it) and its mixture's summed entropy over the tokens it generated ``[G]``.
    ``still_going(flag)``: whether any process still decodes (all-reduced under a launcher)."""
    backbone, config, device = model.backbone, model.config, input_ids.device
    rows, p, g = input_ids.shape[0], model.prefix_length, int(groups.max()) + 1
    prefix = model.prefix(alpha, rows, replica if model.num_replicas > 1 else None)
    cache = _cache(prefix)
    mask = torch.cat([attention_mask.new_ones(rows, p), attention_mask], dim=1)  # [R, P + S]
    positions = input_position_ids(model.spec, attention_mask, p, config)  # [R, S], from P on
    size = torch.zeros(g, device=device).index_add(0, groups, torch.ones(rows, device=device))  # rows per group
    generator = torch.Generator(device=device).manual_seed(decoding.seed)
    tokens, new = input_ids, []
    done = torch.zeros(g, dtype=torch.bool, device=device)
    entropy = torch.zeros(g, device=device)
    for _ in range(decoding.max_new_tokens):
        masks = prefix_attention_mask(config, mask, cache, tokens.shape[1], p, prefix.dtype)
        out = backbone(
            input_ids=tokens,
            attention_mask=masks,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()  # [R, V]
        if decoding.temperature > 0:
            logits = logits / decoding.temperature
        probs = torch.zeros(g, logits.shape[-1], device=device).index_add(0, groups, logits.softmax(-1))
        probs = probs / size[:, None]  # [G, V]: the mixture of each group's rows
        if decoding.temperature > 0:
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = probs.argmax(-1)
        entropy += torch.where(done, 0.0, -(probs * probs.clamp(min=1e-30).log()).sum(-1))
        token = token.masked_fill(done, eos_token_id)
        done |= token == eos_token_id
        new.append(token)
        if not still_going(not bool(done.all())):
            break
        tokens, positions = token[groups][:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
    return torch.stack(new, dim=1), entropy


@torch.no_grad()
def beam_rows(
    model: PrefixSubspaceModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    alpha: torch.Tensor,
    replica: torch.Tensor,
    decoding: Decoding,
    eos_token_id: int,
    pad_token_id: int,
    synced: bool,
) -> torch.Tensor:
    """Beam search for ``[R, S]`` left-padded prompts, one point per row, through transformers' ``generate`` (the
    prefix in its cache) -> new tokens ``[R, N]`` (after a row's end-of-sequence token, padding). ``synced``: every
    process runs as many forwards (``synced_gpus``, under ZeRO-3)."""
    rows, p = input_ids.shape[0], model.prefix_length
    prefix = model.prefix(alpha, rows, replica if model.num_replicas > 1 else None)  # [R, L, 2, H_kv, P, D]
    # generate() repeats input_ids and the mask num_beams times (repeat_interleave) but takes a given cache as it is:
    # it must hold R * num_beams rows already, in that order, or the first forward fails on the batch size.
    beams = prefix.repeat_interleave(decoding.num_beams, dim=0)  # [R * num_beams, L, 2, H_kv, P, D]
    placeholders = input_ids.new_full((rows, p), pad_token_id)  # covered by the cache: never fed
    full = torch.cat([placeholders, input_ids], dim=1)
    mask = torch.cat([attention_mask.new_ones(rows, p), attention_mask], dim=1)  # positions: cumsum - 1, from P on
    handle = model.backbone.register_forward_pre_hook(_prefix_visible(model.config, p, prefix.dtype), with_kwargs=True)
    try:
        out = model.backbone.generate(
            input_ids=full,
            attention_mask=mask,
            cache=_cache(beams),
            max_new_tokens=decoding.max_new_tokens,
            num_beams=decoding.num_beams,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            synced_gpus=synced,
        )
    finally:
        handle.remove()
    return out[:, full.shape[1] :]


def _prefix_visible(config, prefix_length: int, dtype: torch.dtype):
    """A forward pre-hook for ``generate``'s forwards: its 2D mask ``[B, P + T]`` becomes
    :func:`prefix_attention_mask`'s, so a sliding-window layer keeps the P prefix keys visible to every query, as
    training and :func:`decode_rows` keep them (``generate``'s own sliding masks would hide them from queries a
    window past them); unchanged for models without a window."""

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            width = kwargs["input_ids"].shape[1]
            kwargs["attention_mask"] = prefix_attention_mask(config, mask, kwargs["cache"], width, prefix_length, dtype)
        return args, kwargs

    return hook


def _cut(ids: list[int], eos: int) -> list[int]:
    """New token ids up to (without) the first end-of-sequence id."""
    return ids[: ids.index(eos)] if eos in ids else ids


@torch.no_grad()
def decode_texts(
    model: PrefixSubspaceModel,
    engine,
    queries: Sequence[DecodeQuery],
    collator: Collator,
    decoding: Decoding = Decoding(),
    batch_size: int = 32,
) -> list[Decoded]:
    """Every query's responses (:class:`Decoded`), decoded in stacked batches of at most ``batch_size`` rows
    (groups are never split), the groups of similar prompt lengths together, shared out between the processes
    (``engine``: ``rank``, ``world_size``, ``any_rank``, ``gather_objects``)."""
    if decoding.num_beams > 1 and any(len(q.points) > 1 for q in queries):
        raise ValueError(
            f"num_beams={decoding.num_beams}: beam search decodes one point at a time; decode an ensemble (a mixture "
            "of points) with num_beams=1"
        )
    model.eval()
    tokenizer, device = collator.tokenizer, model.simplex.vertices.device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    groups = [(q, i) for q, query in enumerate(queries) for i in range(len(query.examples))]
    groups.sort(key=lambda g: (len(collator.prompts([(g[1], queries[g[0]].examples[g[1]])])["input_ids"][0]), g))
    mine = [groups[j] for j in shard(len(groups), engine.rank, engine.world_size)]
    batches, current, rows = [], [], 0
    for group in mine:
        width = len(queries[group[0]].points)
        if current and rows + width > batch_size:
            batches.append(current)
            current, rows = [], 0
        current.append(group)
        rows += width
    if current:
        batches.append(current)
    most = max(engine.gather_objects(len(batches)))  # every process runs as many batches (and forwards)
    batches += [batches[-1] if batches else [groups[0]]] * (most - len(batches))
    results: dict[tuple[int, int], tuple[list[int], float]] = {}
    for batch in batches:
        items, alphas, replicas, group_ids = [], [], [], []
        for n, (q, i) in enumerate(batch):
            query = queries[q]
            index = torch.tensor([i], device=device)
            for point in query.points:
                items.append((i, query.examples[i]))
                alphas.append(rows_alpha(point, index, model.alpha_rows)[0])
                replicas.append(query.replica)
                group_ids.append(n)
        prompts = collator.prompts(items)
        ids, mask = prompts["input_ids"].to(device), prompts["attention_mask"].to(device)
        alpha, replica = torch.stack(alphas).to(device), torch.tensor(replicas, device=device)
        if decoding.num_beams > 1:
            new = beam_rows(model, ids, mask, alpha, replica, decoding, eos, pad, engine.world_size > 1)
            entropy = torch.zeros(len(batch))
        else:
            group = torch.tensor(group_ids, device=device)
            new, entropy = decode_rows(model, ids, mask, alpha, replica, group, decoding, eos, engine.any_rank)
        for n, key in enumerate(batch):
            tokens = _cut(new[n].tolist(), eos)
            results[key] = (tokens, entropy[n].item() / max(len(tokens) + (eos in new[n].tolist()), 1))
    gathered = {key: value for shard in engine.gather_objects(results) for key, value in shard.items()}
    decoded = []
    for q, query in enumerate(queries):
        ids = [gathered[(q, i)][0] for i in range(len(query.examples))]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        decoded.append(Decoded([t.strip() for t in texts], ids, [gathered[(q, i)][1] for i in range(len(ids))]))
    return decoded


def mean_token_entropy(decoded: Decoded) -> float:
    """The mixture's entropy per generated token, averaged over examples (nats; NaN for no example)."""
    return sum(decoded.entropy) / len(decoded.entropy) if decoded.entropy else math.nan
