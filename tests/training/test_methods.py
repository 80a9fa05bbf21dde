"""The study's methods and controls: LoRA, noise injection, the averaged start, the centred regulariser,
head-only training, and what each changes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dist_subspace.core import simplex
from dist_subspace.core.initialise import initial_head, initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.evaluate import main as evaluate_main
from dist_subspace.train import main
from dist_subspace.training.schedule import sampling_coordinates
from tests.conftest import run_args, tiny_backbone

SHORT = ("train.max_steps=4", "train.eval_every=2", "train.save_every=4", "eval.landscape=false")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dirichlet_spread_matches_the_sampled_prefixes():
    torch.manual_seed(0)
    v = torch.randn(3, 4, 2, 2, 5, 3) * torch.tensor([1.0, 2.0, 0.5, 3.0])[None, :, None, None, None, None]
    alpha = simplex.sample_alpha(0, torch.tensor(0), torch.arange(20_000), 3, 4)
    deviation = simplex.mix_prefix(v, alpha) - v.mean(0)
    empirical = deviation.flatten(2).square().mean((0, 2)).sqrt()  # [L]
    torch.testing.assert_close(simplex.dirichlet_spread(v), empirical, rtol=0.02, atol=0)


def test_hashed_normal_is_standard_and_stateless():
    z = simplex.hashed_normal(1, torch.tensor(3), torch.arange(200), 1000)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    torch.testing.assert_close(z[7:9], simplex.hashed_normal(1, torch.tensor(3), torch.tensor([7, 8]), 1000))


def test_centred_regulariser_ignores_what_all_positions_share():
    torch.manual_seed(0)
    v = torch.randn(3, 2, 2, 1, 4, 5)  # [K, L, 2, H, P, D]
    common = torch.randn(1, 2, 2, 1, 1, 5) * 10  # the same vector at every position, in every vertex
    raw = simplex.cosine_regulariser(v + common)
    centred = simplex.cosine_regulariser(v + common, centre_dim=-2)
    assert raw > 0.9  # the shared component dominates the raw cosine
    torch.testing.assert_close(centred, simplex.cosine_regulariser(v, centre_dim=-2))


def test_regulariser_of_replicas_is_the_sum_over_replicas():
    v = torch.randn(6, 10)
    want = simplex.cosine_regulariser(v[:3]) + simplex.cosine_regulariser(v[3:])
    torch.testing.assert_close(simplex.cosine_regulariser(v, num_replicas=2), want)


def test_seed_per_example_equals_the_int_seed():
    index = torch.arange(5)
    for granularity in ("example", "example_layer"):
        a = simplex.sample_alpha(torch.full((5,), 9), torch.tensor(4), index, 3, 2, granularity)
        torch.testing.assert_close(
            a, simplex.sample_alpha(9, torch.tensor(4), index, 3, 2, granularity), rtol=0, atol=0
        )


def test_averaged_start_is_the_centroid_of_the_k3_start():
    model1 = PrefixSubspaceModel(tiny_backbone("llama"), 1, 4, label_token_ids=[5, 6])
    model3 = PrefixSubspaceModel(tiny_backbone("llama"), 3, 4, label_token_ids=[5, 6])
    averaged = initial_vertices(model1, seed=7, average=3)
    torch.testing.assert_close(averaged[0], initial_vertices(model3, seed=7).mean(0))


def test_each_occurrence_of_an_example_in_a_step_gets_its_own_alpha():
    order = [3, 1, 3, 0, 3]
    coords = sampling_coordinates(order, 4)
    assert coords == [3, 1, 7, 0, 11]
    alpha = simplex.sample_alpha(0, torch.tensor(0), torch.tensor(coords), 3, 2)
    assert not torch.allclose(alpha[0], alpha[2]) and not torch.allclose(alpha[2], alpha[4])


def test_encoder_head_vertices_start_apart():
    head = initial_head(3, 16, 2, seed=0)
    assert head["bias"].abs().min() > 0 and not torch.allclose(head["bias"][0], head["bias"][1])
    cos = simplex.pairwise_cos(head["weight"][None])
    assert cos.abs().max() < 0.5  # independent draws in 32 dimensions: far from parallel
    torch.testing.assert_close(initial_head(3, 16, 2, seed=0)["bias"], head["bias"])


def test_head_regulariser_adds_the_heads_cos2_and_reaches_their_weights():
    model = PrefixSubspaceModel(tiny_backbone("bert"), 3, 4, num_outputs=2, replicas=2)
    prefix_only = model.regulariser("cos2")
    both = model.regulariser("cos2", head=True)
    heads = simplex.cosine_regulariser(model.simplex.head.weight, num_replicas=2)
    torch.testing.assert_close(both, prefix_only + heads)
    both.backward()
    assert model.simplex.head.weight.grad.abs().sum() > 0 and model.simplex.head.bias.grad is None


@pytest.mark.slow
def test_lora_baseline_trains_saves_and_evaluates(small_assets, tmp_path, capsys):
    model_dir, data = small_assets
    out = tmp_path / "lora"
    extra = ("model.adapter=lora", "simplex.vertices=1", "train.lr=1e-2", "train.eval_every=4")
    assert main(run_args(model_dir, data, out, *extra, "eval.landscape=false")) == 0
    tensors = load_file(str(out / "final" / "simplex.safetensors"))
    lora = [n for n in tensors if n.startswith("adapter.")]
    assert lora and any("lora_B" in n for n in lora)
    assert any(tensors[n].abs().sum() > 0 for n in lora if "lora_B" in n)  # B started at zero and moved
    assert not (out / "final" / "peft_centroid").exists()
    assert "trainable 61,440 " in capsys.readouterr().out  # 4 layers x (q: 576x8 + 8x576, v: 576x8 + 8x192)
    losses = [r["loss"] for r in _rows(out) if r["split"] == "train"]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert evaluate_main([str(out), "--split", "dev"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    selected = json.loads((out / "summary.json").read_text())["selected_step"]
    dev = next(r for r in _rows(out) if r["split"] == "dev" and r["step"] == selected)
    assert scored["value"] == pytest.approx(dev["accuracy"], abs=1e-9)  # the adapter reloads exactly


@pytest.mark.slow
def test_noise_control_and_averaged_start_run(small_assets, tmp_path, capsys):
    model_dir, data = small_assets
    plain, noisy = tmp_path / "plain", tmp_path / "noisy"
    base = ("simplex.vertices=1", "prefix.init_average=3", *SHORT)
    assert main(run_args(model_dir, data, plain, *base)) == 0
    assert main(run_args(model_dir, data, noisy, *base, "simplex.noise=match")) == 0
    assert "noise=match" in capsys.readouterr().out
    a = load_file(str(plain / "checkpoints" / "step-4" / "simplex.safetensors"))["prefix.vertices"]
    b = load_file(str(noisy / "checkpoints" / "step-4" / "simplex.safetensors"))["prefix.vertices"]
    assert not torch.allclose(a, b)  # the noise changed the gradients
    first, again = (next(r for r in _rows(run) if r["split"] == "test") for run in (plain, noisy))
    first.pop("seconds"), again.pop("seconds")  # wall time
    assert first == again  # same start: noise only in training


@pytest.mark.slow
def test_head_only_keeps_the_prefix_and_centred_regulariser_logs_diversity(small_assets, tmp_path, capsys):
    model_dir, data = small_assets
    out = tmp_path / "head"
    extra = ("model.name_or_path=minilm-l6", "simplex.train_prefix=false", "simplex.regulariser=cos2_centred")
    assert main(run_args(model_dir, data, out, *extra, *SHORT)) == 0
    start = json.loads((out / "summary.json").read_text())
    assert start["test_final"] != start["test_initial"]
    rows = [r for r in _rows(out) if r["split"] == "train"]
    assert {"cos2", "cos2_centred", "distance", "norm"} <= set(rows[0])
    assert rows[0]["cos2"] == pytest.approx(rows[-1]["cos2"])  # the prefix did not move
    assert main(run_args(model_dir, data, tmp_path / "dec", "simplex.train_prefix=false", *SHORT)) == 2
    assert "nothing to train" in capsys.readouterr().err
