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
from collections.abc import Sequence
from pathlib import Path

import torch

from dist_subspace.core.config import check_eval_mode
from dist_subspace.core.files import write_json
from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.data.batching import Collator
from dist_subspace.data.tasks import Example, TaskSpec
from dist_subspace.evaluation.decoding import DecodeQuery, Decoding, decode_texts, mean_token_entropy
from dist_subspace.evaluation.metrics import compute_metrics, predict
from dist_subspace.evaluation.points import Point, Query, mode_points, rows_alpha, shard


def _length(example: Example) -> int:
    return len(example["text"]) + len(example.get("text_pair") or "")


@torch.no_grad()
def model_outputs(
    model: PrefixSubspaceModel,
    engine,
    queries: Sequence[Query],
    collator: Collator,
    batch_size: int,
    desc: str | None = None,
) -> list[torch.Tensor]:
    """Class logits ``[N_q, C]`` (float32, on the CPU, in example order) for each query; for a generation task each
    example's teacher-forced response ``[N_q, 2]``: its summed negative log-likelihood and its token count.

    ``batch_size`` counts rows (example x query) per forward: the memory budget. ``engine`` gives ``rank``,
    ``world_size``, ``is_main`` and ``gather_objects`` (:class:`dist_subspace.training.engine.Engine`). ``desc``: show a
    progress bar (main process) under that name.
    """
    model.eval()
    rows = [(q, i) for q, query in enumerate(queries) for i in range(len(query.examples))]
    # Similar lengths batch together; the rows of one example (its S points) stay side by side. The key holds only
    # values every rank agrees on (never an object's address): each rank takes its share of the same order.
    rows.sort(key=lambda r: (_length(queries[r[0]].examples[r[1]]), queries[r[0]].replica, r[1], r[0]))
    mine = [rows[j] for j in shard(len(rows), engine.rank, engine.world_size)]
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
            alpha[at] = rows_alpha(queries[q].point, index[at], model.alpha_rows).to(alpha.dtype)
        replica = torch.tensor([queries[q].replica for q, _ in chunk], device=device)
        if collator.task.generation:
            labels = batch["labels"].to(device)
            logits = torch.stack(model.response_nll(input_ids, mask, labels, alpha, replica), dim=1).cpu()  # [B, 2]
        else:
            logits = model(input_ids, mask, alpha, segments, replica=replica).float().cpu()  # one copy per batch
        results.extend((q, i, row) for (q, i), row in zip(chunk, logits, strict=True))
    gathered = {(q, i): t for shard in engine.gather_objects(results) for q, i, t in shard}
    return [
        torch.stack([gathered[(q, i)] for i in range(len(query.examples))]) if query.examples else torch.empty(0)
        for q, query in enumerate(queries)
    ]


