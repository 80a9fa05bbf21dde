"""Scoring a prefix subspace: centroid, a vertex, an ensemble of sampled points, or S sampled models.

Every score is a list of *queries* (examples, a point of the simplex, a seed replica). Their rows (example x
query) are stacked into the batch dimension, sorted by length and cut into batches of ``batch_size`` rows,
so the S points of an ensemble, the S models of ``sampled:S``, the landscape's grid and the R seed replicas
share every forward: under ZeRO-3 one gather of the backbone serves them all, instead of one per point.

Distributed: each rank scores an equal number of rows (padded by repeating rows, since under ZeRO-3 every
rank must run the same number of forwards), then the outputs are gathered and de-duplicated by
(query, example), so no example is dropped or counted twice at uneven splits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_subspace.core import simplex
from dist_subspace.core.config import check_eval_mode
from dist_subspace.core.files import write_json
from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.data.batching import Collator
from dist_subspace.data.tasks import Example, TaskSpec
from dist_subspace.evaluation.metrics import compute_metrics, predict

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


def _shard(n: int, rank: int, world: int) -> list[int]:
    per_rank = math.ceil(n / world) if n else 0
    mine = list(range(rank, n, world))
    return mine + mine[: per_rank - len(mine)] if mine else [0] * per_rank


def _length(example: Example) -> int:
    return len(example["text"]) + len(example.get("text_pair") or "")


def _rows_alpha(point: Point, index: torch.Tensor, rows: int) -> torch.Tensor:
    """A query's point for ``B`` rows with example indices ``index`` ``[B]`` -> ``[B, rows, K]``."""
    alpha = point(index) if callable(point) else point.to(index.device)
    if alpha.dim() == 2 and not callable(point):  # one point per layer, the same for every example
        return alpha.expand(len(index), rows, -1)
    return simplex.expand_alpha(alpha, len(index), rows)


@torch.no_grad()
def model_outputs(
    model: PrefixSubspaceModel,
    engine,
    queries: Sequence[Query],
    collator: Collator,
    batch_size: int,
    desc: str | None = None,
) -> list[torch.Tensor]:
    """Class logits ``[N_q, C]`` (float32, on the CPU, in example order) for each query.

    ``batch_size`` counts rows (example x query) per forward: the memory budget. ``engine`` gives ``rank``,
    ``world_size``, ``is_main`` and ``gather_objects`` (:class:`dist_subspace.training.engine.Engine`). ``desc``: show a
    progress bar (main process) under that name.
    """
    model.eval()
    rows = [(q, i) for q, query in enumerate(queries) for i in range(len(query.examples))]
    # Similar lengths batch together; the rows of one example (its S points) stay side by side. The key holds only
    # values every rank agrees on (never an object's address): each rank takes its share of the same order.
    rows.sort(key=lambda r: (_length(queries[r[0]].examples[r[1]]), queries[r[0]].replica, r[1], r[0]))
    mine = [rows[j] for j in _shard(len(rows), engine.rank, engine.world_size)]
    device = model.simplex.vertices.device
    results: list[tuple[int, int, torch.Tensor]] = []
    starts = range(0, len(mine), batch_size)
    if desc is not None and engine.is_main:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", dynamic_ncols=True, leave=False)
    for start in starts:
        chunk = mine[start : start + batch_size]
        batch = collator([(i, queries[q].examples[i]) for q, i in chunk])
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        segments = batch["token_type_ids"].to(device) if "token_type_ids" in batch else None
        index = batch["index"].to(device)
        which = torch.tensor([q for q, _ in chunk], device=device)
        alpha = torch.empty(len(chunk), model.alpha_rows, model.num_vertices, device=device)
        for q in sorted({q for q, _ in chunk}):
            at = (which == q).nonzero().squeeze(1)
            alpha[at] = _rows_alpha(queries[q].point, index[at], model.alpha_rows).to(alpha.dtype)
        replica = torch.tensor([queries[q].replica for q, _ in chunk], device=device)
        logits = model(input_ids, mask, alpha, segments, replica=replica).float().cpu()  # one copy per batch
        results.extend((q, i, row) for (q, i), row in zip(chunk, logits, strict=True))
    gathered = {(q, i): t for shard in engine.gather_objects(results) for q, i, t in shard}
    return [
        torch.stack([gathered[(q, i)] for i in range(len(query.examples))]) if query.examples else torch.empty(0)
        for q, query in enumerate(queries)
    ]


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


