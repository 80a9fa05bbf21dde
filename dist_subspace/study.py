"""Does the simplex generalise better? ``python -m dist_subspace.study STUDY.yaml [key=value ...]``.

A grid of runs, tasks x models x methods x learning rates x seeds. The seeds of one (task, model, method,
lr) *unit* are the seed replicas of one run (one backbone load, one forward for all seeds; LoRA runs them
apart), so each seed is an ordinary run folder ``OUT/task/model/method/lr-X/replica-r``. Resumable: a finished
unit is kept and skipped, an interrupted one continues from its newest checkpoint. Each method's learning rate
is picked on dev (best mean dev score over seeds), then its test scores are compared with prefix tuning
(K = 1), paired by seed. Writes ``study.json`` (every run's numbers: the table is rebuilt from it without
rerunning anything), ``study.md`` (the table) and ``study.png``; prints one JSON object (``--table``: the table).

    python -m dist_subspace.study configs/study_fewshot.yaml --dry-run    # the cells and an estimated time
    python -m dist_subspace.study configs/study_fewshot.yaml              # run (hours on CPU), then report
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dist_subspace.cli import exit_now, user_error
from dist_subspace.config import ConfigError, build_dataclass, load_config, load_tree
from dist_subspace.files import read_json, write_json

# Each trained method: the run overrides that make it. All share the spec's base overrides and step budget.
METHODS: dict[str, dict[str, Any]] = {
    "k1": {"simplex.vertices": 1},  # prefix tuning
    "k3": {"simplex.vertices": 3},  # the simplex, scored at its centroid
    # The paper's whole method: checkpoint (and learning rate) picked by the sampled dev metric (S draws of a point
    # per example and per layer, the metric averaged over draws), tested at the centroid. S: the spec's `sampled`.
    "k3_sampled": {"simplex.vertices": 3, "eval.select_by": "sampled:{sampled}"},
    "k3_centred": {"simplex.vertices": 3, "simplex.regulariser": "cos2_centred"},
    "k3_head_apart": {"simplex.vertices": 3, "simplex.regularise_head": True},  # encoders: heads kept apart too
    "k1_noise": {"simplex.vertices": 1, "simplex.noise": "match"},  # is it just noise injection?
    "k1_avg_start": {"simplex.vertices": 1, "prefix.init_average": 3},  # is it just the averaged start?
    "lora": {"simplex.vertices": 1, "model.adapter": "lora"},
    "head_only": {"simplex.vertices": 1, "simplex.train_prefix": False},  # encoders: the head alone
}
# Methods read from another method's runs: no training of their own.
DERIVED: dict[str, tuple[str, str]] = {
    "none": ("k3", "test_initial"),  # no training: the initial centroid
    "k3_ensemble": ("k3", "test_final_ensemble"),  # the trained simplex, ensemble of sampled points
    "k3_sampled_ensemble": ("k3_sampled", "test_final_ensemble"),  # the paper's method, tested as ensemble:S
    "k1_last": ("k1", "test_last"),  # controls for selection: the last step's simplex, no dev selection
    "k3_last": ("k3", "test_last"),
}
ENCODER_ONLY = {"head_only", "k3_head_apart"}
BASELINE = "k1"
# Fallback seconds per replica-run when the study has no timing of its own yet (2-core CPU, one thread,
# 16 shots, 40 steps, 1,000 test examples): a first guess for --dry-run, replaced by measured times.
GUESS_SECONDS = {"decoder": 420.0, "encoder": 90.0}


@dataclass
class StudySpec:
    """A study: the grid, the seeds, the learning-rate grids, and overrides shared by every run."""

    output_dir: str = "runs/study"
    tasks: list[str] = field(default_factory=lambda: ["rotten_tomatoes"])
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    methods: list[str] = field(default_factory=lambda: ["none", "k1", "k3", "k3_ensemble"])
    seeds: int = 5
    first_seed: int = 0
    lrs: list[float] = field(default_factory=lambda: [1e-2])
    lora_lrs: list[float] = field(default_factory=lambda: [1e-3])
    ensemble: int = 8  # S of k3_ensemble and k3_sampled_ensemble
    sampled: int = 8  # S of k3_sampled's dev metric
    replicas: bool = True  # seeds as replicas of one run (false: one run per seed, to measure what replicas buy)
    base: dict[str, Any] = field(default_factory=dict)  # run overrides for every cell, e.g. train.max_steps: 40
    # run overrides for one task's cells, over base: a user file's template, or a protocol a task needs
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = [*METHODS, *DERIVED]
        for method in self.methods:
            if method not in known:
                raise ConfigError(f"study method {method!r} is unknown; use some of {known}")
        for method, (source, _) in DERIVED.items():
            if method in self.methods and source not in self.methods:
                raise ConfigError(f"study method {method} is read from {source}'s runs: add {source} to methods")
        for task in self.task_overrides:
            if task not in self.tasks:
                raise ConfigError(f"task_overrides names {task!r}, which is not among tasks {self.tasks}")
        if self.seeds < 1 or not self.lrs or not self.tasks or not self.models:
            raise ConfigError("a study needs seeds >= 1 and at least one task, model and learning rate")


@dataclass(frozen=True)
class Unit:
    """One trained (task, model, method, lr): its seeds are the replicas of one run (or runs apart)."""

    task: str
    model: str
    method: str
    lr: float

    def folder(self, root: Path) -> Path:
        return root / _slug(self.task) / _slug(self.model) / self.method / f"lr-{self.lr:g}"


def _slug(name: str) -> str:
    return name.strip("/").replace("/", "_")


def model_kind(name: str) -> str:
    """``decoder`` or ``encoder``, from the model's config (converting an embedded model once if needed)."""
    from transformers import AutoConfig

    from dist_subspace.arch import arch_spec
    from dist_subspace.embedded import resolve_model

    return arch_spec(AutoConfig.from_pretrained(resolve_model(name))).kind


