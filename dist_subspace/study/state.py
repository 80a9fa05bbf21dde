"""A unit's state on disk, which every launcher and every rerun read the same way: is it finished, who is training
it now (a claim), and under which configs its runs were trained.

- **Finished**: every seed's ``summary.json`` holds a test score.
- **Claimed**: a process training a unit holds an exclusive ``flock`` on ``UNIT/.claim.lock`` for as long as it
  lives (the kernel drops it when the process dies: a job killed by SLURM leaves no stale claim), and writes who
  it is in ``UNIT/claim.json``. Each training process it starts inherits the lock's file, so the claim lasts as long
  as the last of them: a study killed alone leaves its running training holding the unit. A second process (a
  rerun, a duplicate job) that finds the lock held trains nothing there.
- **Recorded configs**: ``UNIT/unit-config.json``, each run's resolved config, written when the unit starts. A rerun
  whose spec resolves to other configs is refused (or, when asked, the unit's folder moves aside and it trains
  again): a changed study never mixes cells trained under two specs.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dist_subspace.core.config import load_config
from dist_subspace.core.files import read_json, write_json
from dist_subspace.study.spec import StudySpec, Unit, as_overrides, replica_dirs, run_overrides

CLAIM_LOCK, CLAIM, CONFIGS = ".claim.lock", "claim.json", "unit-config.json"
# Where and how a run starts, not what it is: the unit's place, and what the fan-out sets per attempt.
NOT_COMPARED = ("train.output_dir", "train.resume", "train.overwrite")


def read_summary(folder: Path) -> dict | None:
    """A seed run's ``summary.json`` if it is complete (a finished run's test score), else None."""
    summary = read_json(folder / "summary.json")
    return summary if isinstance(summary, dict) and "test_final" in summary else None


def unit_done(spec: StudySpec, unit: Unit, root: Path) -> bool:
    return all(read_summary(d) is not None for d in replica_dirs(spec, unit, root))


# ---- claims --------------------------------------------------------------------------------------
def claimant() -> dict[str, Any]:
    """Who this process is: host, pid, the SLURM job (array task) it runs in, if any, and since when."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job, "since": time.time()}


def describe_claim(folder: Path) -> str:
    """The holder of ``folder``'s claim, in words (as its ``claim.json`` says)."""
    who = read_json(folder / CLAIM)
    if not isinstance(who, dict):
        return "another process"
    job = f", SLURM job {who['slurm_job']}" if who.get("slurm_job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who.get("since", 0)))
    return f"pid {who.get('pid')} on {who.get('host')}{job}, since {since}"


@contextmanager
def claim(folder: Path) -> Iterator[int | None]:
    """Hold ``folder``'s claim for the block: yields the locked file's descriptor (hand it to each process that
    trains the unit: ``subprocess.run(..., pass_fds=(fd,))``, and the lock lives until they too have ended), or None
    (holding nothing) when a live process holds it. The lock is per open file, so two threads of one process exclude
    each other too."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / CLAIM_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        write_json(folder / CLAIM, claimant())
        try:
            yield fd
        finally:
            (folder / CLAIM).unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock


# ---- recorded configs ----------------------------------------------------------------------------
def _flat(tree: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, keys in tree.items() for key, value in keys.items()}


def resolved_configs(spec: StudySpec, unit: Unit, root: Path) -> list[dict[str, Any]]:
    """Each run's resolved config (every key, defaults included) as ``section.key -> value``."""
    configs = []
    for run in run_overrides(spec, unit, root):
        flat = _flat(load_config(None, as_overrides(run)).to_dict())
        configs.append({k: v for k, v in flat.items() if k not in NOT_COMPARED})
    return configs


def record_configs(spec: StudySpec, unit: Unit, root: Path) -> None:
    """Write ``UNIT/unit-config.json`` (before the unit's first run starts)."""
    write_json(unit.folder(root) / CONFIGS, {"runs": resolved_configs(spec, unit, root)}, indent=1)


def config_changes(spec: StudySpec, unit: Unit, root: Path) -> list[str]:
    """How the configs this spec gives ``unit`` differ from those it was trained under (``key: old -> new``);
    empty when they agree or nothing was recorded. A key the recording code did not have yet counts as its
    default then (the behaviour that run had)."""
    record = read_json(unit.folder(root) / CONFIGS)
    if not isinstance(record, dict) or not isinstance(record.get("runs"), list):
        return []
    defaults = _flat(load_config(None, []).to_dict())
    now = resolved_configs(spec, unit, root)
    if len(now) != len(record["runs"]):
        return [f"runs: {len(record['runs'])} -> {len(now)}"]
    changes = []
    for old, new in zip(record["runs"], now, strict=True):
        for key, value in new.items():
            before = old.get(key, defaults.get(key))
            if before != value and f"{key}: {before!r} -> {value!r}" not in changes:
                changes.append(f"{key}: {before!r} -> {value!r}")
    return changes


def set_aside(unit: Unit, root: Path) -> Path:
    """Move ``unit``'s folder to ``ROOT/replaced/TIME/...`` (kept, out of the study's way); returns where."""
    folder = unit.folder(root)
    where = root / "replaced" / time.strftime("%Y%m%d-%H%M%S", time.gmtime()) / folder.relative_to(root)
    where.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(where)
    return where


# ---- an archive of finished units ----------------------------------------------------------------
# What the report reads of a finished unit, small enough to commit: its summaries, metrics, configs and manifests,
# without any weights (a restored unit is reported, not evaluated again).
ARCHIVED = ("unit.json", CONFIGS)
ARCHIVED_PER_RUN = ("summary.json", "config.yaml", "metrics.jsonl", "examples.json", "final/simplex_config.json")


def _archived_files(spec: StudySpec, unit: Unit, root: Path) -> list[Path]:
    folder = unit.folder(root)
    files = [folder / name for name in ARCHIVED]
    for run in replica_dirs(spec, unit, root):
        files += [run / name for name in ARCHIVED_PER_RUN]
        files += sorted(run.glob("final_by/*/simplex_config.json"))
    return [f for f in files if f.is_file()]


def archive_units(spec: StudySpec, units: list[Unit], root: Path, archive: Path) -> int:
    """Copy every finished unit's :data:`ARCHIVED` files from ``root`` into ``archive`` (the same tree); returns
    how many units were archived."""
    count = 0
    for unit in units:
        if not unit_done(spec, unit, root):
            continue
        for file in _archived_files(spec, unit, root):
            target = archive / file.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
        count += 1
    return count


def restore_units(spec: StudySpec, units: list[Unit], root: Path, archive: Path) -> int:
    """Copy back from ``archive`` every unit finished there whose folder ``root`` lacks (a new machine's empty
    runs/); a unit present in ``root`` is left as it is. Returns how many units were restored."""
    count = 0
    for unit in units:
        if unit.folder(root).exists() or not unit_done(spec, unit, archive):
            continue
        for file in _archived_files(spec, unit, archive):
            target = root / file.relative_to(archive)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
        count += 1
    return count
