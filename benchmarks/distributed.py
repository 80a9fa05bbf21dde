"""1 process against 2 processes with ZeRO-3 over gloo, through the trainer: ``python -m benchmarks.bench
--distributed [--model M] [--steps N] [--keep DIR]``.

Four runs of ``python -m dist_subspace.train``, the same recipe (Rotten Tomatoes, 16 training examples, global
batch 8, N optimizer steps):

- ``single``: 1 process, the backbone replicated, micro-batch 4 x accumulation 2; ``single_short``: N/2 steps;
- ``zero3``: 2 processes under torchrun with ``ds_configs/zero3_bf16.json`` and DeepSpeed's comms logger on,
  micro-batch 4 on each rank; each rank writes the logger's records when training ends
  (:func:`train_recording_comms`);
- ``zero3_short``: the same with N/2 steps. Set-up and evaluation are the same in a run and its short twin, so
  the difference of their logged collectives (and of their CPU seconds, all processes together), over the
  difference of their steps, is what a training step moves (and costs, whatever else loads the machine).

Reports each rank's frozen bytes (``ranks/rank-R.json``), the step time (``metrics.jsonl``, logged every step,
the first step left out), the bytes per step by collective, and whether both ranks and both runs end with the
same simplex. The simplex gradients' all-reduce goes through torch, not DeepSpeed, so it is counted from the
simplex size instead.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import torch
from safetensors.torch import load_file

from benchmarks.sides import ROOT, model_config


def train_recording_comms(argv: list[str]) -> NoReturn:
    """``python -m benchmarks.distributed OUT_DIR [train overrides]``: the trainer, then this rank's
    DeepSpeed comms-logger records as ``OUT_DIR/comms-rank-R.json`` (``{op: {"calls", "bytes"}}``, message bytes
    as the logger counts them: for an all-gather, this rank's shard)."""
    from dist_subspace.core.cli import exit_now
    from dist_subspace.train import main as train

    code = train(argv[1:])
    from dist_subspace.training.engine import comms_records

    rows = comms_records()
    rank = int(os.environ.get("RANK", "0"))
    (Path(argv[0]) / f"comms-rank-{rank}.json").write_text(json.dumps(rows) + "\n")
    exit_now(code)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every finished child, and the children they waited for
    return usage.ru_utime + usage.ru_stime


def _run(command: list[str], timeout: int = 1800) -> tuple[float, float]:
    """Run a trainer command from the repository root; (wall seconds, CPU seconds of all its processes)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    start, cpu = time.perf_counter(), _children_cpu_s()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed: {(result.stdout + result.stderr)[-3000:]}")
    return time.perf_counter() - start, _children_cpu_s() - cpu


def _overrides(model: str, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model}",
        "data.task=rotten_tomatoes",
        "data.shots_per_class=8",
        "data.test_size=16",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        "train.micro_batch_size=4",
        "train.warmup_steps=1",
        "train.log_every=1",
        f"train.eval_every={steps}",
        f"train.save_every={steps}",
        "train.progress=false",
        "train.overwrite=true",
        "eval.landscape=false",
        *extra,
    ]


def _run_facts(out: Path, steps: int, wall_s: float, cpu_s: float) -> dict:
    """What a finished run folder says: frozen bytes per rank, step time, the simplex hash per rank."""
    ranks = sorted((out / "ranks").glob("rank-*.json"))
    facts = [json.loads(p.read_text()) for p in ranks]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["examples_per_s"] for r in rows if r["split"] == "train"][1:]  # step 1 warms up
    element = torch.empty((), dtype=getattr(torch, facts[0]["dtype"].removeprefix("torch."))).element_size()
    full = facts[0]["frozen_numel"] * element
    return {
        "world_size": facts[0]["world_size"],
        "frozen_bytes": full,
        "frozen_local_bytes": [f["frozen_local_bytes"] for f in facts],
        "frozen_local_fraction": [f["frozen_local_bytes"] / full for f in facts],
        "step_s": 8 / statistics.median(rates),
        "step_s_each": [8 / r for r in rates],
        "ranks_same_simplex": len({f["simplex_sha256"] for f in facts}) == 1,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "steps": steps,
    }


def distributed_facts(model: str = "smollm2-135m", steps: int = 8, keep: str | None = None) -> dict:
    """The four runs (see the module docstring) and what they show; one JSON-ready dict."""
    if model_config(model) is not None:
        raise ValueError(f"--distributed trains with the trainer, which loads models: {model!r} is only a config")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    root.mkdir(parents=True, exist_ok=True)
    ds = json.loads((ROOT / "ds_configs" / "zero3_bf16.json").read_text())
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    ds_path = root / "zero3_comms.json"
    ds_path.write_text(json.dumps(ds, indent=2))
    python, short = sys.executable, steps // 2
    torchrun = [python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    recorded = ["-m", "benchmarks.distributed"]  # the trainer, then its comms records
    zero3 = f"engine.deepspeed={ds_path}"
    runs = {
        "single": ([python, "-m", "dist_subspace.train"], steps, ["train.grad_accum=2"]),
        "single_short": ([python, "-m", "dist_subspace.train"], short, ["train.grad_accum=2"]),
        "zero3": ([*torchrun, str(free_port()), *recorded, str(root / "zero3")], steps, [zero3]),
        "zero3_short": ([*torchrun, str(free_port()), *recorded, str(root / "zero3_short")], short, [zero3]),
    }
    result: dict = {
        "setup": {
            "model": model,
            "task": "rotten_tomatoes, 16 training examples",
            "global_batch": 8,
            "single": "1 process, replicated backbone, micro-batch 4 x accumulation 2",
            "zero3": "2 processes (torchrun), ds_configs/zero3_bf16.json + comms_logger, micro-batch 4 per rank",
            "steps": steps,
            "short_steps": short,
            "threads_per_process": int(os.environ.get("OMP_NUM_THREADS", "1")),
        },
        "runs": {},
    }
    for name, (command, n, extra) in runs.items():
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        result["runs"][name] = _run_facts(out, n, *_run([*command, *_overrides(model, out, n, *extra)]))
    # A run and its short twin share set-up and evaluation: their difference is what the extra steps cost.
    runs_, extra_steps = result["runs"], steps - short
    cpu = {name: (runs_[name]["cpu_s"] - runs_[f"{name}_short"]["cpu_s"]) / extra_steps for name in ("single", "zero3")}
    per_step = {}
    for rank in (0, 1):
        long, brief = (json.loads((root / r / f"comms-rank-{rank}.json").read_text()) for r in ("zero3", "zero3_short"))
        for op in sorted(set(long) | set(brief)):
            a, b = long.get(op, {"calls": 0, "bytes": 0}), brief.get(op, {"calls": 0, "bytes": 0})
            per_step.setdefault(op, []).append({k: (a[k] - b[k]) / extra_steps for k in ("calls", "bytes")})
    single = load_file(str(root / "single" / "checkpoints" / f"step-{steps}" / "simplex.safetensors"))
    zero3 = load_file(str(root / "zero3" / "checkpoints" / f"step-{steps}" / "simplex.safetensors"))
    diff = max((single[k] - zero3[k]).abs().max().item() for k in single)
    simplex_bytes = sum(t.numel() * 4 for t in single.values())
    gathered = [row["bytes"] for row in per_step.get("all_gather_into_tensor", [])]
    result["step"] = {
        "wall_s": {name: runs_[name]["step_s"] for name in ("single", "zero3")},
        "zero3_over_single_wall": runs_["zero3"]["step_s"] / runs_["single"]["step_s"],
        "cpu_s_all_processes": cpu,  # CPU seconds per step, both ranks together: load on the machine aside
        "zero3_over_single_cpu": cpu["zero3"] / cpu["single"],
    }
    result["bytes_per_step"] = {
        "deepspeed_collectives": per_step,  # op -> [rank 0, rank 1]: calls and message bytes per step
        "all_gather_received_per_rank": gathered,  # message = the rank's shard; each rank receives the other's
        "simplex_grad_all_reduce": simplex_bytes + 4,  # flat fp32 gradients + the loss, by torch.distributed
        "frozen_bytes": result["runs"]["zero3"]["frozen_bytes"],
    }
    scale = max(t.abs().max().item() for t in single.values())
    # The two runs sum the same gradients in another order (accumulation vs all-reduce): fp32 rounding apart,
    # which AdamW's normalisation lifts for the elements whose gradients are tiny (up to lr per step).
    result["same_simplex"] = {
        "ranks_identical": result["runs"]["zero3"]["ranks_same_simplex"],
        "max_abs_diff_single_vs_zero3": diff,
        "max_abs_value": scale,
        "relative": diff / scale,
        "same": diff <= 1e-4 * scale,
    }
    result["run_folders"] = str(root) if keep else None
    return result


def format_distributed(result: dict) -> str:
    """A readable summary of :func:`distributed_facts`."""
    runs, moved = result["runs"], result["bytes_per_step"]
    lines = [f"{result['setup']['model']}, global batch 8, {result['setup']['steps']} steps"]
    for name in ("single", "zero3"):
        r = runs[name]
        fractions = ", ".join(f"{f:.3f}" for f in r["frozen_local_fraction"])
        lines.append(
            f"{name:<7} world {r['world_size']}: frozen bytes per rank / total = {fractions}; "
            f"step {r['step_s']:.3f} s (median); run {r['wall_s']:.0f} s"
        )
    step = result["step"]
    lines.append(
        f"zero3 / single step: wall {step['zero3_over_single_wall']:.3f}; CPU seconds per step (all processes) "
        f"{step['cpu_s_all_processes']['single']:.2f} -> {step['cpu_s_all_processes']['zero3']:.2f} "
        f"({step['zero3_over_single_cpu']:.3f})"
    )
    for op, ranks in moved["deepspeed_collectives"].items():
        cells = ", ".join(
            f"rank {r}: {x['calls']:.0f} calls, {x['bytes'] / 2**20:.1f} MiB" for r, x in enumerate(ranks)
        )
        lines.append(f"per step, {op}: {cells}")
    received = max(moved["all_gather_received_per_rank"], default=0.0)
    lines.append(
        f"per step: all-gathered into each rank {received / 2**20:.1f} MiB "
        f"(frozen model {moved['frozen_bytes'] / 2**20:.1f} MiB); simplex all-reduce "
        f"{moved['simplex_grad_all_reduce'] / 2**10:.0f} KiB"
    )
    same = result["same_simplex"]
    lines.append(
        f"same simplex: ranks identical {same['ranks_identical']}, single vs zero3 max |diff| "
        f"{same['max_abs_diff_single_vs_zero3']:.2e} of values up to {same['max_abs_value']:.2f} (same: {same['same']})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    train_recording_comms(sys.argv[1:])