def _probabilities(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    return logits if task.regression and logits.shape[-1] == 1 else logits.softmax(-1)


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


def _score(task: TaskSpec, kind: str, outputs: list[torch.Tensor], labels: torch.Tensor) -> dict:
    if kind == "ensemble":
        mean = torch.stack([_probabilities(task, o) for o in outputs]).mean(0)
        logits = mean if task.regression and mean.shape[-1] == 1 else mean.log()
        return compute_metrics(task, predict(task, logits), labels)
    if kind not in ("sampled", "models"):
        return compute_metrics(task, predict(task, outputs[0]), labels)
    runs = [compute_metrics(task, predict(task, o), labels) for o in outputs]
    result = {}
    for key in runs[0]:
        values = torch.tensor([r[key] for r in runs], dtype=torch.float64)
        result[key] = values.mean().item()
        result[f"{key}_std"] = values.std().item() if len(runs) > 1 else 0.0  # sample SD over the S draws
    result["samples"] = [r[task.metric] for r in runs]
    return result


def score_replicas(
    model: PrefixSubspaceModel,
    engine,
    examples: Sequence[Sequence[Example]],
    collator: Collator,
    task: TaskSpec,
    mode: str,
    batch_size: int = 32,
    granularity: str = "example_layer",
    desc: str | None = None,
    extra_points: Sequence[Point] = (),
) -> list[tuple[dict, list[torch.Tensor], list[torch.Tensor]]]:
    """Score each replica r on ``examples[r]`` under ``mode``, all in one stacked pass; per replica: the result
    (the metrics, ``mode`` and ``n``, plus ``*_std`` and ``samples`` for ``sampled:S``/``models:S``), the class
    logits ``[N, C]`` of each of the mode's points, and those of each of ``extra_points`` (scored in the same pass,
    e.g. the centroid beside an ensemble's S points, for calibration, at the cost of one more point).

    ``sampled:S`` is the paper's non-deterministic validation metric: S draws, in each a point per example (and
    per layer for ``example_layer``) drawn as training draws it; the metric of each draw, then their mean and
    sample SD. ``ensemble:S`` averages class probabilities over the same S points; ``models:S`` scores S whole
    models of the subspace (one point per layer, the same for every example).
    """
    kind, number = check_eval_mode(mode)
    points = mode_points(model, kind, number, granularity)
    scored = [*points, *extra_points]
    queries = [Query(exs, p, r) for r, exs in enumerate(examples) for p in scored]
    outputs = model_outputs(model, engine, queries, collator, batch_size, desc)
    results = []
    for r, exs in enumerate(examples):
        labels = torch.tensor([e["label"] for e in exs])
        mine = outputs[r * len(scored) : (r + 1) * len(scored)]
        result = {**_score(task, kind, mine[: len(points)], labels), "mode": mode, "n": len(exs)}
        results.append((result, mine[: len(points)], mine[len(points) :]))
    return results


def evaluate_replicas(
    model: PrefixSubspaceModel,
    engine,
    examples: Sequence[Sequence[Example]],
    collator: Collator,
    task: TaskSpec,
    mode: str,
    batch_size: int = 32,
    granularity: str = "example_layer",
    desc: str | None = None,
) -> list[dict]:
    """Each replica's result of :func:`score_replicas` (the metrics, ``mode``, ``n``)."""
    scored = score_replicas(model, engine, examples, collator, task, mode, batch_size, granularity, desc)
    return [result for result, _, _ in scored]


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
    """Score ``examples`` under ``mode`` with a one-replica model (see :func:`score_replicas`)."""
    return evaluate_replicas(model, engine, [examples], collator, task, mode, batch_size, granularity)[0]


def evaluate_with_outputs(
    model: PrefixSubspaceModel,
    engine,
    examples: Sequence[Example],
    collator: Collator,
    task: TaskSpec,
    mode: str,
    batch_size: int = 32,
    granularity: str = "example_layer",
    extra_points: Sequence[Point] = (),
) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    """:func:`evaluate`'s result with the logits of the mode's points and of ``extra_points`` (one replica of
    :func:`score_replicas`)."""
    args = (model, engine, [examples], collator, task, mode, batch_size, granularity)
    return score_replicas(*args, extra_points=extra_points)[0]


def from_offset(point: Point, offset: int) -> Point:
    """``point`` for a slice of a longer example list that starts at ``offset``: a per-example point (a function
    of example indices) sees the indices of the whole list, so scoring the list in chunks draws the points that
    scoring it whole would."""
    if not callable(point) or offset == 0:
        return point
    return lambda index: point(index + offset)


def landscape_points(num_vertices: int, resolution: int) -> torch.Tensor:
    """The points of the landscape: a grid on the triangle (K = 3) ``[G, 3]``, else ``[K * (n + 1), K]`` along
    each vertex-to-centroid segment. Each is the same point in every layer: a 2-D slice of the product of
    per-layer simplices that ``example_layer`` training samples."""
    from dist_subspace.evaluation import landscape

    if num_vertices == 3:
        return landscape.triangle_grid(resolution)
    return landscape.segment_points(num_vertices, resolution + 1).reshape(-1, num_vertices)


def write_landscapes(
    model: PrefixSubspaceModel,
    engine,
    examples: Sequence[Sequence[Example]],
    collator: Collator,
    task: TaskSpec,
    out_dirs: Sequence[Path],
    resolution: int = 8,
    batch_size: int = 32,
) -> list[Path] | None:
    """``landscape.png`` + ``landscape.json`` in ``out_dirs[r]`` for each replica r, scored on ``examples[r]``:
    the metric over a grid on the triangle (K = 3) or along each vertex-to-centroid segment (K = 2 or K > 3).
    Returns the PNG paths on rank 0 (None elsewhere, or when K < 2)."""
    from dist_subspace.evaluation import landscape

    k = model.num_vertices
    if k < 2 or not all(examples):
        return None
    points = landscape_points(k, resolution)
    start = time.perf_counter()
    queries = [Query(exs, p, r) for r, exs in enumerate(examples) for p in points]
    outputs = model_outputs(model, engine, queries, collator, batch_size)
    if not engine.is_main:
        return None
    paths = []
    for r, (exs, out_dir) in enumerate(zip(examples, out_dirs, strict=True)):
        labels = torch.tensor([e["label"] for e in exs])
        mine = outputs[r * len(points) : (r + 1) * len(points)]
        values = torch.tensor([compute_metrics(task, predict(task, o), labels)[task.metric] for o in mine])
        path = out_dir / "landscape.png"
        title = f"{task.name}: {task.metric} over the simplex (same point in every layer), n={len(exs)}"
        if k == 3:
            landscape.plot_triangle(points, values, path, title, task.metric)
        else:
            ts = torch.linspace(0, 1, resolution + 1)
            landscape.plot_segments(ts, values.view(k, -1), path, title, task.metric)
        record = {
            "points": points.tolist(),
            "values": values.tolist(),
            "metric": task.metric,
            "n": len(exs),
            "seconds": time.perf_counter() - start,
        }
        write_json(out_dir / "landscape.json", record)
        paths.append(path)
    return paths


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
    """One replica's landscape (see :func:`write_landscapes`); returns the PNG path on rank 0."""
    paths = write_landscapes(model, engine, [examples], collator, task, [out_dir], resolution, batch_size)
    return paths[0] if paths else None
