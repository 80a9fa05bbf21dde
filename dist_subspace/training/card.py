"""The model card of an export, ``final/README.md``, in the format of the adapters people share (the cards PEFT and
transformers' Trainer write): a YAML front matter block (``base_model``, ``library_name``, ``tags``, the test
result as ``model-index``), then sections: the model, the task (its kind: classification, regression or text
generation) and protocol, how the step was selected, the test results (a generation task's every generation
metric), how to load and use it, and the command that trained it.

:func:`render_card` is pure (the recipe's finish gathers the facts); :func:`training_command` reads the command
line and launcher from ``sys.argv`` and the environment it is given.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_subspace.core.config import Config
from dist_subspace.core.embedded import EMBEDDED_MODELS
from dist_subspace.data.tasks import LOSS_METRICS, FewShotSplits, TaskSpec

SAMPLING = {"batch": "per step", "example": "per example", "example_layer": "per example and per layer"}
VERSIONED = ("dist_subspace", "torch", "transformers", "accelerate", "deepspeed", "peft")
GENERATION_SCORES = ("rougeL", "bleu", "chrf", "exact_match", "loss", "perplexity")  # a generation card's test table
PAPER = "Falissard, Guigue & Soulier, *Improving generalization in large language models fine-tuning with prefix subspaces*, EMNLP Findings 2023"  # noqa: E501


@dataclass(frozen=True)
class CardFacts:
    """What the card states beyond the (replica's) config, gathered when the run finishes."""

    run_dir: str  # the replica's run folder, as the config names it
    kind: str  # decoder | encoder
    num_layers: int
    splits: FewShotSplits  # the replica's task and examples
    summary: Mapping[str, Any]  # summary.json: test_initial, test_final, test_last, test_final_<mode>, selected_step
    dev_score: float | None  # the selected step's dev score in eval.select_by
    command: str  # the command that trained it (:func:`training_command`)
    world_size: int = 1
    replica: int | None = None  # with simplex.replicas > 1: which seed replica this folder is
    test_scores: Mapping[str, Any] = field(default_factory=dict)  # the selected simplex's test row (generation)
    versions: Mapping[str, str] = field(default_factory=lambda: package_versions())


def training_command(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The command line that started this process, as a user would type it: ``python -m dist_subspace.train ...``
    (``sys.argv[0]`` is the module's file under ``python -m``), ``dist-subspace train ...``, or under the launcher
    that the environment shows (``torchrun``, ``accelerate launch``, ``deepspeed``). A launcher's own options that
    do not reach the process (``--config_file``, rendezvous settings) cannot be recovered: the world size can."""
    program = Path(argv[0]) if argv else Path("python")
    args = [a for a in argv[1:] if not (a.startswith("--local_rank") or a.startswith("--local-rank"))]
    if program.name == "dist-subspace":
        target, module = ["dist-subspace"], None
    elif program.parent.name == "dist_subspace" and program.suffix == ".py":
        module = "dist_subspace" if program.stem == "__main__" else f"dist_subspace.{program.stem}"
        target = ["-m", module]
    else:
        target, module = [str(program)], None
    world = env.get("WORLD_SIZE", "1")
    if "ACCELERATE_MIXED_PRECISION" in env:  # set by every form of `accelerate launch`
        return shlex.join(["accelerate", "launch", "--num_processes", world, *target, *args])
    if len(args) < len(argv) - 1:  # the deepspeed launcher passes --local_rank
        local = env.get("LOCAL_SIZE", world)
        head = ["deepspeed", "--num_gpus", local, "--module", module] if module else ["deepspeed", *target]
        return shlex.join([*head, *args])
    if "TORCHELASTIC_RUN_ID" in env:  # torchrun
        nodes = env.get("GROUP_WORLD_SIZE", "1")
        head = ["torchrun", *(["--nnodes", nodes] if nodes != "1" else [])]
        return shlex.join([*head, "--nproc_per_node", env.get("LOCAL_WORLD_SIZE", world), *target, *args])
    if target[0] == "dist-subspace":
        return shlex.join([*target, *args])
    return shlex.join(["python", *target, *args])


def package_versions(names: Sequence[str] = VERSIONED) -> dict[str, str]:
    """The installed version of each package of ``names`` that is installed."""
    versions = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


class _PlainDumper(yaml.SafeDumper):
    """YAML without anchors and aliases (``&id001``/``*id001``), which a card's reader may not expect."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else str(value)


def _protocol(cfg: Config) -> str:
    d = cfg.data
    if d.protocol == "kshot":
        drawn = f"{d.shots_per_class} examples per class for train and {d.shots_per_class} per class for dev"
    elif d.protocol == "stratified":
        drawn = f"{d.train_size} training examples and {d.dev_size} dev examples, each stratified by class"
    else:
        drawn = f"the first {d.first_n} shuffled training examples for train and the next {d.dev_size} for dev"
    test = f"up to {d.test_size} test examples" if d.test_size else "the whole test split"
    return f"`{d.protocol}`: {drawn}, drawn with `data.seed={d.seed}`; {test}"


def task_kind(task: TaskSpec) -> str:
    """What the task asks of the model, in words: text generation, regression or classification."""
    return "text generation" if task.generation else "regression" if task.regression else "classification"


def _generation_lines(cfg: Config, facts: CardFacts) -> list[str]:
    """A generation card's test scores, each one (when the run's finish gave them), and how they were decoded."""
    e, scores = cfg.eval, facts.test_scores
    how = f"beam search ({e.num_beams} beams)" if e.num_beams > 1 else "greedy"
    lines = [
        "",
        f"Test responses decoded ({how}, at most `eval.max_new_tokens={e.max_new_tokens}` tokens) and scored against "
        "the references on a 0..1 scale; `loss` is the teacher-forced loss per response token.",
    ]
    shown = [key for key in (*GENERATION_SCORES, "entropy") if key in scores]
    if shown:
        lines += ["", "| metric | selected |", "|---|---|", *(f"| {k} | {_number(scores[k])} |" for k in shown)]
    return lines


def render_card(cfg: Config, facts: CardFacts) -> str:
    """``final/README.md`` of one run folder (one seed replica): front matter, then the model, task and protocol,
    selection, test results (each with its mode), how to load the centroid with PEFT (decoders) and the whole
    simplex with ``load_run``, and the command that trained it."""
    k, p, s = cfg.simplex.vertices, cfg.prefix.length, facts.summary
    spec = facts.splits.task
    metric, task, generation = spec.metric, spec.name, spec.generation
    pipeline = "text-generation" if generation else "text-classification"
    select = cfg.eval.select_metric or spec.select_metric  # what the dev score is
    best = "lowest" if select in LOSS_METRICS else "best"
    base, lora = cfg.model.name_or_path, cfg.model.adapter == "lora"
    name = Path(facts.run_dir).name
    mode, select_by, step = s.get("mode", cfg.eval.mode), cfg.eval.select_by, s.get("selected_step")
    tags = ["dist_subspace", "lora" if lora else "prefix-tuning", "prefix-subspace", f"base_model:adapter:{base}"]
    front: dict[str, Any] = {
        "base_model": base,
        "library_name": "dist_subspace",
        "tags": tags,
        "pipeline_tag": pipeline,
        "metrics": [metric],
    }
    if isinstance(s.get("test_final"), float):
        result = {"type": metric, "value": float(s["test_final"]), "name": f"test {metric} ({mode}, step {step})"}
        dataset = {"name": task, "type": task, "split": "test"}
        results = [{"task": {"type": pipeline}, "dataset": dataset, "metrics": [result]}]
        front["model-index"] = [{"name": name, "results": results}]
    what = (
        f"a LoRA baseline (rank {cfg.lora.rank}) over the frozen `{base}`"
        if lora
        else f"a prefix subspace over the frozen `{base}`: a simplex of K = {k} prefixes of P = {p} tokens in each "
        f"of its {facts.num_layers} layers"
    )
    seeds = f"`train.seed={cfg.train.seed}`, `data.seed={cfg.data.seed}`"
    if facts.replica is not None:
        seeds += f" (seed replica {facts.replica} of the run one folder up, trained beside the others on one backbone)"
    sp = facts.splits
    counts = f"train {len(sp.train)}, dev {len(sp.dev)}, test {len(sp.test)}"
    t = cfg.train
    batch = f"{t.micro_batch_size} x {t.grad_accum} x {facts.world_size} process(es)"
    lines = [
        "---",
        yaml.dump(front, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"{what[0].upper()}{what[1:]}, trained with dist_subspace on `{task}` (test {metric} "
        f"{_number(s.get('test_final'))}, `{mode}`). Prefix subspaces: {PAPER}.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` ({facts.kind}, {facts.num_layers} layers), frozen, `model.dtype={cfg.model.dtype}` |",
        f"| adapter | LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha}, on {cfg.lora.targets or 'q/v'} |"
        if lora
        else f"| adapter | a prefix simplex: K = {k} vertices, P = {p} prefix tokens per layer |",
        f"| sampling | `{cfg.simplex.sampling}`: in training, a Dirichlet(1) point of the simplex "
        f"{SAMPLING.get(cfg.simplex.sampling, '')} |",
        f"| regulariser | `{cfg.simplex.regulariser}`, beta = {cfg.simplex.beta} |",
        f"| initialisation | `prefix.init={cfg.prefix.init}` |",
        f"| inference | `eval.mode={mode}` (`centroid`, `vertex:I`, `ensemble:S`, `sampled:S`) |",
        "",
        "## Task and protocol",
        "",
        f"- task: `{task}` ({task_kind(spec)}), metric: {metric}",
        f"- protocol: {_protocol(cfg)}",
        f"- examples: {counts}",
        f"- seeds: {seeds}",
        f"- training: {t.max_steps} optimizer steps, global batch {batch}, AdamW lr {t.lr} ({t.schedule}, "
        f"{t.warmup_steps} warm-up steps)",
        "",
        "## Selection",
        "",
        f"Dev was scored every {t.eval_every} steps and at the last; the exported simplex is the one of step "
        f"{step}, the {best} dev {select} in `eval.select_by={select_by}` ({_number(facts.dev_score)}; the first such "
        "step on ties).",
        "",
        "## Test results",
        "",
        f"| simplex | mode | {metric} |",
        "|---|---|---|",
    ]
    if "test_initial" in s:
        lines.append(f"| the initial simplex, before training | `{mode}` | {_number(s['test_initial'])} |")
    lines.append(f"| selected (step {step}) | `{mode}` | {_number(s.get('test_final'))} |")
    if "test_last" in s:
        lines.append(f"| the last step, no selection (step {t.max_steps}) | `{mode}` | {_number(s['test_last'])} |")
    for key, value in s.items():
        if key.startswith("test_final_"):
            lines.append(f"| selected (step {step}) | `{key.removeprefix('test_final_')}` | {_number(value)} |")
    if generation:
        lines += _generation_lines(cfg, facts)
    lines += ["", "## How to use", ""]
    load_base = f'resolve_model("{base}")' if base in EMBEDDED_MODELS else f'"{base}"'
    embedded = "from dist_subspace.core.embedded import resolve_model\n" if base in EMBEDDED_MODELS else ""
    if facts.kind == "decoder" and not lora:
        lines += [
            "The centroid as a PEFT prefix-tuning adapter (`final/peft_centroid`, decoders only). It gives the "
            "trainer's numbers on right-padded batches, read at each row's last real token:",
            "",
            "```python",
            f"{embedded}from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f"base = AutoModelForCausalLM.from_pretrained({load_base})",
            f'model = PeftModel.from_pretrained(base, "{facts.run_dir}/final/peft_centroid")',
            "```",
            "",
            "The whole simplex (every vertex, any point of it) with `load_run`:",
            "",
            "```python",
            "from dist_subspace.generate import generate, load_run, parse_point",
            "",
            f'backbone, tokenizer, vertices = load_run("{facts.run_dir}")  # vertices [K, L, 2, H_kv, P, D]',
            f'print(generate(backbone, tokenizer, vertices, parse_point("vertex:0", {k}), ["Your prompt"]))',
            "```",
            "",
        ]
    else:
        what_is = "the LoRA tensors (`adapter.*`)" if lora else "the vertices and the K heads"
        lines += [f"`final/simplex.safetensors` holds {what_is}; score it in any mode with the evaluate command.", ""]
    if generation:
        lines += [
            "Answer new prompts (a file with a `prompt` column, or your run's `data.prompt_field` or chat records), "
            "from the mixture of 8 points with how much they disagree:",
            "",
            "```bash",
            f"python -m dist_subspace.predict {shlex.quote(facts.run_dir)} --data prompts.csv --out answers.csv "
            "--mode ensemble:8",
            "```",
            "",
        ]
    lines += [
        f"Score it: `python -m dist_subspace.evaluate {shlex.quote(facts.run_dir)} --mode {mode} --split test`.",
        "",
        "## Training command",
        "",
        "```bash",
        facts.command,
        "```",
        "",
        "The resolved config is `config.yaml` beside `final/` (`--config` loads it back); `summary.json` and "
        "`metrics.jsonl` hold the numbers above.",
    ]
    if facts.versions:
        lines += ["", "## Framework versions", ""]
        lines += [f"- {package} {version}" for package, version in facts.versions.items()]
    return "\n".join(lines) + "\n"
