"""The study's grid: its spec (tasks x sample sizes x models x methods x learning rates x seeds), the methods as run
overrides, the units to train and each unit's runs. Plain data: imports only the config parser."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_subspace.core.config import ConfigError, build_dataclass, load_tree

# Each trained method: the run overrides that make it. All share the spec's base overrides and step budget.
METHODS: dict[str, dict[str, Any]] = {
    "k1": {"simplex.vertices": 1},  # prefix tuning
    "k3": {"simplex.vertices": 3},  # the simplex, scored at its centroid
    "k3_centred": {"simplex.vertices": 3, "simplex.regulariser": "cos2_centred"},
    "k3_beta0": {"simplex.vertices": 3, "simplex.beta": 0.0},  # no regulariser: do the vertices part anyway?
    "k3_beta10": {"simplex.vertices": 3, "simplex.beta": 10.0},  # ten times the push apart
    "k3_head_apart": {"simplex.vertices": 3, "simplex.regularise_head": True},  # encoders: heads kept apart too
    "k1_noise": {"simplex.vertices": 1, "simplex.noise": "match"},  # is it just noise injection?
    "k1_avg_start": {"simplex.vertices": 1, "prefix.init_average": 3},  # is it just the averaged start?
    "lora": {"simplex.vertices": 1, "model.adapter": "lora"},
    "head_only": {"simplex.vertices": 1, "simplex.train_prefix": False},  # encoders: the head alone
}
# Methods read from another method's runs under another selection rule: no training of their own, the source's units
# keep that rule's best too (eval.also_select_by), so both rules are read from one training.
VIEWS: dict[str, tuple[str, str]] = {
    # The paper's whole method: checkpoint (and learning rate) picked by the sampled dev metric (S draws of a point
    # per example and per layer, the metric averaged over draws), tested at the centroid. S: the spec's `sampled`.
    "k3_sampled": ("k3", "sampled:{sampled}"),
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
    # sample sizes: name -> run overrides (e.g. n100: {data.protocol: stratified, data.train_size: 100}); each task
    # runs at every size, reported as TASK@SIZE; empty: one size, the base's
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_seeds: dict[str, int] = field(default_factory=dict)  # fewer seeds for a slow model (default: seeds)
    model_tasks: dict[str, list[str]] = field(default_factory=dict)  # a model runs only these tasks
    method_models: dict[str, list[str]] = field(default_factory=dict)  # a method runs only on these models
    size_models: dict[str, list[str]] = field(default_factory=dict)  # a size runs only these models
    size_tasks: dict[str, list[str]] = field(default_factory=dict)  # a size runs only these tasks
    base: dict[str, Any] = field(default_factory=dict)  # run overrides for every cell, e.g. train.max_steps: 40
    # run overrides for one task's cells (TASK, or TASK@SIZE for one size), over base and the size's
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # how each training run starts: "{python} -m" (one process), or a launcher such as [torchrun, --nproc_per_node,
    # "8", -m] or [deepspeed, --num_gpus, "8", --module] for a multi-GPU unit
    train_command: list[str] = field(default_factory=lambda: ["{python}", "-m"])
    slurm: dict[str, Any] = field(default_factory=dict)  # submitit parameters, e.g. timeout_min, slurm_partition

    def __post_init__(self) -> None:
        known = [*METHODS, *VIEWS, *DERIVED]
        for method in self.methods:
            if method not in known:
                raise ConfigError(f"study method {method!r} is unknown; use some of {known}")
        for method, (source, _) in [*DERIVED.items(), *VIEWS.items()]:
            if method in self.methods and source not in self.methods:
                raise ConfigError(f"study method {method} is read from {source}'s runs: add {source} to methods")
        for key in self.task_overrides:
            task, _, size = key.partition("@")
            if task not in self.tasks or (size and size not in self.sizes):
                raise ConfigError(f"task_overrides names {key!r}: use a task of {self.tasks}, or TASK@SIZE")
        for key, names, among in (
            ("model_seeds", self.model_seeds, self.models),
            ("model_tasks", self.model_tasks, self.models),
            ("method_models", self.method_models, self.methods),
        ):
            for name in names:
                if name not in among:
                    raise ConfigError(f"{key} names {name!r}, which is not among {among}")
        for model, tasks in self.model_tasks.items():
            if not set(tasks) <= set(self.tasks):
                raise ConfigError(f"model_tasks[{model}] names {sorted(set(tasks) - set(self.tasks))}, not among tasks")
        for key, limits, among in (
            ("method_models", self.method_models, self.models),
            ("size_models", self.size_models, self.models),
            ("size_tasks", self.size_tasks, self.tasks),
        ):
            for name, values in limits.items():
                if key.startswith("size") and name not in self.sizes:
                    raise ConfigError(f"{key} names {name!r}, which is not among sizes {list(self.sizes)}")
                if not set(values) <= set(among):
                    raise ConfigError(f"{key}[{name}] names {sorted(set(values) - set(among))}, not among {among}")
        if any(n < 1 for n in self.model_seeds.values()):
            raise ConfigError("model_seeds must be >= 1 for every model")
        if self.seeds < 1 or not self.lrs or not self.tasks or not self.models:
            raise ConfigError("a study needs seeds >= 1 and at least one task, model and learning rate")
        for key in ("tasks", "models", "methods"):
            _refuse_repeats(key, [_slug(v) if key != "methods" else v for v in getattr(self, key)])
        _refuse_repeats("sizes", [_slug(v) for v in self.sizes])
        for key in ("lrs", "lora_lrs"):  # a rate names its folder (lr-0.01): two that print alike are one unit
            _refuse_repeats(key, [f"{lr:g}" for lr in getattr(self, key)])

    def seeds_for(self, model: str) -> int:
        """How many seeds ``model`` runs (``model_seeds``, else ``seeds``)."""
        return self.model_seeds.get(model, self.seeds)

    def task_labels(self) -> list[str]:
        """The report's task columns: each task, at each size (``TASK@SIZE``) when the spec has sizes."""
        return [task_label(t, s) for t in self.tasks for s in (self.sizes or [""])]

    def runs_on(self, model: str, task: str, method: str, size: str = "") -> bool:
        """Whether ``method`` runs ``task`` at ``size`` on ``model`` (``model_tasks``, ``method_models``,
        ``size_models``, ``size_tasks``; a derived or viewed method where its source does)."""
        source = {**{m: s for m, (s, _) in DERIVED.items()}, **{m: s for m, (s, _) in VIEWS.items()}}.get(method)
        if source is not None and not self.runs_on(model, task, source, size):
            return False
        sized = model in self.size_models.get(size, [model]) and task in self.size_tasks.get(size, [task])
        return (
            sized and task in self.model_tasks.get(model, [task]) and model in self.method_models.get(method, [model])
        )


