"""What stacking S points into one pass buys under ZeRO-3: ``python -m benchmarks.bench --evaluation
[--model M] [--points S] [--examples N] [--batch B] [--rounds R]``.

Two processes under torchrun, ``ds_configs/zero3_bf16.json``, the trainer's own set-up (:class:`Recipe`), K = 3,
N test examples of Rotten Tomatoes scored under ``ensemble:S``, two ways, interleaved round by round (the order
alternating):

- ``stacked``: what evaluation does: one :func:`model_outputs` call for the S points, their N x S rows chunked
  to the budget of B rows per forward (``train.eval_batch_size``), so a forward (and its gather of every
  layer's shards) serves several points;
- ``per_point``: one call per point, each point's rows chunked to the same budget: where a rank holds fewer
  than B examples (a few-shot dev set: 32 examples over 2 ranks at B = 32), S forwards of N / 2 rows where
  stacking needs N x S / (2 B); where it holds many, the two differ only in the last partial forward.

Reports, per side, the median wall seconds of rank 0 and the CPU seconds of both processes together (what the
work costs whatever else loads the machine), the forwards per rank, and the largest difference between the two
sides' logits (the same rows, batched differently).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.distributed import free_port


def _overrides(model: str, examples: int, out: Path) -> list[str]:
    return [
        f"model.name_or_path={model}",
        "data.task=rotten_tomatoes",
        "data.shots_per_class=8",
        f"data.test_size={examples}",
        "simplex.vertices=3",
        "engine.deepspeed=zero3_bf16",
        f"train.output_dir={out}",
        "train.resume=none",
        "train.progress=false",
        "eval.landscape=false",
    ]


def _worker(result_path: str, model: str, examples: int, points: int, batch: int, rounds: int) -> None:
    """One rank: build the model as the trainer does, then time both sides ``rounds`` times."""
    from dist_subspace.core.config import load_config
    from dist_subspace.evaluation.points import Query, mode_points
    from dist_subspace.evaluation.scoring import model_outputs
    from dist_subspace.training.recipe import Recipe

    cfg = load_config(None, _overrides(model, examples, Path(result_path).parent / "run"))
    recipe = Recipe(cfg)
    recipe.setup()
    model_, engine, collator = recipe.model, recipe.engine, recipe.collator
    test = recipe.splits[0].test
    pts = mode_points(model_, "ensemble", points, cfg.simplex.sampling)

    def stacked() -> list[torch.Tensor]:
        return model_outputs(model_, engine, [Query(test, p) for p in pts], collator, batch)

    def per_point() -> list[torch.Tensor]:
        return [model_outputs(model_, engine, [Query(test, p)], collator, batch)[0] for p in pts]

    sides = {"stacked": stacked, "per_point": per_point}
    outputs = {name: side() for name, side in sides.items()}  # warm-up, and the outputs to compare
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in list(sides)[:: 1 if r % 2 == 0 else -1]:
            engine.barrier()
            w, c = time.perf_counter(), time.process_time()
            sides[name]()
            c, w = time.process_time() - c, time.perf_counter() - w
            wall[name].append(w)
            cpu[name].append(sum(engine.gather_objects(c)))  # both processes' CPU seconds
    rows_per_rank = math.ceil(len(test) * points / engine.world_size)
    per_point_rows = math.ceil(len(test) / engine.world_size)
    diff = max((a - b).abs().max().item() for a, b in zip(outputs["stacked"], outputs["per_point"], strict=True))
    if engine.is_main:
        result = {
            "setup": {
                "model": model,
                "processes": engine.world_size,
                "deepspeed": "ds_configs/zero3_bf16.json",
                "mode": f"ensemble:{points}",
                "examples": len(test),
                "rows_per_forward_budget": batch,
                "rounds": rounds,
                "threads_per_process": torch.get_num_threads(),
            },
            "forwards_per_rank": {
                "stacked": math.ceil(rows_per_rank / batch),
                "per_point": points * math.ceil(per_point_rows / batch),
            },
            "wall_s": {name: statistics.median(v) for name, v in wall.items()},
            "cpu_s_all_processes": {name: statistics.median(v) for name, v in cpu.items()},
            "rounds_wall_s": wall,
            "max_abs_logit_diff": diff,
            "max_abs_logit": max(a.abs().max().item() for a in outputs["per_point"]),
            "dtype": str(recipe.model.compute_dtype).removeprefix("torch."),
        }
        result["speedup_wall"] = result["wall_s"]["per_point"] / result["wall_s"]["stacked"]
        result["speedup_cpu"] = result["cpu_s_all_processes"]["per_point"] / result["cpu_s_all_processes"]["stacked"]
        Path(result_path).write_text(json.dumps(result) + "\n")
    recipe.cleanup()


def evaluation_facts(
    model: str = "smollm2-135m", examples: int = 32, points: int = 8, batch: int = 32, rounds: int = 5
) -> dict:
    """Launch the two ranks (torchrun, 2 processes) and return rank 0's measurements."""
    root = Path(tempfile.mkdtemp(prefix="bench-evaluation-"))
    result_path = root / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), "-m", "benchmarks.evaluation", str(result_path), model]
    command += [str(v) for v in (examples, points, batch, rounds)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"the evaluation bench failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(result_path.read_text())


def format_evaluation(result: dict) -> str:
    """A readable table of :func:`evaluation_facts`."""
    s = result["setup"]
    lines = [
        f"{s['mode']} on {s['examples']} examples, {s['model']}, {s['processes']} processes ZeRO-3 "
        f"({s['threads_per_process']} thread each), at most {s['rows_per_forward_budget']} rows per forward, "
        f"median of {s['rounds']} interleaved rounds",
        f"{'side':<10} {'forwards/rank':>13} {'wall s':>8} {'cpu s (all)':>11}",
    ]
    for name in ("stacked", "per_point"):
        lines.append(
            f"{name:<10} {result['forwards_per_rank'][name]:>13} "
            f"{result['wall_s'][name]:>8.2f} {result['cpu_s_all_processes'][name]:>11.2f}"
        )
    lines.append(
        f"speed-up of stacking: {result['speedup_wall']:.2f}x wall, {result['speedup_cpu']:.2f}x CPU; "
        f"largest logit difference {result['max_abs_logit_diff']:.2e}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    path, model_name, *numbers = sys.argv[1:]
    _worker(path, model_name, *(int(n) for n in numbers))