def plan_units(spec: StudySpec, kinds: dict[str, str]) -> list[Unit]:
    """Every unit to train, in the spec's order (models, tasks, methods, lrs): a model's tasks finish one after the
    other with every method, so the paired comparisons fill in task by task; cheap models can come first."""
    units = []
    for model in spec.models:
        for task in spec.tasks:
            for method in spec.methods:
                if method in DERIVED or (method in ENCODER_ONLY and kinds[model] != "encoder"):
                    continue
                for lr in spec.lora_lrs if method == "lora" else spec.lrs:
                    units.append(Unit(task, model, method, lr))
    return units


def separate_runs(spec: StudySpec, unit: Unit) -> bool:
    """LoRA has no replicas; ``replicas: false`` runs every seed apart."""
    return not spec.replicas or unit.method == "lora"


def as_overrides(run: dict[str, Any]) -> list[str]:
    """``key=value`` words that the trainer reads back as written: every value as JSON (valid YAML), so that a
    string such as a prompt template with braces, a colon or a newline stays a string."""
    return [f"{key}={json.dumps(value)}" for key, value in run.items()]


def run_overrides(spec: StudySpec, unit: Unit, root: Path) -> list[dict[str, Any]]:
    """The overrides of each training run of ``unit`` (one run, or one per seed), as values."""
    method = {k: v.format(sampled=spec.sampled) if isinstance(v, str) else v for k, v in METHODS[unit.method].items()}
    values: dict[str, Any] = {**spec.base, **spec.task_overrides.get(unit.task, {}), **method}
    values.update({"data.task": unit.task, "model.name_or_path": unit.model, "train.lr": unit.lr})
    values.update({"train.progress": False, "eval.initial_test": unit.method == "k3"})
    needed = {field for name, (source, field) in DERIVED.items() if source == unit.method and name in spec.methods}
    if "test_final_ensemble" in needed:
        values["eval.extra_test_modes"] = [f"ensemble:{spec.ensemble}"]
    if "test_last" in needed:
        values["eval.test_last"] = True
    folder = unit.folder(root)
    if separate_runs(spec, unit):
        runs = [
            {**values, "train.seed": spec.first_seed + r, "data.seed": spec.first_seed + r} for r in range(spec.seeds)
        ]
        for r, run in enumerate(runs):
            run["train.output_dir"] = str(folder / f"replica-{r}")
    else:
        runs = [{**values, "train.seed": spec.first_seed, "data.seed": spec.first_seed}]
        runs[0].update({"simplex.replicas": spec.seeds, "train.output_dir": str(folder)})
    return runs


