"""Typed run configuration: dataclasses, YAML files, dotted ``key=value`` overrides.

Unknown keys and wrong types are rejected by name with a hint; every check that can run before a model is
loaded runs here (``__post_init__``), so a bad run fails in a second, not after loading 70B parameters.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_subspace.core.files import write_atomic
from dist_subspace.core.parsing import ConfigError, build_dataclass, load_tree
from dist_subspace.core.simplex import GRANULARITIES, REGULARISERS

# A generation task's main metric, of decoded text against the reference (data.metric); data/tasks.py reads it here.
GENERATION_METRICS = ("rougeL", "bleu", "chrf", "exact_match")


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m"  # an embedded alias (smollm2-135m, minilm-l6), a local folder or a hub id
    dtype: str = "auto"  # auto: bfloat16 on a GPU with native bf16 (compute capability >= 8.0), else float32
    gradient_checkpointing: bool = False
    max_length: int = 256  # tokens per input; longer ones are truncated (decoders keep the end, encoders the start)
    adapter: str = "prefix"  # prefix: the simplex of prefixes; lora: the LoRA baseline (PEFT) over the same head
    trust_remote_code: bool = False  # run Python files shipped with the model (auto_map); only for a model you trust

    def __post_init__(self) -> None:
        if self.dtype == "float16":
            raise ConfigError(
                "model.dtype=float16 is not supported: nothing scales the loss for the simplex, whose gradients flow "
                "back through the fp16 backbone and can underflow or overflow; use model.dtype=bfloat16 "
                "(GPUs with compute capability >= 8.0) or float32"
            )
        _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _choice("model.adapter", self.adapter, ("prefix", "lora"))
        _positive("model.max_length", self.max_length)


@dataclass
class PrefixConfig:
    length: int = 8  # P prefix tokens per layer
    # activations: the frozen model's own K/V of P random tokens; normal: N(0, std^2); peft:PATH: a PEFT
    # prefix-tuning adapter as every vertex's start (plus the activations draws' spread for K > 1)
    init: str = "activations"
    init_std: float = 0.02
    init_average: int = 1  # each vertex starts at the mean of this many draws (K=1, 3: the K=3 start's centroid)

    def __post_init__(self) -> None:
        _positive("prefix.length", self.length)
        _positive("prefix.init_average", self.init_average)
        if self.init.startswith("peft:"):
            if not self.init.removeprefix("peft:"):
                raise ConfigError("prefix.init=peft: needs a folder: prefix.init=peft:PATH/TO/ADAPTER")
        else:
            _choice("prefix.init", self.init, ("activations", "normal", "peft:PATH"))


@dataclass
class SimplexConfig:
    vertices: int = 3  # K; K = 1 is ordinary prefix tuning
    sampling: str = "example_layer"  # batch | example | example_layer
    beta: float = 1.0  # weight of the vertex-separation regulariser
    regulariser: str = "cos2"  # cos2: of the raw vertices; cos2_centred: centred over their P positions
    regularise_head: bool = False  # encoders: the regulariser also keeps the K heads' weights apart
    replicas: int = 1  # R seed replicas: R independent runs (seeds train.seed + r, data.seed + r), one backbone
    train_prefix: bool = True  # false: the prefix stays at its start and only the head trains (encoders)
    noise: str = "none"  # match: add Gaussian noise to the prefix, per layer as spread as a K-simplex's samples
    noise_match_vertices: int = 3  # the K whose Dirichlet(1) spread (at initialisation) the noise matches

    def __post_init__(self) -> None:
        _positive("simplex.vertices", self.vertices)
        _positive("simplex.replicas", self.replicas)
        _choice("simplex.sampling", self.sampling, GRANULARITIES)
        _choice("simplex.regulariser", self.regulariser, REGULARISERS)
        _choice("simplex.noise", self.noise, ("none", "match"))
        if self.noise_match_vertices < 2:
            raise ConfigError(f"simplex.noise_match_vertices must be >= 2 (got {self.noise_match_vertices})")


@dataclass
class DataConfig:
    task: str = "rotten_tomatoes"  # a registered task name or a local file (.csv/.tsv/.json/.jsonl/.parquet)
    protocol: str = "kshot"  # kshot: k per class for train and dev; first_n, stratified: N train, dev_size dev
    shots_per_class: int = 16
    first_n: int = 0
    train_size: int | None = None  # stratified: N, stratified by class (unset: None, as in older runs' configs)
    dev_size: int = 1000
    test_size: int = 1000  # cap on test examples (0: the whole test split)
    seed: int = 0
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    label_words: list[str] | None = None
    template: str | None = None
    data_files: dict[str, str] | None = None  # split -> local file, in place of a hub download
    # generation from a user's file: prompt and response columns, or a column of chat records (message lists)
    prompt_field: str = "prompt"
    response_field: str | None = None
    messages_field: str | None = None
    metric: str | None = None  # a generation task's main metric: rougeL, bleu, chrf or exact_match

    def __post_init__(self) -> None:
        if self.metric is not None:
            _choice("data.metric", self.metric, GENERATION_METRICS)
        _choice("data.protocol", self.protocol, ("kshot", "first_n", "stratified"))
        if self.protocol == "kshot":
            _positive("data.shots_per_class", self.shots_per_class)
            return
        if self.protocol == "first_n" and self.first_n < 1:
            raise ConfigError("data.first_n must be >= 1 with data.protocol=first_n; set e.g. data.first_n=100")
        if self.protocol == "stratified" and (self.train_size is None or self.train_size < 1):
            raise ConfigError(
                f"data.train_size must be >= 1 with data.protocol=stratified (got {self.train_size}); "
                "set e.g. data.train_size=100"
            )
        if self.dev_size < 1:
            raise ConfigError(
                f"data.dev_size must be >= 1 with data.protocol={self.protocol}: dev picks the checkpoint"
            )


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] | None = None  # module names; default: the attention query and value projections

    def __post_init__(self) -> None:
        _positive("lora.rank", self.rank)


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    overwrite: bool = False  # allow writing into an output_dir that holds a finished run
    resume: str = "none"  # none | auto (newest complete checkpoint in output_dir) | a checkpoint folder
    seed: int = 0
    max_steps: int = 40  # optimizer steps (unless epochs is set)
    epochs: float = 0.0  # > 0: a budget in passes over the training set, max_steps = ceil(E * N / global batch)
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 4
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    max_grad_norm: float = 1.0
    log_every: int = 5
    eval_every: int = 5
    eval_every_epochs: float = 0.0  # > 0: evaluate (and select) every this many epochs instead, e.g. 1
    save_every: int = 20
    eval_batch_size: int = 32
    tensorboard: bool = False  # an alias of report_to including tensorboard (events in OUTPUT_DIR/tensorboard)
    report_to: list[str] | str = field(default_factory=list)  # Accelerate trackers: [tensorboard, mlflow, wandb, ...]
    progress: bool = True
    trace: bool = False  # write ranks/trace-rank-R.safetensors: every step's example indices and alphas on this rank
    keep_checkpoints: int = 0  # keep the newest N checkpoints (and the best-so-far's); 0: keep all
    skip_nonfinite: bool = False  # a non-finite loss or gradient skips the step (counted) instead of stopping the run
    max_nonfinite_in_row: int = 5  # with skip_nonfinite: stop after this many non-finite steps in a row
    group_by_length: int = 0  # > 0: sort each window of this many steps' examples by length (less padding); 0: off

    def __post_init__(self) -> None:
        counts = (
            "max_steps",
            "micro_batch_size",
            "grad_accum",
            "log_every",
            "eval_every",
            "save_every",
            "eval_batch_size",
            "max_nonfinite_in_row",
        )
        for name in counts:
            _positive(f"train.{name}", getattr(self, name))
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0 (got {self.lr})")
        for name in ("epochs", "eval_every_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0 (0: off; got {getattr(self, name)})")
        _choice("train.schedule", self.schedule, ("cosine", "linear", "constant"))
        if self.warmup_steps < 0:
            raise ConfigError("train.warmup_steps must be >= 0")
        if self.group_by_length < 0:
            raise ConfigError(
                f"train.group_by_length must be >= 0 (steps a window, e.g. 16; 0: off; got {self.group_by_length})"
            )
        if self.keep_checkpoints < 0:
            raise ConfigError(f"train.keep_checkpoints must be >= 0 (0 keeps all; got {self.keep_checkpoints})")
        names = self.report_to.split(",") if isinstance(self.report_to, str) else self.report_to
        names = [name.strip().lower() for name in names if name.strip()]  # also `tensorboard,mlflow` (a string)
        if names == ["none"]:  # as transformers' Trainer spells "no tracker"
            names = []
        if "all" in names:
            raise ConfigError("train.report_to=all is not supported; name the trackers, e.g. [tensorboard,mlflow]")
        self.report_to = list(dict.fromkeys(names))

    def resolve_budget(self, train_examples: int, world_size: int) -> list[str]:
        """Turn ``epochs`` and ``eval_every_epochs`` into steps for ``train_examples`` examples (per replica) and
        ``world_size`` processes: ``max_steps = ceil(E * N / global batch)``, ``eval_every = round(e * N / global
        batch)`` (at least 1). Returns what was set, for the log."""
        global_batch = self.micro_batch_size * self.grad_accum * world_size
        per_epoch = train_examples / global_batch
        said = []
        if self.epochs:
            self.max_steps = max(1, math.ceil(self.epochs * per_epoch - 1e-9))
            said.append(f"train.epochs={self.epochs:g}: {self.max_steps} steps ({per_epoch:.2f} per epoch)")
        if self.eval_every_epochs:
            self.eval_every = max(1, round(self.eval_every_epochs * per_epoch))
            said.append(f"train.eval_every_epochs={self.eval_every_epochs:g}: every {self.eval_every} steps")
        return said

    def trackers(self) -> list[str]:
        """The experiment trackers to log to: ``report_to``, and tensorboard when ``tensorboard`` (its alias)."""
        alias = ["tensorboard"] if self.tensorboard and "tensorboard" not in self.report_to else []
        return [*self.report_to, *alias]


@dataclass
class EvalConfig:
    mode: str = "centroid"  # how dev/test are scored: centroid | vertex:I | ensemble:S | sampled:S | models:S
    select_by: str = "centroid"  # which dev score picks the best checkpoint, final/ (same syntax as mode)
    # more rules, each keeping its own best from the same training: scored on test at the end (summary.json's
    # test_final@RULE) and saved as final_by/RULE/ (e.g. [sampled:8] beside select_by=centroid)
    also_select_by: list[str] = field(default_factory=list)
    landscape: bool = True  # write landscape.png (dev metric over the simplex) at the end
    landscape_resolution: int = 6  # grid step 1/6 on the triangle: 28 points, centroid included
    landscape_examples: int = -1  # dev examples the landscape scores: -1 all (64 for models over 1B), 0 all, or a cap
    initial_test: bool = True  # score test at the initial centroid before training
    extra_test_modes: list[str] = field(default_factory=list)  # more modes to score test in at the end
    test_last: bool = False  # also score test with the last step's simplex (no dev selection), in eval.mode
    # generation tasks: test is decoded (and dev too with dev_generation); select_metric picks checkpoints (default:
    # the teacher-forced dev loss; a generation metric such as rougeL decodes dev at every evaluation)
    max_new_tokens: int = 32
    num_beams: int = 1  # > 1: beam search at each point (transformers' generate); 1: greedy
    dev_generation: bool = False
    select_metric: str | None = None

    def selection_rules(self) -> list[str]:
        """The rules that keep a best checkpoint: ``select_by`` (final/) first, then ``also_select_by``."""
        return list(dict.fromkeys([self.select_by, *self.also_select_by]))

    def __post_init__(self) -> None:
        for key in ("mode", "select_by"):
            check_eval_mode(getattr(self, key), f"eval.{key}")
        for i, mode in enumerate(self.extra_test_modes):
            check_eval_mode(mode, f"eval.extra_test_modes[{i}]")
        for i, mode in enumerate(self.also_select_by):
            check_eval_mode(mode, f"eval.also_select_by[{i}]")
        _positive("eval.landscape_resolution", self.landscape_resolution)
        _positive("eval.max_new_tokens", self.max_new_tokens)
        _positive("eval.num_beams", self.num_beams)
        if self.select_metric is not None:
            _choice("eval.select_metric", self.select_metric, ("loss", *GENERATION_METRICS))
            self.dev_generation = self.dev_generation or self.select_metric != "loss"  # it needs dev decoded
        if self.landscape_examples < -1:
            raise ConfigError(f"eval.landscape_examples must be -1, 0 or a count (got {self.landscape_examples})")


@dataclass
class EngineConfig:
    deepspeed: str | None = None  # a DeepSpeed JSON (a path or a name in ds_configs/, e.g. zero3_bf16)
    compile: bool = False  # torch.compile(fullgraph=True) the alpha sampler
    collective_timeout_s: int = 1800  # a collective waiting longer than this (a hung rank) fails the run

    def __post_init__(self) -> None:
        _positive("engine.collective_timeout_s", self.collective_timeout_s)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    simplex: SimplexConfig = field(default_factory=SimplexConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.model.adapter == "lora" and self.simplex.replicas > 1:
            raise ConfigError("model.adapter=lora trains one LoRA per run: set simplex.replicas=1 (run seeds apart)")
        if self.model.adapter == "lora" and self.simplex.vertices > 1:
            raise ConfigError("model.adapter=lora uses no prefix: set simplex.vertices=1")
        modes = {"mode": self.eval.mode, "select_by": self.eval.select_by}
        modes.update({f"extra_test_modes[{i}]": m for i, m in enumerate(self.eval.extra_test_modes)})
        modes.update({f"also_select_by[{i}]": m for i, m in enumerate(self.eval.also_select_by)})
        for key, mode in modes.items():  # checks across sections
            kind, index = check_eval_mode(mode)
            if kind == "vertex" and index >= self.simplex.vertices:
                raise ConfigError(
                    f"eval.{key}=vertex:{index} but simplex.vertices={self.simplex.vertices}; "
                    f"use vertex:0 .. vertex:{self.simplex.vertices - 1}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_eval_mode(mode: str, key: str = "--mode") -> tuple[str, int | None]:
    """Parse ``centroid``, ``vertex:I``, ``ensemble:S``, ``sampled:S`` or ``models:S`` into (kind, number)."""
    kind, _, arg = mode.partition(":")
    if kind == "centroid" and not arg:
        return kind, None
    if kind in ("vertex", "ensemble", "sampled", "models") and arg.isdigit() and (kind == "vertex" or int(arg) > 0):
        return kind, int(arg)
    raise ConfigError(
        f"{key}={mode!r} is not a mode; use centroid, vertex:I, ensemble:S, sampled:S or models:S (S > 0)"
    )


# ---- parsing -------------------------------------------------------------------------------------
def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {list(options)}")


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key} must be >= 1 (got {value})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A :class:`Config` from an optional YAML file, then ``section.key=value`` overrides (YAML values)."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file to --config")
    return build_dataclass(Config, load_tree(path, overrides))


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML (loadable with ``--config``)."""
    write_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
