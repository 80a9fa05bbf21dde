"""Evaluation modes agree where they must (one process, the small real decoder)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_subspace.core import simplex
from dist_subspace.core.config import load_config
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.data.batching import Collator, label_token_ids
from dist_subspace.data.sources import load_splits
from dist_subspace.evaluation.points import EVAL_SEED, Query
from dist_subspace.evaluation.scoring import evaluate, evaluate_replicas, model_outputs
from dist_subspace.training.engine import Engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(small_assets):
    model_dir, data = small_assets
    splits = load_splits(str(data), shots_per_class=4, test_size=23)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    backbone = AutoModelForCausalLM.from_pretrained(model_dir)
    words = label_token_ids(tokenizer, splits.task.label_words)

    def make(k: int, seed: int = 0) -> PrefixSubspaceModel:
        model = PrefixSubspaceModel(backbone, k, 4, label_token_ids=words)
        model.simplex.vertices.data.copy_(initial_vertices(model, seed=seed))
        return model

    engine = Engine(load_config(None, []))
    return splits, Collator(tokenizer, splits.task, decoder=True), make, engine


def _score(model, engine, splits, collator, mode):
    return evaluate(model, engine, splits.test, collator, splits.task, mode, batch_size=8)


def test_vertex_i_equals_a_k1_model_holding_vertex_i(setup):
    splits, collator, make, engine = setup
    triple, single = make(3), make(1)
    single.simplex.vertices.data.copy_(triple.simplex.vertices.data[1:2])
    (a,) = model_outputs(triple, engine, [Query(splits.test, simplex.vertex_alpha(3, 1))], collator, 8)
    (b,) = model_outputs(single, engine, [Query(splits.test, simplex.centroid_alpha(1))], collator, 8)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert _score(triple, engine, splits, collator, "vertex:1") == {
        **_score(single, engine, splits, collator, "centroid"),
        "mode": "vertex:1",
    }


def _one_by_one(model, splits, collator, alpha_of) -> torch.Tensor:
    """Logits ``[N, C]`` computed one example at a time, with ``alpha_of(index [1])`` as its point."""
    rows = []
    for i, example in enumerate(splits.test):
        batch = collator([(i, example)])
        rows.append(model(batch["input_ids"], batch["attention_mask"], alpha_of(batch["index"]))[0])
    return torch.stack(rows).detach()


def test_ensemble_averages_probabilities_of_s_points_per_example(setup):
    from dist_subspace.evaluation.metrics import compute_metrics

    splits, collator, make, engine = setup
    model = make(3)
    s = 3
    probs = []
    for draw in range(s):
        step = torch.tensor(draw)
        logits = _one_by_one(
            model, splits, collator, lambda idx, step=step: model.sample_alpha(step, idx, seed=EVAL_SEED)
        )
        probs.append(logits.softmax(-1))
    assert not torch.allclose(probs[0], probs[1])  # the points differ
    labels = torch.tensor([e["label"] for e in splits.test])
    want = compute_metrics(splits.task, torch.stack(probs).mean(0).argmax(-1), labels)
    got = _score(model, engine, splits, collator, f"ensemble:{s}")
    assert got == {**want, "mode": f"ensemble:{s}", "n": 23}


def test_models_scores_s_whole_models_drawn_per_layer_like_training(setup):
    from dist_subspace.evaluation.metrics import compute_metrics

    splits, collator, make, engine = setup
    model = make(3)
    result = _score(model, engine, splits, collator, "models:4")
    assert len(result["samples"]) == 4 and result["n"] == 23
    values = torch.tensor(result["samples"], dtype=torch.float64)
    assert result["accuracy"] == pytest.approx(values.mean().item())
    assert result["accuracy_std"] == pytest.approx(values.std().item())  # sample SD
    # Model s: one alpha per layer ([L, K], layers differ), the same for every example.
    points = simplex.sample_alpha(EVAL_SEED, torch.tensor(0), torch.arange(4), 3, model.alpha_rows, "example_layer")
    assert points.shape == (4, model.alpha_rows, 3) and not torch.allclose(points[0, 0], points[0, 1])
    labels = torch.tensor([e["label"] for e in splits.test])
    for draw in (0, 3):
        logits = _one_by_one(model, splits, collator, lambda idx, p=points[draw]: p.expand(len(idx), -1, -1))
        want = compute_metrics(splits.task, logits.argmax(-1), labels)["accuracy"]
        assert result["samples"][draw] == pytest.approx(want)


def test_sampled_draws_a_point_per_example_and_layer_and_averages_the_metric(setup):
    """The paper's non-deterministic validation metric: in draw s every example gets its own point per layer, as
    training draws it (the ensemble's points); the metric of each draw, then their mean and sample SD."""
    from dist_subspace.evaluation.metrics import compute_metrics

    splits, collator, make, engine = setup
    model = make(3)
    result = _score(model, engine, splits, collator, "sampled:3")
    labels = torch.tensor([e["label"] for e in splits.test])
    want = []
    for draw in range(3):
        step = torch.tensor(draw)
        logits = _one_by_one(
            model, splits, collator, lambda idx, step=step: model.sample_alpha(step, idx, seed=EVAL_SEED)
        )
        want.append(compute_metrics(splits.task, logits.argmax(-1), labels)["accuracy"])
    assert result["samples"] == pytest.approx(want)
    values = torch.tensor(want, dtype=torch.float64)
    assert result["accuracy"] == pytest.approx(values.mean().item())
    assert result["accuracy_std"] == pytest.approx(values.std().item())


def test_stacked_points_equal_one_pass_per_point(setup):
    """S points stacked into the batch (one backbone pass serves them all) give each point's own logits."""
    splits, collator, make, engine = setup
    model = make(3)
    points = [simplex.vertex_alpha(3, i) for i in range(3)] + [simplex.centroid_alpha(3)]
    stacked = model_outputs(model, engine, [Query(splits.test, p) for p in points], collator, 7)
    for point, logits in zip(points, stacked, strict=True):
        (alone,) = model_outputs(model, engine, [Query(splits.test, point)], collator, 5)
        torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-4)


