"""The timed pilot (``study SPEC --pilot``): before a study's cells run, a few real training steps of each (model, task)
of its grid with every seed's replica, timed, and from them the grid's expected hours, unit by unit.

Each pilot run is the grid's own K = 3 run (``k3``, or the first trained method) at the spec's first size, cut to
:data:`PILOT_STEPS` steps with one evaluation (the unit's every selection rule) and a small test set. Its metrics
rows give the seconds of a training step (``examples_per_s`` of the last logged steps: the first step's warm-up
left out) and of one forward of one example at one point (the dev rows' ``seconds`` over examples x points x
replicas); its wall time less those, the start-up (imports, model load). A unit of the full grid then costs

    start-up + steps x step + evaluations x dev examples x (1 + S for a sampled rule) x R x forward
             + test examples x (1 + ensemble S) x R x forward x (rules)

with its own steps (``train.epochs`` over its sample size), dev and test sizes (read from the data, not guessed).
A step of K = 1 or LoRA is taken to cost what K = 3's does (the mixing is a small einsum); the pilot says so.
Writes ``OUT/pilot.json`` and ``OUT/pilot.md``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dist_subspace.core.config import Config, load_config
from dist_subspace.core.files import read_json, write_atomic, write_json
from dist_subspace.study.spec import StudySpec, Unit, as_overrides, plan_units, run_overrides, task_label
from dist_subspace.study.spread import metrics_rows

PILOT_STEPS = 6
PILOT_TEST = 64  # test examples of a pilot run (its rate scales to the grid's test size)
SECONDS = ("startup", "train", "dev", "test", "total")  # a unit's parts, in seconds


def _pilot_unit(spec: StudySpec, units: list[Unit], model: str, task: str) -> Unit | None:
    """The unit a (model, task) pilot times: its K = 3 (else its first) unit at the spec's first size."""
    mine = [u for u in units if u.model == model and u.task == task]
    return next((u for u in mine if u.method == "k3"), mine[0] if mine else None)


def _time_run(run: dict[str, Any], log: Path) -> float:
    """Run one pilot training in a fresh process; its wall seconds (a failure raises with the log's place)."""
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        command = [sys.executable, "-m", "dist_subspace.train", *as_overrides(run)]
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    if code:
        raise RuntimeError(f"the pilot run failed (exit {code}); see {log}")
    return time.perf_counter() - start


def _pilot_cut(spec: StudySpec, unit: Unit, root: Path) -> dict[str, Any]:
    """The overrides of ``unit``'s pilot run: its own (the seeds as replicas), cut to a few steps and one
    evaluation, a small test set, no landscape."""
    (run,) = run_overrides(spec, unit, root / "pilot")  # LoRA units are not piloted
    cut = {
        "train.max_steps": PILOT_STEPS,
        "train.epochs": 0,
        "train.eval_every": PILOT_STEPS,
        "train.eval_every_epochs": 0,
        "train.save_every": 10 * PILOT_STEPS,
        "train.log_every": 2,
        "train.overwrite": True,
        "data.test_size": PILOT_TEST,
        "eval.initial_test": False,
        "eval.landscape": False,
        "eval.test_last": False,
    }
    return {**run, **cut}


def measure(spec: StudySpec, unit: Unit, root: Path, wall: float | None = None) -> dict[str, float]:
    """Time one pilot run of ``unit`` (or read the one that ran, whose ``wall`` seconds are known): seconds per
    step, per forward (one example, one point, one replica), of start-up, and the whole run's."""
    run = _pilot_cut(spec, unit, root)
    folder = Path(run["train.output_dir"])
    if wall is None:
        wall = _time_run(run, folder.parent / f"{folder.name}.pilot.log")
    cfg = load_config(None, as_overrides(run))
    replicas = cfg.simplex.replicas
    rows = metrics_rows(folder if replicas == 1 else folder / "replica-0")
    batch = cfg.train.micro_batch_size * cfg.train.grad_accum * replicas
    step = batch / [r for r in rows if r["split"] == "train"][-1]["examples_per_s"]
    dev = [r for r in rows if r["split"] == "dev"]
    points = [_points(r["mode"]) for r in dev]
    forward = sum(r["seconds"] for r in dev) / sum(r["n"] * p * replicas for r, p in zip(dev, points, strict=True))
    test = [r for r in rows if r["split"] == "test"][-1]["n"] * replicas * test_points(cfg) * forward  # not all logged
    startup = max(0.0, wall - PILOT_STEPS * step - sum(r["seconds"] for r in dev) - test)
    return {"step": step, "forward": forward, "startup": startup, "wall": wall, "replicas": replicas}


def test_points(cfg: Config) -> int:
    """The points a run scores each test example at, in all: per selection rule its mode and each extra mode (an
    ensemble's S), plus the initial centroid and the last step where asked."""
    per_rule = 1 + sum(_points(m) for m in cfg.eval.extra_test_modes)
    return per_rule * len(cfg.eval.selection_rules()) + cfg.eval.initial_test + cfg.eval.test_last


