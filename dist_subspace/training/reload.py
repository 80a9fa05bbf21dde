"""A finished run, loaded to score or label with: what ``evaluate`` and ``predict`` share.

:func:`finished_run_config` checks the run folder and reads its config before anything heavy loads (a bad folder
is a one-line :class:`~dist_subspace.core.config.ConfigError`); :func:`load_finished_run` then starts the engine, builds
data, tokenizer and model as training did, and loads ``final/simplex.safetensors``.

Reading a run logs nothing: the trackers it trained with (``train.report_to``, ``train.tensorboard``) are not
started, so a run trained with W&B is evaluated on a machine without wandb.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dist_subspace.core.config import Config, ConfigError, load_config
from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.data.batching import Collator
from dist_subspace.data.tasks import FewShotSplits, TaskSpec
from dist_subspace.training.engine import Engine
from dist_subspace.training.preflight import check_model_folder, check_run_folder


@dataclass
class FinishedRun:
    """A run's config, its engine (process group), its data splits, the collator and the model holding its final
    simplex. Call :meth:`end` when done, so a later run in the same process starts clean."""

    run_dir: Path
    cfg: Config
    engine: Engine
    splits: FewShotSplits
    collator: Collator
    model: PrefixSubspaceModel

    @property
    def task(self) -> TaskSpec:
        return self.splits.task

    def end(self) -> None:
        self.engine.end()


def finished_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """The resolved config of the finished run in ``run_dir`` (with ``section.key=value`` ``overrides``), after
    checking, before anything heavy loads, that ``final/`` is complete and not corrupt and that the model folder
    is usable. The run's landscape is off, nothing resumes, and no experiment tracker starts (reading a run logs
    nothing, and the tracker's package need not be installed)."""
    run_dir = Path(run_dir)
    if not (run_dir / "final").is_dir() and (run_dir / "replica-0").is_dir():
        raise ConfigError(f"{run_dir} holds seed replicas, each a finished run: pass {run_dir / 'replica-R'}")
    check_run_folder(run_dir)
    read_only = ["eval.landscape=false", "train.resume=none", "train.report_to=[]", "train.tensorboard=false"]
    cfg = load_config(run_dir / "config.yaml", [*overrides, *read_only])
    check_model_folder(cfg.model.name_or_path, cfg.model.trust_remote_code)
    return cfg


def check_mode_fits(cfg: Config, kind: str, number: int | None) -> None:
    """A mode (``kind``, ``number`` from :func:`~dist_subspace.core.config.check_eval_mode`) the run of ``cfg`` has:
    ``vertex:I`` names one of its K = ``simplex.vertices`` vertices (checked before the backbone loads)."""
    k = cfg.simplex.vertices
    if kind == "vertex" and not 0 <= number < k:
        raise ConfigError(
            f"--mode vertex:{number}: vertex index {number} out of range for K={k} (the run's simplex.vertices); "
            f"use vertex:0 to vertex:{k - 1}"
        )


def load_finished_run(run_dir: Path, cfg: Config) -> FinishedRun:
    """Start the engine and build the run of ``cfg`` (from :func:`finished_run_config`) with its final simplex.
    On failure the engine ends before the error goes on."""
    from dist_subspace.training.assembly import build
    from dist_subspace.training.checkpoint import load_simplex_tensors, read_tensors

    engine = Engine(cfg)
    try:
        (splits,), collator, model, _ = build(cfg, engine)
        load_simplex_tensors(model, read_tensors(Path(run_dir) / "final" / "simplex.safetensors"))
    except BaseException:
        engine.end()  # a later run in this process (a notebook, a test) starts clean
        raise
    return FinishedRun(Path(run_dir), cfg, engine, splits, collator, model)