def _probabilities(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    return logits if task.regression and logits.shape[-1] == 1 else logits.softmax(-1)


def response_scores(outputs: torch.Tensor) -> dict[str, float]:
    """A generation task's teacher-forced scores from each example's (summed NLL, tokens) ``[N, 2]``: the loss per
    response token over the whole split (token-weighted, as training's loss) and its perplexity."""
    loss = (outputs[:, 0].sum() / outputs[:, 1].sum().clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def _score(task: TaskSpec, kind: str, outputs: list[torch.Tensor], labels: torch.Tensor | None) -> dict:
    if task.generation:
        if kind == "ensemble":
            raise ValueError(
                "ensemble:S of a generation task decodes from the mixture of its points (decoding.decode_texts); "
                "its teacher-forced loss is not scored: use centroid, sampled:S or models:S"
            )
        runs = [response_scores(o) for o in outputs]
        return runs[0] if kind not in ("sampled", "models") else _over_draws(runs, task.select_metric)
    if kind == "ensemble":
        mean = torch.stack([_probabilities(task, o) for o in outputs]).mean(0)
        logits = mean if task.regression and mean.shape[-1] == 1 else mean.log()
        return compute_metrics(task, predict(task, logits), labels)
    if kind not in ("sampled", "models"):
        return compute_metrics(task, predict(task, outputs[0]), labels)
    return _over_draws([compute_metrics(task, predict(task, o), labels) for o in outputs], task.metric)


def _over_draws(runs: list[dict[str, float]], metric: str) -> dict:
    """S draws' scores -> each score's mean and sample SD (``*_std``) over the draws, and ``samples``: ``metric``'s
    value in each draw."""
    result = {}
    for key in runs[0]:
        values = torch.tensor([r[key] for r in runs], dtype=torch.float64)
        result[key] = values.mean().item()
        result[f"{key}_std"] = values.std().item() if len(runs) > 1 else 0.0  # sample SD over the S draws
    result["samples"] = [r[metric] for r in runs]
    return result


def _labels(task: TaskSpec, examples: Sequence[Example]) -> torch.Tensor | None:
    """The examples' labels ``[N]`` (None for generation: the reference texts are scored by decoding)."""
    return None if task.generation else torch.tensor([e["label"] for e in examples])


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
    decoding: Decoding | None = None,
) -> list[tuple[dict, list[torch.Tensor], list[torch.Tensor]]]:
    """Score each replica r on ``examples[r]`` under ``mode``, all in one stacked pass; per replica: the result
    (the metrics, ``mode`` and ``n``, plus ``*_std`` and ``samples`` for ``sampled:S``/``models:S``), the class
    logits ``[N, C]`` of each of the mode's points, and those of each of ``extra_points`` (scored in the same pass,
    e.g. the centroid beside an ensemble's S points, for calibration, at the cost of one more point).

    ``sampled:S`` is the paper's non-deterministic validation metric: S draws, in each a point per example (and
    per layer for ``example_layer``) drawn as training draws it; the metric of each draw, then their mean and
    sample SD. ``ensemble:S`` averages class probabilities over the same S points; ``models:S`` scores S whole
    models of the subspace (one point per layer, the same for every example).

    A generation task scores its teacher-forced loss per response token (and perplexity) in every mode but
    ``ensemble:S``; with ``decoding``, it also decodes each example's response at each of the mode's points (an
    ensemble: from the mixture of its S points) and scores the texts against the references (bleu, chrf, rougeL,
    exact_match; over the S draws of ``sampled:S``, their mean and SD, as for the loss).
    """
    kind, number = check_eval_mode(mode)
    points = mode_points(model, kind, number, granularity)
    scored = [*points, *extra_points]
    teacher_forced = not (task.generation and kind == "ensemble")  # a mixture's text is decoded, not scored
    queries = [Query(exs, p, r) for r, exs in enumerate(examples) for p in scored] if teacher_forced else []
    outputs = model_outputs(model, engine, queries, collator, batch_size, desc)
    texts = decoded_scores(model, engine, examples, collator, kind, points, decoding, batch_size) if decoding else None
    results = []
    for r, exs in enumerate(examples):
        mine = outputs[r * len(scored) : (r + 1) * len(scored)]
        result = _score(task, kind, mine[: len(points)], _labels(task, exs)) if teacher_forced else {}
        if texts is not None:
            result.update(texts[r])
        results.append(({**result, "mode": mode, "n": len(exs)}, mine[: len(points)], mine[len(points) :]))
    return results


def decoded_scores(
    model: PrefixSubspaceModel,
    engine,
    examples: Sequence[Sequence[Example]],
    collator: Collator,
    kind: str,
    points: Sequence[Point],
    decoding: Decoding,
    batch_size: int,
) -> list[dict[str, float]]:
    """Per replica, the generation metrics of the responses decoded at ``points`` (their mixture for an ensemble;
    over S draws their mean and SD), with the mixture's mean entropy per token for an ensemble."""
    from dist_subspace.evaluation.textmetrics import text_metrics

    if kind == "ensemble":
        queries = [DecodeQuery(exs, points, r) for r, exs in enumerate(examples)]
    else:
        queries = [DecodeQuery(exs, [p], r) for r, exs in enumerate(examples) for p in points]
    decoded = decode_texts(model, engine, queries, collator, decoding, batch_size)
    per_replica = len(queries) // len(examples)
    out = []
    for r, exs in enumerate(examples):
        references = [e["label"].strip() for e in exs]
        mine = decoded[r * per_replica : (r + 1) * per_replica]
        runs = [text_metrics(d.texts, references) for d in mine]
        scores = runs[0] if kind not in ("sampled", "models") else _over_draws(runs, "bleu")
        scores.pop("samples", None)  # a sampled generation task's samples are its loss's (the selection metric)
        if kind == "ensemble":
            scores["entropy"] = mean_token_entropy(mine[0])
        out.append(scores)
    return out


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
    decoding: Decoding | None = None,
) -> list[dict]:
    """Each replica's result of :func:`score_replicas` (the metrics, ``mode``, ``n``)."""
    args = (model, engine, examples, collator, task, mode, batch_size, granularity, desc)
    scored = score_replicas(*args, decoding=decoding)
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
        mine = outputs[r * len(points) : (r + 1) * len(points)]
        metric = task.select_metric  # a generation task's landscape: its teacher-forced loss
        values = torch.tensor([_score(task, "centroid", [o], _labels(task, exs))[metric] for o in mine])
        path = out_dir / "landscape.png"
        title = f"{task.name}: {metric} over the simplex (same point in every layer), n={len(exs)}"
        if k == 3:
            landscape.plot_triangle(points, values, path, title, metric)
        else:
            ts = torch.linspace(0, 1, resolution + 1)
            landscape.plot_segments(ts, values.view(k, -1), path, title, metric)
        record = {
            "points": points.tolist(),
            "values": values.tolist(),
            "metric": metric,
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
