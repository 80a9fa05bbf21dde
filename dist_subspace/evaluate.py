"""Score a finished run: ``python -m dist_subspace.evaluate RUN_DIR [--mode M] [--split S] [--landscape]``.

Prints one JSON object (metric, mode, split, number of examples; mean and std for ``sampled:S`` and
``models:S``). Uses the run's resolved ``config.yaml`` and its ``final/simplex.safetensors``; ``--data key=value``
changes the data (e.g. ``--data task=path/to/file.csv``). Runs under any launcher, like training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dist_subspace.cli import USER_ERRORS, exit_now, user_error
from dist_subspace.config import ConfigError, check_eval_mode, load_config
from dist_subspace.evaluation.scoring import evaluate, write_landscape
from dist_subspace.training.preflight import check_model_folder, check_run_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_subspace.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--mode", default=None, help="centroid | vertex:I | ensemble:S | sampled:S | models:S (default: the run's)"
    )
    parser.add_argument("--split", default="test", choices=["train", "dev", "test"])
    parser.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE", help="data overrides, e.g. task=f.csv")
    parser.add_argument("--landscape", action="store_true", help="also write landscape.png for the split")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    weights = args.run_dir / "final" / "simplex.safetensors"
    try:
        check_run_folder(args.run_dir)  # a finished run, final/ complete and not corrupt: before anything loads
        overrides = [f"data.{item}" for item in args.data] + ["eval.landscape=false", "train.resume=none"]
        cfg = load_config(args.run_dir / "config.yaml", overrides)
        mode = args.mode or cfg.eval.mode
        check_eval_mode(mode)
        check_model_folder(cfg.model.name_or_path, cfg.model.trust_remote_code)
    except ConfigError as err:
        return user_error(err)
    from dist_subspace.training.assembly import build
    from dist_subspace.training.checkpoint import load_simplex_tensors, read_tensors
    from dist_subspace.training.engine import Engine

    engine = None
    try:
        engine = Engine(cfg)
        (splits,), collator, model, _ = build(cfg, engine)
        load_simplex_tensors(model, read_tensors(weights))
        examples = {"train": splits.train, "dev": splits.dev, "test": splits.test}[args.split]
        result = evaluate(model, engine, examples, collator, splits.task, mode, args.batch_size, cfg.simplex.sampling)
    except USER_ERRORS as err:
        if engine is not None:
            engine.end()  # a later run in this process (a notebook, a test) starts clean
        return user_error(err)
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
    exit_now(main())