def replica_dirs(spec: StudySpec, unit: Unit, root: Path) -> list[Path]:
    """Each seed's run folder (the unit's folder itself for one seed run as one replica)."""
    folder = unit.folder(root)
    if spec.seeds == 1 and not separate_runs(spec, unit):
        return [folder]
    return [folder / f"replica-{r}" for r in range(spec.seeds)]


def read_summary(folder: Path) -> dict | None:
    """A seed run's ``summary.json`` if it is complete (a finished run's test score), else None."""
    summary = read_json(folder / "summary.json")
    return summary if isinstance(summary, dict) and "test_final" in summary else None


def unit_done(spec: StudySpec, unit: Unit, root: Path) -> bool:
    return all(read_summary(d) is not None for d in replica_dirs(spec, unit, root))


def _train(run: dict[str, Any], log: Path) -> int:
    """One training run in a fresh process (a crash or a leak stays there): continue from its newest
    checkpoint if it has one (after resolving what a killed save left), else start it over."""
    from dist_subspace.checkpoint import latest_checkpoint, recover_interrupted_saves

    out = Path(run["train.output_dir"])
    for done in recover_interrupted_saves(out):  # first: a save killed mid-rename leaves its checkpoint aside
        print(f"[study] {done}", flush=True)
    resume = {"train.resume": "auto"} if latest_checkpoint(out) is not None else {"train.overwrite": True}
    overrides = as_overrides({**run, **resume})
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ python -m dist_subspace.train {' '.join(shlex.quote(o) for o in overrides)}\n")
        f.flush()
        command = [sys.executable, "-m", "dist_subspace.train", *overrides]
        return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode


def collect(spec: StudySpec, units: list[Unit], root: Path) -> list[dict]:
    """Every finished seed's numbers, read back from its run folder."""
    cells = []
    for unit in units:
        if not unit_done(spec, unit, root):
            continue
        timing = read_json(unit.folder(root) / "unit.json")
        seconds = timing.get("seconds") if isinstance(timing, dict) else None
        for r, folder in enumerate(replica_dirs(spec, unit, root)):
            summary = read_summary(folder)
            final = json.loads((folder / "final" / "simplex_config.json").read_text())
            cell = {**asdict(unit), "seed": spec.first_seed + r, "folder": str(folder), "unit_seconds": seconds}
            cell.update(dev=final["dev_score"], test=summary["test_final"], selected_step=summary["selected_step"])
            cell["test_initial"] = summary.get("test_initial")
            cell["test_final_ensemble"] = summary.get(f"test_final_ensemble:{spec.ensemble}")
            cell["test_last"] = summary.get("test_last")
            cell["commit"] = timing.get("commit") if isinstance(timing, dict) else None
            cells.append(cell)
    return cells


def source_commit() -> str | None:
    """The commit of the code that trains (``-dirty`` when its tracked files differ from it); None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "-uno"], capture_output=True, text=True
        )
    except OSError:
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def estimate_seconds(spec: StudySpec, unit: Unit, kind: str, measured: dict[tuple[str, str], float]) -> float:
    """Seconds a unit will take: the mean measured time of this (task, model)'s units so far, else a guess."""
    per_seed = measured.get((unit.task, unit.model), GUESS_SECONDS[kind])
    return per_seed * spec.seeds


