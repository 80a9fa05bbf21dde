"""Training a study's units and reporting them.

A grid of runs, tasks x models x methods x learning rates x seeds. The seeds of one (task, model, method,
lr) *unit* are the seed replicas of one run (one backbone load, one forward for all seeds; LoRA runs them
apart), so each seed is an ordinary run folder ``OUT/task/model/method/lr-X/replica-r``. Resumable: a finished
unit is kept and skipped, an interrupted one continues from its newest checkpoint, one trained under another spec
is refused (or trained again with ``retrain_changed``). Each method's learning rate
is picked on dev (best mean dev score over seeds), then its test scores are compared with prefix tuning
(K = 1), paired by seed. Writes ``study.json`` (every run's numbers: the table is rebuilt from it without
rerunning anything), ``study.md`` (the table) and ``study.png``; prints one JSON object (``--table``: the table).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from dist_subspace.core.config import ConfigError, load_config
from dist_subspace.core.files import read_json
from dist_subspace.study.fanout import fan_out
from dist_subspace.study.report import report
from dist_subspace.study.spec import (
    VIEWS,
    StudySpec,
    Unit,
    as_overrides,
    plan_units,
    replica_dirs,
    run_overrides,
    task_label,
)
from dist_subspace.study.spread import metrics_rows
from dist_subspace.study.state import (
    archive_units,
    claim,
    config_changes,
    describe_claim,
    read_summary,
    restore_units,
    set_aside,
    unit_done,
)

# Fallback seconds per replica-run when the study has no timing of its own yet (2-core CPU, one thread,
# 16 shots, 40 steps, 1,000 test examples): a first guess for --dry-run, replaced by measured times.
GUESS_SECONDS = {"decoder": 420.0, "encoder": 90.0}


def model_kind(name: str) -> str:
    """``decoder`` or ``encoder``, from the model's config (converting an embedded model once if needed)."""
    from transformers import AutoConfig

    from dist_subspace.core.arch import arch_spec
    from dist_subspace.core.embedded import resolve_model

    return arch_spec(AutoConfig.from_pretrained(resolve_model(name))).kind


def collect(spec: StudySpec, units: list[Unit], root: Path) -> list[dict]:
    """Every finished seed's numbers, read back from its run folder: one cell per (unit, seed), and one more per
    method viewed from it (:data:`~dist_subspace.study.spec.VIEWS`: the same runs' best under another rule). A cell's
    ``task`` is its report column (``TASK@SIZE`` with sizes); ``base_task`` and ``size`` say what it is."""
    cells = []
    for unit in units:
        if not unit_done(spec, unit, root):
            continue
        timing = read_json(unit.folder(root) / "unit.json")
        seconds = timing.get("seconds") if isinstance(timing, dict) else None
        views = {
            view: rule.format(sampled=spec.sampled)
            for view, (source, rule) in VIEWS.items()
            if source == unit.method and view in spec.methods
        }
        for r, folder in enumerate(replica_dirs(spec, unit, root)):
            summary = read_summary(folder)
            final = json.loads((folder / "final" / "simplex_config.json").read_text())
            rows = metrics_rows(folder)
            cell = {**asdict(unit), "seed": spec.first_seed + r, "folder": str(folder), "unit_seconds": seconds}
            cell.update(task=task_label(unit.task, unit.size), base_task=unit.task)
            cell.update(dev=final["dev_score"], test=summary["test_final"], selected_step=summary["selected_step"])
            cell["metric"] = summary.get("metric")  # the task's (recorded since the spread reads its SD)
            cell["select_metric"] = summary.get("select_metric", cell["metric"])  # dev's: a loss is lower-better
            cell["test_initial"] = summary.get("test_initial")
            cell["test_final_ensemble"] = summary.get(f"test_final_ensemble:{spec.ensemble}")
            cell["test_last"] = summary.get("test_last")
            cell["commit"] = timing.get("commit") if isinstance(timing, dict) else None
            # Convergence: the last evaluation's step (a selected step there means dev was still rising) and the
            # train loss at the end.
            cell["last_eval_step"] = max((row["step"] for row in rows if row["split"] == "dev"), default=None)
            cell["final_train_loss"] = next((row["loss"] for row in reversed(rows) if row["split"] == "train"), None)
            cells.append(cell)
            for view, rule in views.items():
                cells.append(
                    {
                        **cell,
                        "method": view,
                        "dev": summary[f"dev@{rule}"],
                        "test": summary[f"test_final@{rule}"],
                        "selected_step": summary[f"selected_step@{rule}"],
                        "test_final_ensemble": summary.get(f"test_final_ensemble:{spec.ensemble}@{rule}"),
                        "test_initial": None,
                        "test_last": None,
                        "selected_by": rule,
                    }
                )
    return cells


def estimate_seconds(spec: StudySpec, unit: Unit, kind: str, measured: dict[tuple[str, str], float]) -> float:
    """Seconds a unit will take: the mean measured time of this (task, model)'s units so far, else a guess."""
    per_seed = measured.get((unit.task, unit.model), GUESS_SECONDS[kind])
    return per_seed * spec.seeds_for(unit.model)


