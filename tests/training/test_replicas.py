"""Seed replicas: R simplices over one backbone end where R separate runs end; each replica folder is a run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dist_subspace.core import simplex
from dist_subspace.core.config import load_config
from dist_subspace.core.simplex import clip_grad_norm_per_replica
from dist_subspace.evaluate import main as evaluate_main
from dist_subspace.train import main
from tests.conftest import run_args

pytestmark = pytest.mark.slow
COMMON = ("train.max_steps=6", "train.eval_every=3", "train.save_every=6", "eval.landscape_resolution=2")


def test_clip_per_replica_is_clip_grad_norm_of_each_replica():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 5))  # 2 replicas x 2 rows
    a.grad, b.grad = torch.randn(4, 3) * 3, torch.randn(4, 5) * 3
    want = []
    for r in range(2):
        x, y = torch.nn.Parameter(a[2 * r : 2 * r + 2].detach()), torch.nn.Parameter(b[2 * r : 2 * r + 2].detach())
        x.grad, y.grad = a.grad[2 * r : 2 * r + 2].clone(), b.grad[2 * r : 2 * r + 2].clone()
        norm = torch.nn.utils.clip_grad_norm_([x, y], 1.0)
        want.append((norm, x.grad, y.grad))
    norms = clip_grad_norm_per_replica([a, b], 2, 1.0)
    for r, (norm, gx, gy) in enumerate(want):
        torch.testing.assert_close(norms[r], norm)
        torch.testing.assert_close(a.grad[2 * r : 2 * r + 2], gx)
        torch.testing.assert_close(b.grad[2 * r : 2 * r + 2], gy)


@pytest.fixture(scope="module")
def replicated_and_separate(small_assets, tmp_path_factory):
    """One run with 2 replicas (seeds 5, 6) and the two one-replica runs of those seeds."""
    model_dir, data = small_assets
    root = tmp_path_factory.mktemp("replicas")
    seeds = ("train.seed=5", "data.seed=5")
    assert main(run_args(model_dir, data, root / "pair", "simplex.replicas=2", *seeds, *COMMON)) == 0
    for r in (0, 1):
        one = (f"train.seed={5 + r}", f"data.seed={5 + r}")
        assert main(run_args(model_dir, data, root / f"alone-{r}", *one, *COMMON)) == 0
    return root


@pytest.mark.parametrize("replica", [0, 1])
def test_a_replica_ends_where_its_separate_run_ends(replicated_and_separate, replica):
    root = replicated_and_separate
    mine, alone = root / "pair" / f"replica-{replica}", root / f"alone-{replica}"
    a = load_file(str(mine / "final" / "simplex.safetensors"))
    b = load_file(str(alone / "final" / "simplex.safetensors"))
    assert a["prefix.vertices"].shape == b["prefix.vertices"].shape == (3, 4, 2, 3, 8, 64)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    rows = [[json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()] for f in (mine, alone)]
    assert [(r["step"], r["split"]) for r in rows[0]] == [(r["step"], r["split"]) for r in rows[1]]
    for x, y in zip(*rows, strict=True):
        if x["split"] == "train":
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
            assert x["cos2"] == pytest.approx(y["cos2"], rel=1e-4)
        else:
            assert x["accuracy"] == pytest.approx(y["accuracy"], abs=1e-9)
    summaries = [json.loads((f / "summary.json").read_text()) for f in (mine, alone)]
    assert summaries[0]["selected_step"] == summaries[1]["selected_step"]
    assert summaries[0]["test_final"] == pytest.approx(summaries[1]["test_final"], abs=1e-9)
    assert json.loads((mine / "examples.json").read_text()) == json.loads((alone / "examples.json").read_text())


def test_replicas_differ_and_each_folder_is_a_run(replicated_and_separate, capsys):
    pair = replicated_and_separate / "pair"
    v0 = load_file(str(pair / "replica-0" / "final" / "simplex.safetensors"))["prefix.vertices"]
    v1 = load_file(str(pair / "replica-1" / "final" / "simplex.safetensors"))["prefix.vertices"]
    assert not torch.allclose(v0, v1)
    cfg = load_config(pair / "replica-1" / "config.yaml")
    assert cfg.simplex.replicas == 1 and cfg.train.seed == 6 and cfg.data.seed == 6
    assert (pair / "replica-1" / "final" / "peft_centroid" / "adapter_model.safetensors").exists()
    assert (pair / "replica-1" / "landscape.png").exists()
    assert evaluate_main([str(pair / "replica-1"), "--split", "dev"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (pair / "replica-1" / "metrics.jsonl").read_text().splitlines()]
    selected = json.loads((pair / "replica-1" / "summary.json").read_text())["selected_step"]
    dev = [r for r in rows if r["split"] == "dev" and r["step"] == selected]
    assert scored["value"] == pytest.approx(dev[0]["accuracy"], abs=1e-9)  # final/ is the dev-selected simplex


def test_replicated_run_resumes_exactly(replicated_and_separate, small_assets, tmp_path):
    """Checkpoint every 3 steps, lose everything after step 3, resume: each replica ends bitwise where the
    uninterrupted run ended."""
    import shutil

    model_dir, data = small_assets
    out = tmp_path / "pair"
    args = run_args(model_dir, data, out, "simplex.replicas=2", "train.seed=5", "data.seed=5", *COMMON)
    assert main([*args, "train.save_every=3"]) == 0
    shutil.rmtree(out / "checkpoints" / "step-6")
    for r in (0, 1):
        shutil.rmtree(out / f"replica-{r}" / "final")
    assert main([*args, "train.save_every=3", "train.resume=auto"]) == 0
    for r in (0, 1):
        a = load_file(str(out / f"replica-{r}" / "final" / "simplex.safetensors"))
        b = load_file(str(replicated_and_separate / "pair" / f"replica-{r}" / "final" / "simplex.safetensors"))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        steps = [json.loads(line)["step"] for line in (out / f"replica-{r}" / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps)


def test_replica_alpha_blocks_and_seeded_rows():
    alpha = simplex.sample_alpha(torch.tensor([3, 3, 4]), torch.tensor(2), torch.tensor([0, 1, 0]), 3, 2)
    torch.testing.assert_close(alpha[0], simplex.sample_alpha(3, torch.tensor(2), torch.tensor([0]), 3, 2)[0])
    torch.testing.assert_close(alpha[2], simplex.sample_alpha(4, torch.tensor(2), torch.tensor([0]), 3, 2)[0])
    block = simplex.replica_alpha(alpha, torch.tensor([0, 0, 1]), 2)  # [B, L, R * K]
    assert block.shape == (3, 2, 6)
    torch.testing.assert_close(block[2, :, 3:], alpha[2])
    assert block[2, :, :3].abs().sum() == 0 and block[0, :, 3:].abs().sum() == 0
