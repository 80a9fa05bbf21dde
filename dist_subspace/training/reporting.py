"""Where a run's numbers go: ``metrics.jsonl`` (one row per replica and record, in the replica's folder) and the
experiment trackers of ``train.report_to`` (TensorBoard, MLflow, W&B, ...: Accelerate's, through the engine).

Each tracker keeps its own settings (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ``WANDB_MODE``,
``WANDB_PROJECT``, ``WANDB_DIR``, ...); where none is set, the project is ``dist_subspace``, the tracker's
run is named after the run folder, and a tracker that writes files writes them in the run folder (TensorBoard in
``RUN/tensorboard``, W&B in ``RUN/wandb``, MLflow a file store in ``RUN/mlruns``: its own default,
``sqlite:///mlflow.db`` in the working directory, needs SQLAlchemy, which mlflow-skinny does not bring).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from dist_subspace.core.config import Config
from dist_subspace.training.engine import Engine

DEFAULT_PROJECT = "dist_subspace"
MLFLOW_FOLDER = "mlruns"  # RUN/mlruns: MLflow's file store when MLFLOW_TRACKING_URI is not set


def flat_config(tree: Mapping, prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config as ``section.key`` -> scalar, what every tracker takes as hyperparameters: numbers, booleans
    and strings as they are; lists, mappings and None as their ``str``."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not prefix:  # a section
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def tracker_values(split: str, values: Mapping, replica: int | None, eval_mode: str) -> dict[str, float]:
    """One metrics row as tracker metrics: ``split/key`` (``replica-r/split/key`` with seed replicas) for every number
    of it; a dev/test row scored in another mode than ``eval.mode`` (``eval.select_by``, ``eval.extra_test_modes``)
    under ``split/mode/key``, so that two modes scored at one step do not overwrite each other."""
    mode = values.get("mode")
    section = split if mode in (None, eval_mode) else f"{split}/{mode}"
    tag = f"replica-{replica}/" if replica is not None else ""
    return {
        f"{tag}{section}/{key}": value
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def tracker_setup(names: list[str], out: Path, env: Mapping[str, str]) -> tuple[str, dict[str, dict]]:
    """(project, per-tracker keyword arguments) for :meth:`Engine.start_trackers`: the run is named after the run
    folder; a setting of the tracker's own (``env``) is never overridden."""
    project = DEFAULT_PROJECT
    if "wandb" in names and env.get("WANDB_PROJECT"):  # Accelerate passes the project to wandb.init, which wins
        project = env["WANDB_PROJECT"]
    elif "comet_ml" in names and env.get("COMET_PROJECT_NAME"):
        project = env["COMET_PROJECT_NAME"]
    kwargs: dict[str, dict] = {}
    if "mlflow" in names:
        kwargs["mlflow"] = {"run_name": out.name}
    if "wandb" in names:
        kwargs["wandb"] = {
            **({} if env.get("WANDB_NAME") else {"name": out.name}),
            **({} if env.get("WANDB_DIR") else {"dir": str(out)}),  # OUTPUT_DIR/wandb/, not the working directory
        }
    return project, kwargs


def mlflow_store(names: list[str], out: Path, env: Mapping[str, str]) -> str | None:
    """The tracking URI MLflow logs to when ``names`` has it and ``MLFLOW_TRACKING_URI`` is not set in ``env``: a
    file store in the run folder (``RUN/mlruns``, absolute); None where MLflow is not logged to or has its own."""
    if "mlflow" not in names or env.get("MLFLOW_TRACKING_URI"):
        return None
    return (out / MLFLOW_FOLDER).resolve().as_uri()


class MetricsLog:
    """Writes each replica's ``metrics.jsonl`` rows and logs the same numbers to the run's trackers (main process)."""

    def __init__(self, cfg: Config, engine: Engine, dirs: list[Path]) -> None:
        self.cfg, self.engine, self.dirs = cfg, engine, dirs
        self.out = Path(cfg.train.output_dir)

    def start_trackers(self, env: Mapping[str, str]) -> None:
        """Start the trackers with the run's config as hyperparameters (before the model loads: a tracker that
        cannot start fails the run in seconds)."""
        names = self.engine.trackers
        if not names:
            return
        project, kwargs = tracker_setup(names, self.out, env)
        store = mlflow_store(names, self.out, env)
        if self.engine.is_main and ("dir" in kwargs.get("wandb", {}) or store is not None):
            self.out.mkdir(parents=True, exist_ok=True)  # wandb.init(dir=...) wants it there; MLflow's store in it
        self.engine.start_trackers(project, flat_config(self.cfg.to_dict()), kwargs, mlflow_uri=store)

    def record(self, step: int, split: str, rows: list[dict]) -> None:
        """One metrics.jsonl row per replica, in its own folder, and the same numbers to the trackers at ``step``."""
        if not self.engine.is_main:
            return
        replicas = len(self.dirs) > 1  # tags start replica-r/
        logged: dict[str, float] = {}
        for r, values in enumerate(rows):
            row = {"step": step, "split": split, **values}
            row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}  # JSON
            with open(self.dirs[r] / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            logged.update(tracker_values(split, values, r if replicas else None, self.cfg.eval.mode))
        if logged:
            self.engine.log_metrics(logged, step)