def _clock(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class StudyFailed(RuntimeError):
    """Some units failed or are claimed by another process; the report holds the others."""


def check_unchanged(spec: StudySpec, units: list[Unit], root: Path, retrain: bool) -> list[str]:
    """Refuse units trained under configs this spec no longer gives them (a changed ``base``, say), naming the first
    change; with ``retrain`` move their folders aside instead, to train them again. Returns what was moved."""
    changed = {unit: changes for unit in units if (changes := config_changes(spec, unit, root))}
    if changed and not retrain:
        unit, changes = next(iter(changed.items()))
        raise ConfigError(
            f"{len(changed)} unit(s) in {root} were trained under another spec, e.g. {_name(unit)}: "
            f"{'; '.join(changes[:3])}; rerun with the spec they were trained with, use a new output_dir, or pass "
            "--retrain-changed to move them aside and train them again"
        )
    moved = []
    for unit, changes in changed.items():
        with claim(unit.folder(root)) as held:
            if held is None:
                raise ConfigError(f"{_name(unit)} is training now ({describe_claim(unit.folder(root))}): not moved")
            moved.append(f"{_name(unit)}: {'; '.join(changes[:3])} -> moved to {set_aside(unit, root)}")
    return moved


def _name(unit: Unit) -> str:
    return f"{task_label(unit.task, unit.size)} {unit.model} {unit.method} lr={unit.lr:g}"


def run_study(
    spec: StudySpec,
    dry_run: bool = False,
    stop_after: int | None = None,
    workers: int = 1,
    launcher: str = "local",
    retrain_changed: bool = False,
    archive: Path | None = None,
) -> dict:
    """Train every unfinished unit (``workers`` at once, through ``launcher``: :mod:`dist_subspace.study.fanout`),
    then report. Returns the report (see :mod:`dist_subspace.study.report`); raises :class:`StudyFailed` after
    writing it when a unit failed or another process holds one. ``archive``: a folder that keeps every finished
    unit's summaries, metrics and configs (small, committable): units missing here are taken back from it first,
    and it is brought up to date after each unit, so a study survives a machine that loses its runs/."""
    root = Path(spec.output_dir)
    kinds = {m: model_kind(m) for m in spec.models}
    units = plan_units(spec, kinds)
    if archive is not None and (restored := restore_units(spec, units, root, archive)):
        print(f"[study] {restored} finished unit(s) taken back from {archive}", flush=True)
    for unit in units:  # every run's config is checked before the first one starts
        for run in run_overrides(spec, unit, root):
            load_config(None, as_overrides(run))
    if not dry_run:
        for moved in check_unchanged(spec, units, root, retrain_changed):
            print(f"[study] trained under another spec: {moved}", flush=True)
    todo = [u for u in units if not unit_done(spec, u, root)]
    measured: dict[tuple[str, str], list[float]] = {}
    for cell in collect(spec, units, root):
        if cell["unit_seconds"] is not None and cell["seed"] == spec.first_seed and cell["method"] not in VIEWS:
            seeds = spec.seeds_for(cell["model"])
            measured.setdefault((cell["base_task"], cell["model"]), []).append(cell["unit_seconds"] / seeds)
    means = {key: sum(v) / len(v) for key, v in measured.items()}
    left = sum(estimate_seconds(spec, u, kinds[u.model], means) for u in todo) / min(workers, max(len(todo), 1))
    print(f"[study] {len(units)} units ({len(units) - len(todo)} done); ~{_clock(left)} left")
    if dry_run:
        for i, unit in enumerate(units, 1):
            state = "done" if unit not in todo else f"~{_clock(estimate_seconds(spec, unit, kinds[unit.model], means))}"
            print(f"[study] {i:3d} {_name(unit)}: {state}")
        return {"units": len(units), "todo": len(todo), "estimated_seconds": left}
    batch = todo if stop_after is None else todo[:stop_after]
    print(f"[study] training {len(batch)} unit(s) through {launcher}, {workers} at a time", flush=True)
    problems, started = [], time.perf_counter()
    for n, done in enumerate(fan_out(spec, batch, root, workers, launcher), 1):
        unit, seconds, status = done["unit"], done["seconds"], done["status"]
        if status in ("failed", "claimed"):
            problems.append(f"{_name(unit)}: {status.upper()} ({done['error']})")
            print(f"[study] [{n}/{len(batch)}] {problems[-1]}", flush=True)
            continue
        if status == "done":
            print(f"[study] [{n}/{len(batch)}] {_name(unit)}: finished by another process", flush=True)
            continue
        if archive is not None:
            archive_units(spec, [unit], root, archive)
        tests = [read_summary(d)["test_final"] for d in replica_dirs(spec, unit, root)]
        means[(unit.task, unit.model)] = seconds / spec.seeds_for(unit.model)  # the newest is the best guess
        left = sum(estimate_seconds(spec, u, kinds[u.model], means) for u in batch[n:]) / workers
        print(
            f"[study] [{n}/{len(batch)}] {_name(unit)}: {_clock(seconds)}, test {sum(tests) / len(tests):.4f} over "
            f"{len(tests)} seed(s); elapsed {_clock(time.perf_counter() - started)}, ~{_clock(left)} left",
            flush=True,
        )
    if len(batch) < len(todo):
        print(f"[study] stopped after {stop_after} unit(s), as asked; run again to continue", flush=True)
    result = report(spec, collect(spec, units, root), root, kinds, problems)
    if problems:
        raise StudyFailed(f"{len(problems)} unit(s) not trained: {'; '.join(problems)}")
    return result