def task_label(task: str, size: str) -> str:
    """``TASK@SIZE`` (``TASK`` for the one size of a spec without sizes)."""
    return f"{task}@{size}" if size else task


def _refuse_repeats(key: str, names: list[str]) -> None:
    """Two grid entries that name one unit folder would train it twice at once and count its cells twice."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"study {key} names {name!r} twice (one unit folder); list each {key[:-1]} once")
        seen.add(name)


@dataclass(frozen=True)
class Unit:
    """One trained (task, model, method, lr): its seeds are the replicas of one run (or runs apart)."""

    task: str
    model: str
    method: str
    lr: float
    size: str = ""  # a sample size of the spec's sizes ("": the base's)

    def folder(self, root: Path) -> Path:
        task = root / _slug(self.task) / _slug(self.size) if self.size else root / _slug(self.task)
        return task / _slug(self.model) / self.method / f"lr-{self.lr:g}"


def _slug(name: str) -> str:
    return name.strip("/").replace("/", "_")


def plan_units(spec: StudySpec, kinds: dict[str, str]) -> list[Unit]:
    """Every unit to train, in the spec's order: sizes, then models, tasks, methods, rates. Every model and task
    finishes the first (smallest) size before the next begins, and a model's tasks one after the other with every
    method, so the paired comparisons fill in size by size and task by task; cheap models can come first."""
    units = []
    for size in spec.sizes or [""]:
        for model in spec.models:
            for task in spec.tasks:
                for method in spec.methods:
                    trained = method not in DERIVED and method not in VIEWS
                    if not trained or (method in ENCODER_ONLY and kinds[model] != "encoder"):
                        continue
                    if not spec.runs_on(model, task, method, size):
                        continue
                    for lr in spec.lora_lrs if method == "lora" else spec.lrs:
                        units.append(Unit(task, model, method, lr, size))
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
    method = METHODS[unit.method]
    task = {**spec.task_overrides.get(unit.task, {}), **spec.task_overrides.get(task_label(unit.task, unit.size), {})}
    values: dict[str, Any] = {**spec.base, **spec.sizes.get(unit.size, {}), **task, **method}
    viewed = {v: rule.format(sampled=spec.sampled) for v, (source, rule) in VIEWS.items() if source == unit.method}
    viewed = {view: rule for view, rule in viewed.items() if view in spec.methods}
    if viewed:  # the viewed methods' rules keep their own best in this unit's runs
        values["eval.also_select_by"] = list(viewed.values())
    values.update({"data.task": unit.task, "model.name_or_path": unit.model, "train.lr": unit.lr})
    values.update({"train.progress": False, "eval.initial_test": unit.method == "k3"})
    needed = {f for name, (source, f) in DERIVED.items() if source in {unit.method, *viewed} and name in spec.methods}
    if "test_final_ensemble" in needed:
        values["eval.extra_test_modes"] = [f"ensemble:{spec.ensemble}"]
    if "test_last" in needed:
        values["eval.test_last"] = True
    folder = unit.folder(root)
    if separate_runs(spec, unit):
        runs = [
            {**values, "train.seed": spec.first_seed + r, "data.seed": spec.first_seed + r}
            for r in range(spec.seeds_for(unit.model))
        ]
        for r, run in enumerate(runs):
            run["train.output_dir"] = str(folder / f"replica-{r}")
    else:
        runs = [{**values, "train.seed": spec.first_seed, "data.seed": spec.first_seed}]
        runs[0].update({"simplex.replicas": spec.seeds_for(unit.model), "train.output_dir": str(folder)})
    return runs


def replica_dirs(spec: StudySpec, unit: Unit, root: Path) -> list[Path]:
    """Each seed's run folder (the unit's folder itself for one seed run as one replica)."""
    folder = unit.folder(root)
    if spec.seeds_for(unit.model) == 1 and not separate_runs(spec, unit):
        return [folder]
    return [folder / f"replica-{r}" for r in range(spec.seeds_for(unit.model))]


def load_spec(path: str | None, overrides: list[str]) -> StudySpec:
    return build_dataclass(StudySpec, load_tree(path, overrides, what="study"))
