"""Train a prefix subspace over a frozen model.

    python -m dist_subspace.train                                   # embedded default: SmolLM2-135M, Rotten Tomatoes
    python -m dist_subspace.train --config my.yaml simplex.vertices=4 train.max_steps=200
    accelerate launch --config_file launch/accelerate/cpu_zero3.yaml -m dist_subspace.train
    deepspeed --num_gpus 8 --module dist_subspace.train engine.deepspeed=zero3_bf16

Data flows one way: config -> data -> backbone + simplex -> engine -> loop -> checkpoint / evaluate.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dist_subspace.core.cli import USER_ERRORS, collective_failure, exit_now, run_stopped, user_error
from dist_subspace.core.config import Config, ConfigError, load_config
from dist_subspace.training.checkpoint import latest_checkpoint, recover_interrupted_saves
from dist_subspace.training.guards import RunStopped
from dist_subspace.training.preflight import check_output_dir, check_train, is_main_rank
from dist_subspace.training.recipe import Recipe


def prepare_output_dir(cfg: Config) -> None:
    """Refuse to overwrite a finished run or checkpoints by accident (before anything is loaded)."""
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir={str(out)!r} is a file; choose a folder")
    taken = (out / "final").exists() or (out / "replica-0" / "final").exists() or latest_checkpoint(out) is not None
    if taken and cfg.train.resume == "none" and not cfg.train.overwrite:
        raise ConfigError(
            f"train.output_dir={str(out)!r} already holds a run; pass train.resume=auto to continue it, "
            "train.overwrite=true to start over, or a new train.output_dir"
        )
    rank0 = os.environ.get("RANK", "0") == "0"  # node-local disks: only rank 0 reads the checkpoint
    if (
        rank0
        and cfg.train.resume not in ("none", "auto")
        and not (Path(cfg.train.resume) / "trainer_state.json").exists()
    ):
        raise ConfigError(f"train.resume={cfg.train.resume!r} is not a checkpoint folder (no trainer_state.json)")


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str], bool]:
    parser = argparse.ArgumentParser(prog="python -m dist_subspace.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a YAML file; without it the embedded default runs")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. simplex.vertices=4")
    args = parser.parse_intermixed_args(argv)  # key=value words may stand before and after --config
    return args.config, args.overrides, args.local_rank is not None


def main(argv: list[str] | None = None) -> int:
    config_path, overrides, deepspeed_launcher = parse_args(argv)
    try:
        cfg = load_config(config_path, overrides)
        if deepspeed_launcher and cfg.engine.deepspeed is None:
            cfg.engine.deepspeed = "zero3_bf16"  # launched by `deepspeed`: it means DeepSpeed; ZeRO-3 by default
        check_output_dir(Path(cfg.train.output_dir))
        if is_main_rank():  # before anything reads the run folder (the other ranks wait in the engine's start)
            for done in recover_interrupted_saves(Path(cfg.train.output_dir)):
                print(f"[dist_subspace] {done}", flush=True)
        prepare_output_dir(cfg)
        check_train(cfg)  # resume target, model folder, DeepSpeed JSON, optional packages: before anything loads
    except USER_ERRORS as err:
        return user_error(err)
    if cfg.model.trust_remote_code and is_main_rank():
        print(f"[dist_subspace] model.trust_remote_code=true: Python files of {cfg.model.name_or_path} may run")
    recipe = Recipe(cfg)
    try:
        recipe.setup()
    except USER_ERRORS as err:
        if hasattr(recipe, "engine"):
            recipe.engine.end()  # a later run in this process (a notebook, a test) starts clean
        return user_error(err)
    recipe.prepare_folders()
    recipe.engine.barrier()
    try:
        summaries = recipe.train()
    except (RunStopped, OSError, RuntimeError) as err:  # a fault, not a bad input: one line, exit status 1
        if isinstance(err, RuntimeError) and not isinstance(err, RunStopped) and not collective_failure(err):
            raise  # a bug, not a fault: keep its traceback
        code = run_stopped(err, recipe.engine.is_main, recipe.engine.rank)
        if isinstance(err, RunStopped):  # every rank stopped together: closing the process group cannot hang
            recipe.cleanup()
        return code
    recipe.log(json.dumps(summaries[0] if len(summaries) == 1 else {"replicas": summaries}))
    recipe.cleanup()
    return 0


if __name__ == "__main__":
    exit_now(main())
