"""What a run writes beside its checkpoints: the resolved configs, the example manifests, the metrics log made
consistent with the checkpoint a run resumes from, and each rank's facts (what it holds, to check sharding)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from dist_subspace.assembly import replica_config
from dist_subspace.checkpoint import simplex_tensors
from dist_subspace.config import Config, save_config
from dist_subspace.engine import Engine, parameter_counts
from dist_subspace.model import PrefixSubspaceModel


def prepare_run_folders(cfg: Config, out: Path, dirs: list[Path], manifests: list[dict], step: int) -> None:
    """Write ``out/config.yaml`` and, per replica folder, its config and ``examples.json``. Resuming at ``step``
    (> 0): drop metrics rows logged after that checkpoint. A fresh run (``train.resume=none``, overwrite already
    checked): clear what an earlier run left (metrics, ``final/``, summary, checkpoints)."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    fresh = cfg.train.resume == "none"
    for r, folder in enumerate(dirs):
        folder.mkdir(parents=True, exist_ok=True)
        save_config(replica_config(cfg, r), folder / "config.yaml")
        (folder / "examples.json").write_text(json.dumps(manifests[r]) + "\n")
        log = folder / "metrics.jsonl"
        if step > 0 and log.exists():
            rows = [row for row in log.read_text().splitlines() if before_checkpoint(row, step)]
            log.write_text("".join(f"{row}\n" for row in rows))
        if fresh:
            log.unlink(missing_ok=True)
            shutil.rmtree(folder / "final", ignore_errors=True)
            (folder / "summary.json").unlink(missing_ok=True)
    if fresh:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl row; a line cut short by a killed job counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def before_checkpoint(line: str, step: int) -> bool:
    """A metrics.jsonl row logged before the checkpoint of ``step`` was saved: an earlier step, or a train/dev
    row of that step (its test rows come after the last save, at the end of the run, and are logged again)."""
    logged = logged_step(line)
    return logged < step or (logged == step and json.loads(line).get("split") != "test")


def write_rank_facts(model: PrefixSubspaceModel, engine: Engine, out: Path) -> None:
    """``out/ranks/rank-R.json``: what this rank holds (frozen shard, a hash of its simplex), to check sharding."""
    _, frozen, local_bytes = parameter_counts(model)
    digest = hashlib.sha256()
    for name, tensor in sorted(simplex_tensors(model).items()):
        digest.update(name.encode() + tensor.numpy().tobytes())
    facts = {
        "rank": engine.rank,
        "world_size": engine.world_size,
        "frozen_numel": frozen,
        "frozen_local_bytes": local_bytes,
        "dtype": str(model.compute_dtype),
        "simplex_sha256": digest.hexdigest(),
    }
    folder = out / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{engine.rank}.json").write_text(json.dumps(facts) + "\n")
