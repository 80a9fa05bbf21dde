"""Scoring a prefix subspace: centroid, a vertex, an ensemble of sampled points, or S sampled models.

Distributed: each rank scores an equal-length shard (padded by repeating examples, since under ZeRO-3 every
rank must run the same number of forwards), then the outputs are gathered and de-duplicated by example
index, so no example is dropped or counted twice at uneven splits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dist_subspace import simplex
from dist_subspace.config import check_eval_mode
from dist_subspace.data import Collator, Example, TaskSpec
from dist_subspace.metrics import compute_metrics, predict
from dist_subspace.model import PrefixSubspaceModel

EVAL_SEED = 0x5EED  # sampled evaluation points are fixed: the same run always scores the same points


def _shard(n: int, rank: int, world: int) -> list[int]:
    per_rank = math.ceil(n / world) if n else 0
    mine = list(range(rank, n, world))
    return mine + mine[: per_rank - len(mine)] if mine else [0] * per_rank


@torch.no_grad()
def model_outputs(
    model: PrefixSubspaceModel,
    engine,
    examples: Sequence[Example],
    collator: Collator,
    batch_size: int,
    alphas: Sequence[torch.Tensor | Callable[[torch.Tensor], torch.Tensor]],
) -> list[torch.Tensor]:
    """Class logits ``[N, C]`` (float32, in example order) for each alpha in ``alphas``: a ``[K]`` point, or
    a function of the batch's example indices ``[B]`` (see :func:`sampled_points`).

    ``engine`` gives ``rank``, ``world_size`` and ``gather_objects`` (:class:`dist_subspace.engine.Engine`).
    """
    model.eval()
    order = _shard(len(examples), engine.rank, engine.world_size)
    lengths = [len(examples[i]["text"]) + len(examples[i].get("text_pair") or "") for i in order]
    order = [i for _, i in sorted(zip(lengths, order, strict=True))]  # similar lengths batch together
    device = model.simplex.vertices.device
    results: list[list[tuple[int, torch.Tensor]]] = [[] for _ in alphas]
    for start in range(0, len(order), batch_size):
        ids = order[start : start + batch_size]
        batch = collator([(i, examples[i]) for i in ids])
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        segments = batch["token_type_ids"].to(device) if "token_type_ids" in batch else None
        index = batch["index"].to(device)
        for a, alpha in enumerate(alphas):
            point = alpha(index) if callable(alpha) else alpha.to(device)
            logits = model(input_ids, mask, point, segments).float().cpu()
            results[a].extend(zip(ids, logits, strict=True))
    outputs = []
    for pairs in results:
        gathered = {i: t for shard in engine.gather_objects(pairs) for i, t in shard}
        outputs.append(torch.stack([gathered[i] for i in range(len(examples))]) if examples else torch.empty(0))
    return outputs


def sampled_points(model: PrefixSubspaceModel, granularity: str, draw: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-example points of evaluation draw ``draw``: example indices ``[B]`` -> alpha (fixed seed)."""
    step = torch.full((), draw, dtype=torch.long, device=model.simplex.vertices.device)
    return lambda index: model.sample_alpha(step, index, granularity, seed=EVAL_SEED)


def _probabilities(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    return logits if task.regression and logits.shape[-1] == 1 else logits.softmax(-1)


def evaluate(
    model: PrefixSubspaceModel,
    engine,
    examples: Sequence[Example],
    collator: Collator,
    task: TaskSpec,
    mode: str,
    batch_size: int = 32,
    granularity: str = "example_layer",
) -> dict:
    """Score ``examples`` under ``mode``; returns metrics, ``mode`` and ``n`` (plus ``*_std`` for sampled)."""
    kind, number = check_eval_mode(mode)
    k = model.num_vertices
    labels = torch.tensor([e["label"] for e in examples])
    if kind in ("centroid", "vertex"):
        point = simplex.centroid_alpha(k) if kind == "centroid" else simplex.vertex_alpha(k, number)
        (logits,) = model_outputs(model, engine, examples, collator, batch_size, [point])
        result = compute_metrics(task, predict(task, logits), labels)
    elif kind == "ensemble":
        draws = [sampled_points(model, granularity, s) for s in range(number)]
        outputs = model_outputs(model, engine, examples, collator, batch_size, draws)
        mean = torch.stack([_probabilities(task, o) for o in outputs]).mean(0)
        logits = mean if task.regression and mean.shape[-1] == 1 else mean.log()
        result = compute_metrics(task, predict(task, logits), labels)
    else:  # sampled: S models of the subspace, each one point for every example
        points = simplex.sample_alpha(EVAL_SEED, torch.tensor(0), torch.arange(number), k, 1, "example")
        outputs = model_outputs(model, engine, examples, collator, batch_size, list(points))
        runs = [compute_metrics(task, predict(task, o), labels) for o in outputs]
        result = {}
        for key in runs[0]:
            values = torch.tensor([r[key] for r in runs], dtype=torch.float64)
            result[key] = values.mean().item()
            result[f"{key}_std"] = values.std(unbiased=False).item()
        result["samples"] = [r[task.metric] for r in runs]
    return {**result, "mode": mode, "n": len(examples)}


def write_landscape(
    model: PrefixSubspaceModel,
    engine,
    examples: list[Example],
    collator: Collator,
    task: TaskSpec,
    out_dir: Path,
    resolution: int = 8,
    batch_size: int = 32,
) -> Path | None:
    """``landscape.png``: the metric over a grid on the triangle (K = 3) or along each vertex-to-centroid
    segment (K = 2 or K > 3); ``landscape.json`` holds the numbers. Returns the PNG path (on rank 0)."""
    from dist_subspace import landscape

    k = model.num_vertices
    if k < 2 or not examples:
        return None
    labels = torch.tensor([e["label"] for e in examples])
    if k == 3:
        points = landscape.triangle_grid(resolution)  # [G, 3]
    else:
        points = landscape.segment_points(k, resolution + 1).reshape(-1, k)  # [K * steps, K]
    outputs = model_outputs(model, engine, examples, collator, batch_size, list(points))
    values = torch.tensor([compute_metrics(task, predict(task, o), labels)[task.metric] for o in outputs])
    if not engine.is_main:
        return None
    path = out_dir / "landscape.png"
    title = f"{task.name}: {task.metric} over the simplex, n={len(examples)}"
    if k == 3:
        landscape.plot_triangle(points, values, path, title, task.metric)
    else:
        ts = torch.linspace(0, 1, resolution + 1)
        landscape.plot_segments(ts, values.view(k, -1), path, title, task.metric)
    record = {"points": points.tolist(), "values": values.tolist(), "metric": task.metric, "n": len(examples)}
    (out_dir / "landscape.json").write_text(json.dumps(record) + "\n")
    return path
