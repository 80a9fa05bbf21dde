"""What a run writes beside its checkpoints: the resolved configs, the example manifests, the metrics log made
consistent with the checkpoint a run resumes from, and each rank's facts (what it holds, to check sharding)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from dist_subspace.core.config import Config, save_config
from dist_subspace.core.files import write_atomic, write_json
from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.training.assembly import replica_config
from dist_subspace.training.checkpoint import complete_checkpoints, simplex_tensors
from dist_subspace.training.engine import Engine, parameter_counts

# What a run's end writes in each replica folder: a resumed or restarted run must not leave the old ones in place.
RUN_OUTPUTS = ("final", "final_by", "summary.json", "landscape.json", "landscape.png")


def prepare_run_folders(cfg: Config, out: Path, dirs: list[Path], manifests: list[dict], step: int) -> list[str]:
    """Write ``out/config.yaml`` and, per replica folder, its config and ``examples.json``. Resuming at ``step``
    (> 0): what the abandoned trajectory left after it (newer checkpoints, metrics rows logged after it) moves
    aside, see :func:`set_aside_after`. A fresh run (``train.resume=none``, overwrite already checked): clear
    what an earlier run left (metrics, ``final/``, summary, checkpoints). Returns what was moved, for the log."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    fresh = cfg.train.resume == "none"
    moved = set_aside_after(out, dirs, step) if step > 0 else []
    for r, folder in enumerate(dirs):
        folder.mkdir(parents=True, exist_ok=True)
        save_config(replica_config(cfg, r), folder / "config.yaml")
        write_json(folder / "examples.json", manifests[r])
        if fresh:
            (folder / "metrics.jsonl").unlink(missing_ok=True)
            for name in RUN_OUTPUTS:
                path = folder / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if fresh:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return moved


def set_aside_after(out: Path, dirs: list[Path], step: int) -> list[str]:
    """Resuming at ``step``: keep the run's record to that trajectory. Every ``checkpoints/step-M`` with M > step,
    every metrics row logged after ``step``'s checkpoint, and what the run's end wrote (``final/``, ``final_by/``,
    ``summary.json``, the landscape: :data:`RUN_OUTPUTS`), move to ``out/abandoned/after-step-N-TIME/``: kept, not
    deleted, and out of the way of ``resume=auto`` (which would continue the abandoned trajectory), of retention
    (which would delete the new checkpoints as older than the abandoned ones) and of ``evaluate``/``predict`` (which
    would read the abandoned run's ``final/`` while the resumed one has not written its own)."""
    aside = out / "abandoned" / f"after-step-{step}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    later = [c for c in complete_checkpoints(out) if int(c.name[5:]) > step]
    for folder in later:
        aside.mkdir(parents=True, exist_ok=True)
        folder.rename(aside / folder.name)
    outputs = []
    for folder in dirs:
        for name in RUN_OUTPUTS:
            if (folder / name).exists():
                where = aside / (f"{folder.name}.{name}" if folder != out else name)
                where.parent.mkdir(parents=True, exist_ok=True)
                (folder / name).rename(where)
                outputs.append(name if folder == out else f"{folder.name}/{name}")
    dropped = 0
    for folder in dirs:
        log = folder / "metrics.jsonl"
        if not log.exists():
            continue
        rows = log.read_text().splitlines()
        kept = [row for row in rows if before_checkpoint(row, step)]
        if len(kept) == len(rows):
            continue
        where = aside / (f"{folder.name}.metrics.jsonl" if folder != out else "metrics.jsonl")
        aside.mkdir(parents=True, exist_ok=True)
        write_atomic(where, "".join(f"{row}\n" for row in rows if not before_checkpoint(row, step)))
        write_atomic(log, "".join(f"{row}\n" for row in kept))
        dropped += len(rows) - len(kept)
    if not later and not dropped and not outputs:
        return []
    names = ", ".join(c.name for c in later) or "no checkpoint"
    ended = f", the end it wrote ({', '.join(outputs)})" if outputs else ""
    return [f"resuming at step {step}: set aside {names}, {dropped} metrics row(s) logged after it{ended}, in {aside}"]


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
    write_json(folder / f"rank-{engine.rank}.json", facts)
