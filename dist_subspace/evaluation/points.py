"""The points an evaluation scores, and how its rows are shared out: a point of the simplex (one for every example,
one per layer, or drawn per example), the queries (examples at a point, of a seed replica), each mode's points, and
an equal share of rows per process. What scoring (logits) and decoding (texts) both stack."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dist_subspace.core import simplex
from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.data.tasks import Example

EVAL_SEED = 0x5EED  # sampled evaluation points are fixed: the same run always scores the same points

# A point: ``[K]`` (one point), ``[L(+1), K]`` (one point per layer), or a function of the batch's example
# indices ``[B]`` returning ``[B, K]`` / ``[B, L(+1), K]`` (a point per example, see :func:`sampled_points`).
Point = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Query:
    """Score ``examples`` at ``point`` with the simplex of seed replica ``replica``."""

    examples: Sequence[Example]
    point: Point
    replica: int = 0


def shard(n: int, rank: int, world: int) -> list[int]:
    per_rank = math.ceil(n / world) if n else 0
    mine = list(range(rank, n, world))
    return mine + mine[: per_rank - len(mine)] if mine else [0] * per_rank


def rows_alpha(point: Point, index: torch.Tensor, rows: int) -> torch.Tensor:
    """A query's point for ``B`` rows with example indices ``index`` ``[B]`` -> ``[B, rows, K]``."""
    alpha = point(index) if callable(point) else point.to(index.device)
    if alpha.dim() == 2 and not callable(point):  # one point per layer, the same for every example
        return alpha.expand(len(index), rows, -1)
    return simplex.expand_alpha(alpha, len(index), rows)


def sampled_points(model: PrefixSubspaceModel, granularity: str, draw: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-example points of evaluation draw ``draw``: example indices ``[B]`` -> alpha (fixed seed)."""
    step = torch.full((), draw, dtype=torch.long, device=model.simplex.vertices.device)
    return lambda index: model.sample_alpha(step, index, granularity, seed=EVAL_SEED)


def whole_models(model: PrefixSubspaceModel, granularity: str, count: int) -> list[torch.Tensor]:
    """``count`` models of the subspace drawn as training draws them, each the same for every example: one
    point per layer ``[L(+1), K]`` for ``example_layer`` sampling, one point ``[K]`` otherwise."""
    per_model = "example_layer" if granularity == "example_layer" else "example"
    draws = torch.arange(count, device=model.simplex.vertices.device)
    step = torch.zeros((), dtype=torch.long, device=draws.device)
    return list(model.sample_alpha(step, draws, per_model, seed=EVAL_SEED))


def mode_points(model: PrefixSubspaceModel, kind: str, number: int | None, granularity: str) -> list[Point]:
    """The points a mode scores (``kind``, ``number`` from :func:`check_eval_mode`): one for ``centroid`` and
    ``vertex:I``; S draws of a point per example (and per layer, as training draws them) for ``ensemble:S`` and
    ``sampled:S``; S whole models, each the same for every example, for ``models:S``."""
    k = model.num_vertices
    if kind == "centroid":
        return [simplex.centroid_alpha(k)]
    if kind == "vertex":
        return [simplex.vertex_alpha(k, number)]
    if kind in ("ensemble", "sampled"):
        return [sampled_points(model, granularity, s) for s in range(number)]
    return whole_models(model, granularity, number)


def from_offset(point: Point, offset: int) -> Point:
    """``point`` for a slice of a longer example list that starts at ``offset``: a per-example point (a function
    of example indices) sees the indices of the whole list, so scoring the list in chunks draws the points that
    scoring it whole would."""
    if not callable(point) or offset == 0:
        return point
    return lambda index: point(index + offset)
