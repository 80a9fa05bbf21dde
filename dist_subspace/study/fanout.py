"""Where a study's units train: one after the other in this process's shell, ``--workers N`` at once on this
machine (the cores split between them), or one job each on a cluster through submitit (``--launcher slurm``; its
local executor, ``submitit-local``, runs the same jobs as processes here). Whichever ran them, a unit's runs resume
from their checkpoints, a finished unit writes ``unit.json``, and the report reads the run folders alone."""

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

LAUNCHERS = ("local", "slurm", "submitit-local")


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


def _train(spec: StudySpec, run: dict[str, Any], log: Path, env: dict[str, str]) -> int:
    """One training run in a fresh process (a crash or a leak stays there), started with the spec's
    ``train_command`` (``python -m``, or a launcher such as ``torchrun --nproc_per_node 8 -m``): continue from its
    newest checkpoint if it has one (after resolving what a killed save left), else start it over."""
    from dist_subspace.training.checkpoint import latest_checkpoint, recover_interrupted_saves

    out = Path(run["train.output_dir"])
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        for done in recover_interrupted_saves(out):  # first: a save killed mid-rename leaves its checkpoint aside
            f.write(f"[study] {done}\n")
        resume = {"train.resume": "auto"} if latest_checkpoint(out) is not None else {"train.overwrite": True}
        launcher = [sys.executable if word == "{python}" else word for word in spec.train_command]
        command = [*launcher, "dist_subspace.train", *as_overrides({**run, **resume})]
        f.write(f"\n$ {' '.join(shlex.quote(word) for word in command)}\n")
        f.flush()
        return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def train_unit(spec: StudySpec, unit: Unit, root: Path, threads: int | None = None) -> dict[str, Any]:
    """Train every run of ``unit`` (``threads`` CPU threads each, when given); when all succeed, write its
    ``unit.json`` (seconds, the commit that ran it). Returns ``unit``, ``seconds`` and each run's exit ``codes``."""
    env = os.environ.copy()
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    folder = unit.folder(root)
    clock = time.perf_counter()
    codes = [_train(spec, run, folder / "train.log", env) for run in run_overrides(spec, unit, root)]
    seconds = time.perf_counter() - clock
    if not any(codes):
        write_json(folder / "unit.json", {"seconds": seconds, "commit": source_commit(), **asdict(unit)})
    return {"unit": unit, "seconds": seconds, "codes": codes}


def fan_out(spec: StudySpec, units: list[Unit], root: Path, workers: int, launcher: str) -> Iterator[dict[str, Any]]:
    """Train ``units``, yielding :func:`train_unit`'s result as each finishes (in the order they finish)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher {launcher!r} is unknown; use one of {', '.join(LAUNCHERS)}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1 (got {workers})")
    threads = max(1, (os.cpu_count() or 1) // min(workers, max(len(units), 1))) if workers > 1 else None
    if launcher == "local":
        with ThreadPoolExecutor(workers) as pool:
            for future in as_completed([pool.submit(train_unit, spec, u, root, threads) for u in units]):
                yield future.result()
        return
    try:
        import submitit
        from submitit.helpers import as_completed as jobs_completed
    except ImportError:
        raise ValueError(f"--launcher {launcher} needs submitit: pip install 'dist_subspace[cluster]'") from None

    cluster = "local" if launcher == "submitit-local" else "slurm"
    executor = submitit.AutoExecutor(folder=root / "submitit", cluster=cluster)
    executor.update_parameters(name="dist_subspace_study", **spec.slurm)
    n = len(units)
    jobs = executor.map_array(train_unit, [spec] * n, units, [root] * n, [threads if cluster == "local" else None] * n)
    for job in jobs_completed(jobs, poll_frequency=2 if cluster == "local" else 30):
        yield job.result()