def test_replicas_are_scored_with_their_own_vertices(setup):
    from dist_subspace.core.initialise import initial_vertices
    from dist_subspace.core.model import PrefixSubspaceModel

    splits, collator, make, engine = setup
    a, b = make(2, seed=0), make(2, seed=1)
    pair = PrefixSubspaceModel(a.backbone, 2, 4, label_token_ids=a.label_token_ids.tolist(), replicas=2)
    pair.simplex.vertices.data.copy_(torch.cat([a.simplex.vertices.data, b.simplex.vertices.data]))
    assert not torch.equal(initial_vertices(a, seed=0), initial_vertices(a, seed=1))
    for mode in ("centroid", "ensemble:2", "sampled:2", "models:2"):
        both = evaluate_replicas(pair, engine, [splits.test, splits.dev], collator, splits.task, mode, batch_size=6)
        assert both[0] == _score(a, engine, splits, collator, mode)
        assert both[1] == evaluate(b, engine, splits.dev, collator, splits.task, mode, batch_size=8)


def test_outputs_come_back_in_example_order(setup):
    splits, collator, make, engine = setup
    model = make(2)
    (batched,) = model_outputs(model, engine, [Query(splits.test, simplex.centroid_alpha(2))], collator, 5)
    one = collator([(0, splits.test[7])])
    single = model(one["input_ids"], one["attention_mask"], simplex.centroid_alpha(2))
    torch.testing.assert_close(batched[7], single[0], atol=1e-5, rtol=1e-4)


class _Rank:
    """Rank ``rank`` of 2, run one after the other in this process: rank 1 posts its results to ``board`` and
    stops at the gather; rank 0's gather returns both ranks' results, as all_gather_object does between processes."""

    world_size = 2

    class Posted(Exception):
        pass

    def __init__(self, rank: int, board: list) -> None:
        self.rank, self.board, self.is_main = rank, board, rank == 0

    def gather_objects(self, obj) -> list:
        self.board[self.rank] = obj
        if self.rank == 1:
            raise self.Posted
        return list(self.board)


