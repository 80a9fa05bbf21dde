"""Real multi-process runs: 2 CPU processes, DeepSpeed ZeRO-3 over gloo, through every launcher."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_args
from tests.two_nodes import BIN, ROOT, free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def torchrun(module: str, *args: str) -> list[str]:
    """2 local processes under torchrun, on a free port."""
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", module, *args]


def torchrun_script(script: Path, *args: str) -> list[str]:
    """2 local processes under torchrun running ``script``, on a free port."""
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script), *args]


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch(command: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` as from a user's shell: no launcher variables left over from a run in this process."""
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env = {**clean, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def check_zero3_run(out: Path) -> None:
    """Sharded backbone, identical simplex on both ranks, a falling loss, a final checkpoint that loads."""
    facts = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    full_bytes = facts[0]["frozen_numel"] * 4  # float32 on CPU
    for f in facts:
        assert f["world_size"] == 2
        assert 0.45 < f["frozen_local_bytes"] / full_bytes < 0.55, f  # each rank holds about half
    assert facts[0]["simplex_sha256"] == facts[1]["simplex_sha256"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    result = launch([sys.executable, "-m", "dist_subspace.evaluate", str(out), "--split", "dev"])
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert scored["n"] == 16 and scored["metric"] == "accuracy" and 0 <= scored["value"] <= 1


@pytest.fixture(scope="module")
def zero3_runs(small_assets, tmp_path_factory):
    """The same ZeRO-3 run through `accelerate launch`, through `deepspeed` with gradient checkpointing, and
    through `torchrun` with the frozen parameters offloaded to CPU memory (ds_configs/zero3_offload.json)."""
    model_dir, data = small_assets
    root = tmp_path_factory.mktemp("zero3")
    config = ROOT / "launch/accelerate/cpu_zero3.yaml"
    accelerate = [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(config),
        "--main_process_port",
        str(free_port()),
    ]
    launch([*accelerate, "-m", "dist_subspace.train", *run_args(model_dir, data, root / "accelerate")])
    deepspeed = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    checkpointed = run_args(model_dir, data, root / "deepspeed", "model.gradient_checkpointing=true")
    launch([*deepspeed, "--module", "dist_subspace.train", *checkpointed])
    offload = run_args(model_dir, data, root / "offload", "engine.deepspeed=zero3_offload")
    launch(torchrun("dist_subspace.train", *offload))
    return {name: root / name for name in ("accelerate", "deepspeed", "offload")}


@pytest.mark.parametrize("launcher", ["accelerate", "deepspeed", "offload"])
def test_zero3_launch(zero3_runs, launcher):
    check_zero3_run(zero3_runs[launcher])


@pytest.mark.parametrize("variant", ["deepspeed", "offload"])
def test_checkpointing_and_offload_under_zero3_give_the_same_simplex(zero3_runs, variant):
    a = load_file(str(zero3_runs["accelerate"] / "checkpoints/step-12/simplex.safetensors"))
    b = load_file(str(zero3_runs[variant] / "checkpoints/step-12/simplex.safetensors"))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _trace(out: Path, world: int) -> dict[tuple[int, int], torch.Tensor]:
    """(step, example index) -> alpha [L, K], over all ranks and micro-batches."""
    alphas = {}
    for rank in range(world):
        trace = load_file(str(out / "ranks" / f"trace-rank-{rank}.safetensors"))
        for key, index in trace.items():
            if key.endswith(".index"):
                step = int(key.split(".")[0][4:])
                for i, a in zip(index.tolist(), trace[key.replace(".index", ".alpha")], strict=True):
                    alphas[(step, i)] = a
    return alphas


@pytest.fixture(scope="module")
def single_and_pair(small_assets, tmp_path_factory):
    """The same run as 1 process x accumulation 2, and as 2 processes x accumulation 1: ZeRO-3, and plain
    data parallel (replicated backbone, no DeepSpeed)."""
    model_dir, data = small_assets
    root = tmp_path_factory.mktemp("split")
    common = ("train.trace=true", "train.max_steps=6", "train.eval_every=6", "train.save_every=6")
    single, pair, ddp = root / "single", root / "pair", root / "ddp"
    launch(
        [sys.executable, "-m", "dist_subspace.train", *run_args(model_dir, data, single, "train.grad_accum=2", *common)]
    )
    launch(torchrun("dist_subspace.train", *run_args(model_dir, data, pair, "engine.deepspeed=zero3_bf16", *common)))
    launch(torchrun("dist_subspace.train", *run_args(model_dir, data, ddp, *common)))
    return single, pair, ddp


@pytest.mark.parametrize("two_process_run", ["zero3", "ddp"])
def test_world_size_and_accumulation_do_not_change_alphas_or_the_simplex(single_and_pair, two_process_run):
    single, pair, ddp = single_and_pair
    other = pair if two_process_run == "zero3" else ddp
    one, two = _trace(single, 1), _trace(other, 2)
    assert len(one) == 6 * 8 and one.keys() == two.keys()  # every step saw the same 8 examples
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=0)
    a = load_file(str(single / "checkpoints/step-6/simplex.safetensors"))
    b = load_file(str(other / "checkpoints/step-6/simplex.safetensors"))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    facts = [json.loads((other / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert facts[0]["simplex_sha256"] == facts[1]["simplex_sha256"]
    if two_process_run == "ddp":  # replicated: each rank holds the whole frozen backbone
        assert facts[0]["frozen_local_bytes"] == facts[0]["frozen_numel"] * 4


@pytest.mark.parametrize("mode", ["centroid", "vertex:1", "ensemble:2", "sampled:2", "models:2"])
def test_distributed_evaluation_matches_one_process_at_an_odd_split(single_and_pair, mode):
    single, _, _ = single_and_pair  # 41 test examples: ranks get 21 and 20 (one padded)
    solo = launch([sys.executable, "-m", "dist_subspace.evaluate", str(single), "--mode", mode])
    duo = launch(torchrun("dist_subspace.evaluate", str(single), "--mode", mode))
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (solo, duo))
    assert a["n"] == b["n"] == 41
    assert a["value"] == pytest.approx(b["value"], abs=1e-9)


def test_replicas_under_zero3_score_every_row_once_as_one_process_does(small_assets, tmp_path):
    """R = 3 seed replicas on 2 ranks, 41 test examples (123 rows, an odd split): every replica's dev and test
    scores, at every evaluation, equal one process's (a row lost or doubled between the ranks would change
    them, or end the run in a KeyError)."""
    model_dir, data = small_assets
    common = ("simplex.replicas=3", "train.max_steps=4", "train.eval_every=2", "train.save_every=4")
    common += ("eval.landscape=false", "eval.extra_test_modes=[ensemble:2]")
    one, two = tmp_path / "one", tmp_path / "two"
    launch(
        [sys.executable, "-m", "dist_subspace.train", *run_args(model_dir, data, one, "train.grad_accum=2", *common)]
    )
    launch(torchrun("dist_subspace.train", *run_args(model_dir, data, two, "engine.deepspeed=zero3_bf16", *common)))
    for r in range(3):
        rows = [
            [json.loads(line) for line in (run / f"replica-{r}" / "metrics.jsonl").read_text().splitlines()]
            for run in (one, two)
        ]
        scores = [[(x["step"], x["split"], x["accuracy"], x["n"]) for x in rs if x["split"] != "train"] for rs in rows]
        assert len(scores[0]) == 5 and {s[3] for s in scores[0] if s[1] == "test"} == {41}  # test: initial, final x2
        assert scores[0] == scores[1]
        a, b = (json.loads((run / f"replica-{r}" / "summary.json").read_text()) for run in (one, two))
        assert a == b


NODE_LOCAL = """
import os, runpy, sys
os.chdir(os.environ["NODES"] + "/node" + os.environ["RANK"])  # each rank on a disk of its own
sys.argv = ["dist_subspace.train", *sys.argv[1:]]
runpy.run_module("dist_subspace.train", run_name="__main__")
"""


def test_resume_on_node_local_disks(small_assets, tmp_path):
    """Only rank 0's disk holds the checkpoint (the other node's output folder is empty): rank 0 reads it and
    sends it, so both ranks continue from step 3 and end where an uninterrupted run ends."""
    model_dir, data = small_assets
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    common = ("train.max_steps=6", "train.save_every=3", "train.eval_every=3", "eval.landscape=false")
    args = [a for a in run_args(model_dir, data, "run", *common) if not a.startswith("train.output_dir")]
    args.append("train.output_dir=run")
    whole, run0 = tmp_path / "whole", tmp_path / "node0" / "run"
    single = ("train.grad_accum=2",)  # 1 process x 2 micro-batches = the 2-process global batch
    launch([sys.executable, "-m", "dist_subspace.train", *run_args(model_dir, data, whole, *common), *single])
    launch([sys.executable, "-m", "dist_subspace.train", *args[:-1], f"train.output_dir={run0}", *single])
    shutil.rmtree(run0 / "checkpoints" / "step-6")
    shutil.rmtree(run0 / "final")
    script = tmp_path / "node_local.py"
    script.write_text(NODE_LOCAL)
    env = {"NODES": str(tmp_path)}
    result = launch(torchrun_script(script, *args, "train.resume=auto", "engine.deepspeed=zero3_bf16"), env=env)
    assert "resumed from run/checkpoints/step-3" in result.stdout
    facts = [json.loads((tmp_path / f"node{r}" / "run" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert facts[0]["simplex_sha256"] == facts[1]["simplex_sha256"]
    a = load_file(str(run0 / "final" / "simplex.safetensors"))
    b = load_file(str(whole / "final" / "simplex.safetensors"))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "node1" / "run" / "checkpoints").exists()  # rank 1 wrote no checkpoint of its own
