"""Where a study's units train: one after the other in this process's shell, ``--workers N`` at once on this
machine (the cores split between them), or one job each on a cluster through submitit (``--launcher slurm``; its
local executor, ``submitit-local``, runs the same jobs as processes here). Whichever ran them, a unit is claimed
while it trains (no second process trains it at once), its runs resume from their checkpoints and are never
started over on top of what they saved, a finished unit writes ``unit.json``, and the report reads the run folders
alone. A unit that fails (a non-zero exit, a job killed at its time limit, preempted or out of memory) is reported
as failed; the others go on.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dist_subspace.core.files import write_json
from dist_subspace.core.paths import CHECKOUT
from dist_subspace.study.spec import StudySpec, Unit, as_overrides, run_overrides
from dist_subspace.study.state import claim, describe_claim, record_configs, unit_done

LAUNCHERS = ("local", "slurm", "submitit-local")
# submitit's own default time limit is 5 minutes, which kills any real unit: 12 hours unless the spec's slurm: says
# otherwise (a unit that hits it resumes from its last checkpoint when the study runs again).
SLURM_DEFAULTS = {"timeout_min": 720}


def source_commit() -> str | None:
    """The commit of the code that trains (``-dirty`` when its tracked files differ from it); None outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(CHECKOUT), "status", "--porcelain", "-uno"], capture_output=True, text=True
        )
    except OSError:
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _train(spec: StudySpec, run: dict[str, Any], log: Path, env: dict[str, str], claim_fd: int) -> int:
    """One training run in a fresh process (a crash or a leak stays there), started with the spec's
    ``train_command`` (``python -m``, or a launcher such as ``torchrun --nproc_per_node 8 -m``): continue from its
    newest checkpoint if it has one (after resolving what a killed save left), else start it, where nothing was
    saved yet. A run with a ``final/`` but no checkpoint to continue from is not started over (exit 1). The process
    inherits ``claim_fd``, the unit's claim: killed, the study leaves its training still holding the unit."""
    from dist_subspace.training.checkpoint import latest_checkpoint, recover_interrupted_saves

    out = Path(run["train.output_dir"])
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        for done in recover_interrupted_saves(out):  # first: a save killed mid-rename leaves its checkpoint aside
            f.write(f"[study] {done}\n")
        if latest_checkpoint(out) is not None:
            start = {"train.resume": "auto"}
        elif (out / "final").exists() or (out / "replica-0" / "final").exists():
            f.write(f"[study] {out} holds a final/ but no checkpoint to resume from: not started over; move it aside\n")
            return 1
        else:
            start = {}  # nothing saved: a fresh start clears what a killed attempt logged
        launcher = [sys.executable if word == "{python}" else word for word in spec.train_command]
        command = [*launcher, "dist_subspace.train", *as_overrides({**run, **start})]
        f.write(f"\n$ {' '.join(shlex.quote(word) for word in command)}\n")
        f.flush()
        return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, pass_fds=(claim_fd,)).returncode


def train_unit(spec: StudySpec, unit: Unit, root: Path, threads: int | None = None) -> dict[str, Any]:
    """Claim ``unit`` and train every run of it (``threads`` CPU threads each, when given); when all succeed, write
    its ``unit.json`` (seconds, the commit that ran it). Returns ``unit``, ``seconds``, each run's exit ``codes``
    and ``status``: ``trained``, ``failed`` (with ``error``), ``claimed`` (another live process trains it: nothing
    done here) or ``done`` (finished by another process meanwhile)."""
    env = os.environ.copy()
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    folder = unit.folder(root)
    clock = time.perf_counter()
    with claim(folder) as held:
        if held is None:
            return outcome(unit, "claimed", error=f"claimed by {describe_claim(folder)}")
        if unit_done(spec, unit, root):  # a duplicate job, queued while another trained it
            return outcome(unit, "done")
        record_configs(spec, unit, root)
        codes = [_train(spec, run, folder / "train.log", env, held) for run in run_overrides(spec, unit, root)]
        seconds = time.perf_counter() - clock
        if any(codes):
            return outcome(unit, "failed", seconds, codes, f"exit {max(codes)}, see {folder / 'train.log'}")
        write_json(folder / "unit.json", {"seconds": seconds, "commit": source_commit(), **asdict(unit)})
        return outcome(unit, "trained", seconds, codes)


def outcome(
    unit: Unit, status: str, seconds: float = 0.0, codes: list[int] | None = None, error: str | None = None
) -> dict[str, Any]:
    """What became of a unit (see :func:`train_unit`)."""
    return {"unit": unit, "status": status, "seconds": seconds, "codes": codes or [], "error": error}


def _failure(unit: Unit, err: BaseException, where: str = "") -> dict[str, Any]:
    """A unit whose training raised, or whose job ended without a result (killed, preempted, out of memory)."""
    lines = str(err).strip().splitlines()
    return outcome(unit, "failed", error=f"{type(err).__name__}: {lines[-1] if lines else ''}{where}")


def fan_out(spec: StudySpec, units: list[Unit], root: Path, workers: int, launcher: str) -> Iterator[dict[str, Any]]:
    """Train ``units``, yielding :func:`train_unit`'s outcome as each ends (in the order they end); a unit whose
    thread or job raised is yielded as ``failed``, and the others go on."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher {launcher!r} is unknown; use one of {', '.join(LAUNCHERS)}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1 (got {workers})")
    threads = max(1, (os.cpu_count() or 1) // min(workers, max(len(units), 1))) if workers > 1 else None
    if launcher == "local":
        with ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(train_unit, spec, u, root, threads): u for u in units}
            for future in as_completed(futures):
                try:
                    yield future.result()
                except Exception as err:  # e.g. the unit's folder cannot be written: this unit fails, not the study
                    yield _failure(futures[future], err)
        return
    try:
        import submitit
        from submitit.helpers import as_completed as jobs_completed
    except ImportError:
        raise ValueError(f"--launcher {launcher} needs submitit: pip install 'dist_subspace[cluster]'") from None

    cluster = "local" if launcher == "submitit-local" else "slurm"
    executor = submitit.AutoExecutor(folder=root / "submitit", cluster=cluster)
    executor.update_parameters(name="dist_subspace_study", **{**SLURM_DEFAULTS, **spec.slurm})
    n = len(units)
    jobs = executor.map_array(train_unit, [spec] * n, units, [root] * n, [threads if cluster == "local" else None] * n)
    unit_of = {job.job_id: unit for job, unit in zip(jobs, units, strict=True)}
    for job in jobs_completed(jobs, poll_frequency=2 if cluster == "local" else 30):
        try:
            yield job.result()
        except Exception as err:  # UncompletedJobError (time limit, preemption, memory) or FailedJobError
            yield _failure(unit_of[job.job_id], err, f" (job {job.job_id}, its log: {job.paths.stderr})")