def _points(mode: str) -> int:
    """The points a mode scores per example: ``sampled:S``, ``ensemble:S``, ``models:S`` S; else 1."""
    kind, _, number = mode.partition(":")
    return int(number) if kind in ("sampled", "ensemble", "models") else 1


def unit_seconds(cfg: Config, sizes: tuple[int, int, int], timing: dict[str, float]) -> dict[str, float]:
    """A full unit's expected seconds from ``timing`` (:func:`measure`) and its (train, dev, test) sizes."""
    train, dev, test = sizes
    t = cfg.train
    t.resolve_budget(train, 1)
    evaluations = math.ceil(t.max_steps / t.eval_every)
    replicas, forward = cfg.simplex.replicas, timing["forward"]
    dev_points = sum(_points(rule) for rule in dict.fromkeys([cfg.eval.mode, *cfg.eval.selection_rules()]))
    seconds = {
        "startup": timing["startup"],
        "train": t.max_steps * timing["step"] * replicas / timing["replicas"],
        "dev": evaluations * dev * dev_points * replicas * forward,
        "test": test * test_points(cfg) * replicas * forward,
    }
    return {**seconds, "total": sum(seconds.values()), "steps": t.max_steps, "evaluations": evaluations}


def data_sizes(cfg: Config) -> tuple[int, int, int]:
    """(train, dev, test) examples per replica of a run of ``cfg`` (the data only: nothing loads a model)."""
    from dist_subspace.data.sources import load_splits

    splits = load_splits(**vars(cfg.data))
    return len(splits.train), len(splits.dev), len(splits.test)


def pilot(spec: StudySpec, kinds: dict[str, str], root: Path) -> dict:
    """Time each (model, task) of the grid, then every unit's expected seconds; write ``pilot.json`` and
    ``pilot.md`` under ``root``. Returns the record. A (model, task) already timed (``pilot.json``'s wall and its
    run folder) is read again rather than rerun."""
    units = plan_units(spec, kinds)
    before = read_json(root / "pilot.json")
    walls = {k: t["wall"] for k, t in (before.get("timings", {}) if isinstance(before, dict) else {}).items()}
    timings: dict[str, dict[str, float]] = {}
    for model in spec.models:
        for task in spec.tasks:
            unit = _pilot_unit(spec, units, model, task)
            if unit is None:
                continue
            print(f"[pilot] {model} {task}: {PILOT_STEPS} steps of {unit.method}", flush=True)
            timings[f"{model} {task}"] = measure(spec, unit, root, walls.get(f"{model} {task}"))
            print(f"[pilot] {model} {task}: {json.dumps(timings[f'{model} {task}'])}", flush=True)
            write_json(root / "pilot.json", {"timings": timings}, indent=1)  # a stopped pilot keeps what it timed
    rows, sizes_seen = [], {}
    for unit in units:
        cfg = load_config(None, as_overrides(run_overrides(spec, unit, root)[0]))
        key = (unit.task, unit.size)
        if key not in sizes_seen:
            sizes_seen[key] = data_sizes(cfg)
        runs = 1 if cfg.simplex.replicas > 1 else spec.seeds_for(unit.model)  # LoRA: one run per seed
        cost = unit_seconds(cfg, sizes_seen[key], timings[f"{unit.model} {unit.task}"])
        rows.append({**asdict(unit), **cost, **{k: cost[k] * runs for k in SECONDS}})
    record = {"spec": asdict(spec), "pilot_steps": PILOT_STEPS, "timings": timings, "units": rows}
    record["sizes"] = {task_label(t, s): list(v) for (t, s), v in sizes_seen.items()}
    record["total_hours"] = sum(r["total"] for r in rows) / 3600
    write_json(root / "pilot.json", record, indent=1)
    write_atomic(root / "pilot.md", pilot_markdown(record))
    return record


def pilot_markdown(record: dict) -> str:
    """The pilot as tables: each (model, task)'s measured rates, then the expected hours per model and size."""
    out = ["| model task | step s | forward ms | start-up s |", "|---|---|---|---|"]
    for key, t in record["timings"].items():
        out.append(f"| {key} | {t['step']:.3f} | {1000 * t['forward']:.2f} | {t['startup']:.0f} |")
    hours: dict[tuple[str, str], float] = {}
    for row in record["units"]:
        key = (row["model"], row["size"] or "-")
        hours[key] = hours.get(key, 0.0) + row["total"] / 3600
    out += ["", "| model | size | expected hours |", "|---|---|---|"]
    out += [f"| {m} | {s} | {h:.2f} |" for (m, s), h in hours.items()]
    out += ["", f"**The grid: {record['total_hours']:.1f} hours** ({len(record['units'])} units)", ""]
    return "\n".join(out)
