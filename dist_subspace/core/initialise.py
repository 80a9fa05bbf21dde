"""Where a simplex starts: independent vertices (the frozen model's own keys/values for random tokens, or normal
draws) and independent heads. A subspace needs distinct starting points, which one deterministic start does not
give (the paper's point)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from dist_subspace.core.model import PrefixSubspaceModel


def initial_head(num_vertices: int, hidden_size: int, num_outputs: int, seed: int) -> dict[str, torch.Tensor]:
    """Independent starting heads from ``seed`` (``nn.Linear``'s rule per vertex): ``weight`` ``[K, C, H]``,
    ``bias`` ``[K, C]``. A generator of its own, so a replica's head does not depend on what else drew numbers."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.empty(num_vertices, num_outputs, hidden_size)
    for w in weight:
        nn.init.kaiming_uniform_(w, a=5**0.5, generator=gen)
    bound = 1 / hidden_size**0.5
    bias = (torch.rand(num_vertices, num_outputs, generator=gen) * 2 - 1) * bound
    return {"weight": weight, "bias": bias}


def random_token_ids(
    num_vertices: int, prefix_length: int, vocab_size: int, exclude: Sequence[int] = (), seed: int = 0
) -> torch.Tensor:
    """``[K, P]`` token ids drawn uniformly from the vocabulary minus ``exclude`` (special tokens)."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[torch.tensor([i for i in exclude if i < vocab_size], dtype=torch.long)] = False
    pool = allowed.nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (num_vertices, prefix_length), generator=gen)]


def initial_vertices(
    model: PrefixSubspaceModel,
    method: str = "activations",
    seed: int = 0,
    std: float = 0.02,
    exclude_token_ids: Sequence[int] = (),
    vocab_size: int | None = None,
    num_vertices: int | None = None,
    average: int = 1,
) -> torch.Tensor:
    """Independent starting vertices ``[K, L, 2, H_kv, P, D]`` (float32, on the model's device).

    ``activations``: each vertex = the frozen model's keys/values for P random vocabulary tokens, its own
    tokens per vertex, drawn below ``vocab_size`` (pass ``len(tokenizer)``: embedding tables are often padded
    with rows no token uses) minus ``exclude_token_ids``. ``normal``: i.i.d. N(0, std^2).
    ``num_vertices``: K (default: the model's, per replica). ``average`` > 1: each vertex is the mean of that
    many draws, so K = 1 with ``average=3`` starts exactly at the centroid of the K = 3 start of the same seed.
    """
    k = (num_vertices or model.num_vertices) * average
    shape = (k, *model.simplex.vertices.shape[1:])
    device = model.simplex.vertices.device
    if method == "normal":
        gen = torch.Generator().manual_seed(seed)
        draws = (torch.randn(shape, generator=gen) * std).to(device)
    elif method == "activations":
        vocab = min(vocab_size or model.config.vocab_size, model.config.vocab_size)
        ids = random_token_ids(k, shape[4], vocab, exclude_token_ids, seed).to(device)
        draws = model.kv_activations(ids)
    else:
        raise ValueError(f"unknown prefix init {method!r}; use 'activations' or 'normal'")
    return draws.view(k // average, average, *shape[1:]).mean(1)
