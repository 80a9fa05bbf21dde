"""Evaluation modes agree where they must (one process, the small real decoder)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_subspace import simplex
from dist_subspace.config import load_config
from dist_subspace.data import Collator, label_token_ids, load_splits
from dist_subspace.engine import Engine
from dist_subspace.evaluation import evaluate, model_outputs
from dist_subspace.model import PrefixSubspaceModel, initial_vertices

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
    points = [simplex.vertex_alpha(3, 1)]
    (a,) = model_outputs(triple, engine, splits.test, collator, 8, points)
    (b,) = model_outputs(single, engine, splits.test, collator, 8, [simplex.centroid_alpha(1)])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert _score(triple, engine, splits, collator, "vertex:1") == {
        **_score(single, engine, splits, collator, "centroid"),
        "mode": "vertex:1",
    }


def test_ensemble_of_one_point_at_the_centroid_equals_centroid(setup):
    splits, collator, make, engine = setup
    single = make(1)  # K = 1: every sampled alpha is the centroid
    ensemble = _score(single, engine, splits, collator, "ensemble:1")
    assert ensemble == {**_score(single, engine, splits, collator, "centroid"), "mode": "ensemble:1"}


def test_sampled_gives_s_metrics_with_mean_and_std(setup):
    splits, collator, make, engine = setup
    result = _score(make(3), engine, splits, collator, "sampled:4")
    assert len(result["samples"]) == 4 and result["n"] == 23
    values = torch.tensor(result["samples"], dtype=torch.float64)
    assert result["accuracy"] == pytest.approx(values.mean().item())
    assert result["accuracy_std"] == pytest.approx(values.std(unbiased=False).item())


def test_outputs_come_back_in_example_order(setup):
    splits, collator, make, engine = setup
    model = make(2)
    (batched,) = model_outputs(model, engine, splits.test, collator, 5, [simplex.centroid_alpha(2)])
    one = collator([(0, splits.test[7])])
    single = model(one["input_ids"], one["attention_mask"], simplex.centroid_alpha(2))
    torch.testing.assert_close(batched[7], single[0], atol=1e-5, rtol=1e-4)