def _clock(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def run_study(spec: StudySpec, dry_run: bool = False, stop_after: int | None = None) -> dict:
    """Train every unfinished unit, then report. Returns the report (see :mod:`dist_subspace.study_report`)."""
    from dist_subspace.study_report import report

    root = Path(spec.output_dir)
    kinds = {m: model_kind(m) for m in spec.models}
    units = plan_units(spec, kinds)
    for unit in units:  # every run's config is checked before the first one starts
        for run in run_overrides(spec, unit, root):
            load_config(None, as_overrides(run))
    todo = [u for u in units if not unit_done(spec, u, root)]
    measured: dict[tuple[str, str], list[float]] = {}
    for cell in collect(spec, units, root):
        if cell["unit_seconds"] is not None and cell["seed"] == spec.first_seed:
            measured.setdefault((cell["task"], cell["model"]), []).append(cell["unit_seconds"] / spec.seeds)
    means = {key: sum(v) / len(v) for key, v in measured.items()}
    left = sum(estimate_seconds(spec, u, kinds[u.model], means) for u in todo)
    print(f"[study] {len(units)} units ({len(units) - len(todo)} done), {spec.seeds} seeds each; ~{_clock(left)} left")
    if dry_run:
        for i, unit in enumerate(units, 1):
            state = "done" if unit not in todo else f"~{_clock(estimate_seconds(spec, unit, kinds[unit.model], means))}"
            print(f"[study] {i:3d} {unit.task} {unit.model} {unit.method} lr={unit.lr:g}: {state}")
        return {"units": len(units), "todo": len(todo), "estimated_seconds": left}
    failed = []
    started = time.perf_counter()
    for n, unit in enumerate(todo, 1):
        if stop_after is not None and n > stop_after:
            print(f"[study] stopped after {stop_after} unit(s), as asked; run again to continue", flush=True)
            break
        folder = unit.folder(root)
        name = f"{unit.task} {unit.model} {unit.method} lr={unit.lr:g}"
        print(f"[study] [{n}/{len(todo)}] {name}: training {spec.seeds} seed(s) ...", flush=True)
        clock = time.perf_counter()
        codes = [_train(run, folder / "train.log") for run in run_overrides(spec, unit, root)]
        seconds = time.perf_counter() - clock
        if any(codes):
            failed.append(name)
            print(f"[study] [{n}/{len(todo)}] {name}: FAILED (exit {max(codes)}), see {folder / 'train.log'}")
            continue
        write_json(folder / "unit.json", {"seconds": seconds, "commit": source_commit(), **asdict(unit)})
        tests = [read_summary(d)["test_final"] for d in replica_dirs(spec, unit, root)]
        means[(unit.task, unit.model)] = seconds / spec.seeds  # the newest unit is the best guess for the next
        left = sum(estimate_seconds(spec, u, kinds[u.model], means) for u in todo[n:])
        mean = sum(tests) / len(tests)
        print(
            f"[study] [{n}/{len(todo)}] {name}: {_clock(seconds)}, test {mean:.4f} over {len(tests)} seed(s); "
            f"elapsed {_clock(time.perf_counter() - started)}, ~{_clock(left)} left",
            flush=True,
        )
    result = report(spec, collect(spec, units, root), root, kinds)
    if failed:
        raise RuntimeError(f"{len(failed)} unit(s) failed: {'; '.join(failed)} (their train.log says why)")
    return result


def load_spec(path: str | None, overrides: list[str]) -> StudySpec:
    return build_dataclass(StudySpec, load_tree(path, overrides, what="study"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_subspace.study", description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="a study YAML file (see configs/study_fewshot.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value on the spec, e.g. seeds=2 'methods=[k1,k3]'")
    parser.add_argument("--dry-run", action="store_true", help="print the cells and an estimated time; run nothing")
    parser.add_argument("--table", action="store_true", help="print the table instead of one JSON object")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after training this many units")
    args = parser.parse_intermixed_args(argv)
    try:
        spec = load_spec(args.spec, args.overrides)
        result = run_study(spec, args.dry_run, args.stop_after)
    except (ConfigError, ValueError, OSError, RuntimeError) as err:
        return user_error(err)
    if args.table and "markdown" in result:
        print(result["markdown"])
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "markdown"}))
    return 0


if __name__ == "__main__":
    exit_now(main())