def test_two_ranks_score_every_replica_row_once_whatever_their_memory_layout(setup):
    """R = 3 replicas of the same examples (every example's rows tie in length) on 2 ranks whose example lists
    lie in memory in different orders: the ranks still shard one order, so every (query, example) is scored,
    with the logits one process gives. (Sorting rows by the lists' addresses lost rows here.)"""
    import copy

    splits, collator, make, engine = setup
    a, b, c = make(2, seed=0), make(2, seed=1), make(2, seed=2)
    trio = PrefixSubspaceModel(a.backbone, 2, 4, label_token_ids=a.label_token_ids.tolist(), replicas=3)
    trio.simplex.vertices.data.copy_(torch.cat([m.simplex.vertices.data for m in (a, b, c)]))
    examples = splits.test[:13]  # 13 x 3 replicas x 3 points = 117 rows: 59 and 58 (+ 1 repeated) a rank
    points = [simplex.centroid_alpha(2), simplex.vertex_alpha(2, 0), simplex.vertex_alpha(2, 1)]
    one = model_outputs(trio, engine, [Query(examples, p, r) for r in range(3) for p in points], collator, 8)

    ascending = sorted((copy.deepcopy(examples) for _ in range(3)), key=id)
    layouts = {0: ascending, 1: [ascending[1], ascending[0], ascending[2]]}  # replicas 0 and 1 swap places
    board: list = [None, None]
    with pytest.raises(_Rank.Posted):
        model_outputs(
            trio, _Rank(1, board), [Query(layouts[1][r], p, r) for r in range(3) for p in points], collator, 8
        )
    scored = [(q, i) for q, i, _ in board[1]]
    both = model_outputs(
        trio, _Rank(0, board), [Query(layouts[0][r], p, r) for r in range(3) for p in points], collator, 8
    )
    scored += [(q, i) for q, i, _ in board[0]]
    assert len(scored) == 118 and set(scored) == {(q, i) for q in range(9) for i in range(13)}  # 117 + 1 pad
    for got, want in zip(both, one, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_evaluate_with_outputs_adds_the_centroid_to_the_same_pass(setup):
    """The result is evaluate's own; the mode's S points and the extra centroid come back as their own logits."""
    from dist_subspace.evaluation.scoring import evaluate_with_outputs

    splits, collator, make, engine = setup
    model = make(3)
    result, outputs, (centroid,) = evaluate_with_outputs(
        model, engine, splits.test, collator, splits.task, "ensemble:3", 8, "example_layer", [simplex.centroid_alpha(3)]
    )
    assert result == _score(model, engine, splits, collator, "ensemble:3")
    assert len(outputs) == 3 and all(o.shape == (23, 2) for o in outputs)
    (alone,) = model_outputs(model, engine, [Query(splits.test, simplex.centroid_alpha(3))], collator, 5)
    torch.testing.assert_close(centroid, alone, atol=1e-5, rtol=1e-4)


def test_chunks_from_their_offset_draw_the_points_of_the_whole_list(setup):
    """Scoring a list in two chunks, each point shifted by its chunk's start, gives the whole list's logits."""
    from dist_subspace.evaluation.points import from_offset, sampled_points

    splits, collator, make, engine = setup
    model = make(3)
    point = sampled_points(model, "example_layer", 1)
    (whole,) = model_outputs(model, engine, [Query(splits.test, point)], collator, 8)
    parts = [
        model_outputs(model, engine, [Query(splits.test[start:stop], from_offset(point, start))], collator, 8)[0]
        for start, stop in ((0, 10), (10, 23))
    ]
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=1e-4)
    (unshifted,) = model_outputs(model, engine, [Query(splits.test[10:], point)], collator, 8)
    assert not torch.allclose(unshifted, whole[10:], atol=1e-4)  # without the offset the points differ
    fixed = simplex.centroid_alpha(3)
    assert from_offset(fixed, 10) is fixed  # a fixed point is the same at every offset
