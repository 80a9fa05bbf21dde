"""Score a finished run: ``python -m dist_subspace.evaluate RUN_DIR [--mode M] [--split S] [--landscape]``.

Prints one JSON object (metric, mode, split, number of examples; mean and std for ``sampled:S``). Uses the
run's resolved ``config.yaml`` and its ``final/simplex.safetensors``; ``--data key=value`` changes the data
(e.g. ``--data task=path/to/file.csv``). Runs under any launcher, like training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dist_subspace.config import ConfigError, check_eval_mode, load_config
from dist_subspace.data import Collator, Example, TaskSpec
from dist_subspace.evaluation import evaluate, model_outputs
from dist_subspace.metrics import compute_metrics, predict
from dist_subspace.model import PrefixSubspaceModel


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_subspace.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--mode", default=None, help="centroid | vertex:I | ensemble:S | sampled:S (default: the run's)"
    )
    parser.add_argument("--split", default="test", choices=["train", "dev", "test"])
    parser.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE", help="data overrides, e.g. task=f.csv")
    parser.add_argument("--landscape", action="store_true", help="also write landscape.png for the split")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    weights = args.run_dir / "final" / "simplex.safetensors"
    try:
        if not weights.is_file():
            raise ConfigError(f"{weights} not found; pass the folder of a finished run (it has final/)")
        overrides = [f"data.{item}" for item in args.data] + ["eval.landscape=false", "train.resume=none"]
        cfg = load_config(args.run_dir / "config.yaml", overrides)
        mode = args.mode or cfg.eval.mode
        check_eval_mode(mode)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from dist_subspace.checkpoint import load_simplex_tensors
    from dist_subspace.engine import Engine
    from dist_subspace.train import build

    engine = Engine(cfg)
    try:
        splits, collator, model, _ = build(cfg, engine)
        load_simplex_tensors(model, load_file(str(weights)))
        examples = {"train": splits.train, "dev": splits.dev, "test": splits.test}[args.split]
        result = evaluate(model, engine, examples, collator, splits.task, mode, args.batch_size, cfg.simplex.sampling)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {"metric": splits.task.metric, "value": result[splits.task.metric], "split": args.split, **result}
    if args.landscape:
        path = write_landscape(
            model, engine, examples, collator, splits.task, args.run_dir, cfg.eval.landscape_resolution, args.batch_size
        )
        result["landscape"] = str(path) if path else None
    if engine.is_main:
        print(json.dumps(result), flush=True)
    engine.end()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
