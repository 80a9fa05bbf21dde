"""Config -> data, tokenizer and the model with its backbone loaded (sharded under ZeRO-3) and wrapped.

Also the per-replica view of a config: replica r of a run with ``simplex.replicas=R`` is exactly the run with
seeds ``train.seed + r`` and ``data.seed + r`` and one replica, which is what its folder's ``config.yaml`` says.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from dist_subspace.core.arch import arch_spec, prefix_geometry
from dist_subspace.core.config import Config, ConfigError, check_eval_mode
from dist_subspace.core.embedded import resolve_model
from dist_subspace.core.export import load_peft_prefix
from dist_subspace.core.initialise import initial_head, initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel
from dist_subspace.core.simplex import dirichlet_spread
from dist_subspace.data.batching import Collator, check_chat, label_token_ids
from dist_subspace.data.sources import load_splits
from dist_subspace.data.tasks import FewShotSplits, TaskSpec
from dist_subspace.training.engine import Engine
from dist_subspace.training.preflight import check_context, check_peft_adapter


def replica_config(cfg: Config, replica: int) -> Config:
    """The one-replica config of seed replica ``replica`` (its own seeds and folder)."""
    if cfg.simplex.replicas == 1:
        return cfg
    one = copy.deepcopy(cfg)
    one.simplex.replicas = 1
    one.train.seed = cfg.train.seed + replica
    one.data.seed = cfg.data.seed + replica
    one.train.output_dir = str(replica_dir(Path(cfg.train.output_dir), replica, cfg.simplex.replicas))
    return one


def replica_dir(out: Path, replica: int, replicas: int) -> Path:
    """Where replica ``replica``'s run folder lives: the run folder itself when R = 1."""
    return out if replicas == 1 else out / f"replica-{replica}"


def build(cfg: Config, engine: Engine) -> tuple[list[FewShotSplits], Collator, PrefixSubspaceModel, str]:
    """Data of every replica, tokenizer and the model with its backbone loaded (sharded under ZeRO-3) and
    wrapped; the simplex is on the device but not initialised (see :func:`initialise`)."""
    from transformers import AutoConfig, AutoTokenizer

    data = vars(cfg.data)
    with engine.main_process_first():  # a hub data set downloads once; the other ranks read the cache
        splits = [load_splits(**{**data, "seed": cfg.data.seed + r}) for r in range(cfg.simplex.replicas)]
    task = splits[0].task
    check_generation_eval(cfg, task)
    with engine.main_process_first():  # the first rank converts an embedded model once; the rest read it
        path = resolve_model(cfg.model.name_or_path)
    trust = cfg.model.trust_remote_code  # off unless the config sets it (then said in the log)
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    decoder = arch_spec(model_config).kind == "decoder"
    check_context(model_config, cfg.model.max_length, cfg.prefix.length, decoder)
    if cfg.prefix.init.startswith("peft:"):  # the adapter's L, H_kv and D against this backbone's, before it loads
        check_peft_adapter(
            Path(cfg.prefix.init.removeprefix("peft:")), cfg.prefix.length, prefix_geometry(model_config)
        )
    if cfg.model.adapter == "lora" and engine.partitioned:
        raise ConfigError("model.adapter=lora runs with a replicated backbone: drop ZeRO-3 (engine.deepspeed)")
    if decoder and cfg.simplex.regularise_head:
        raise ConfigError("simplex.regularise_head=true needs an encoder's head; a decoder's verbalizer is fixed")
    if decoder and not cfg.simplex.train_prefix and cfg.model.adapter == "prefix":
        raise ConfigError("simplex.train_prefix=false leaves a decoder nothing to train (its verbalizer is fixed)")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    collator = Collator(tokenizer, task, decoder, cfg.model.max_length)  # a generation task on an encoder: refused
    if task.generation:  # every example's response fits and any chat record has its template: before the backbone
        for s in splits:
            check_chat(tokenizer, [*s.train, *s.dev, *s.test])
            collator.count_truncated([*s.train, *s.dev, *s.test])
    words = label_token_ids(tokenizer, task.label_words) if decoder else None  # refused before the backbone loads
    backbone = engine.load_backbone(path, decoder)
    k, p, r = cfg.simplex.vertices, cfg.prefix.length, cfg.simplex.replicas
    if decoder:
        model = PrefixSubspaceModel(backbone, k, p, label_token_ids=words, replicas=r)
    else:
        model = PrefixSubspaceModel(backbone, k, p, num_outputs=task.head_outputs, replicas=r)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.place(engine.device)
    if cfg.model.adapter == "lora":
        from dist_subspace.core.lora import add_lora

        add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, seed=cfg.train.seed)
    if not cfg.simplex.train_prefix:
        model.simplex.vertices.requires_grad_(False)
    model.backbone = engine.wrap_backbone(backbone)
    return splits, collator, model, path


def check_generation_eval(cfg: Config, task: TaskSpec) -> None:
    """What the ``eval.*`` keys ask of a task, refused before the model loads rather than after the first evaluation:
    ``eval.select_metric`` is a generation task's; a generation task's dev loss has no ensemble (its text is decoded
    from the mixture, it is not teacher-forced), so an ensemble selection rule needs a decoded metric; beam search
    follows one point, not a mixture."""
    e = cfg.eval
    if not task.generation:
        if e.select_metric is not None:
            raise ConfigError(
                f"eval.select_metric={e.select_metric} is for generation tasks; {task.name} is selected by its "
                f"metric, {task.metric}: drop eval.select_metric"
            )
        return
    metric = e.select_metric or task.select_metric
    rules = [("eval.select_by", e.select_by), *(("eval.also_select_by", rule) for rule in e.also_select_by)]
    for key, rule in rules:
        if check_eval_mode(rule)[0] == "ensemble" and metric == "loss":
            raise ConfigError(
                f"{key}={rule}: an ensemble of a generation task decodes from the mixture of its points and "
                "has no teacher-forced dev loss to select by; select by centroid or sampled:S, or set "
                "eval.select_metric=rougeL (dev is then decoded)"
            )
    if e.num_beams > 1:
        decoded = [e.mode, *e.extra_test_modes, *(e.selection_rules() if e.dev_generation else [])]
        ensembles = [mode for mode in decoded if check_eval_mode(mode)[0] == "ensemble"]
        if ensembles:
            raise ConfigError(
                f"eval.num_beams={e.num_beams}: beam search decodes one point at a time, and {ensembles[0]} is a "
                "mixture of points; use eval.num_beams=1 with it"
            )


def start_vertices(cfg: Config, model: PrefixSubspaceModel, seed: int, special: list[int], vocab: int) -> torch.Tensor:
    """One replica's starting vertices ``[K, L, 2, H_kv, P, D]``: independent draws (``prefix.init`` activations or
    normal), or ``peft:PATH``: a PEFT prefix-tuning adapter as the start of every vertex, plus, for K > 1, the
    usual independent spread (each activations draw minus their mean), so the centroid starts at the adapter and
    K = 1 is exactly the adapter."""
    p = cfg.prefix
    method = "activations" if p.init.startswith("peft:") else p.init
    draws = initial_vertices(model, method, seed, p.init_std, special, vocab, average=p.init_average)
    if not p.init.startswith("peft:"):
        return draws
    try:
        adapter = load_peft_prefix(Path(p.init.removeprefix("peft:")), model.geometry, p.length)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return adapter.to(draws.device) + (draws - draws.mean(0, keepdim=True))


@torch.no_grad()
def initialise(cfg: Config, model: PrefixSubspaceModel, tokenizer, engine: Engine) -> torch.Tensor | None:
    """Give each replica r its independent start from seed ``train.seed + r`` (vertices, head), identical on
    every rank. Returns the per-replica, per-layer noise level ``[R, L]`` when ``simplex.noise=match`` (the
    Dirichlet(1) spread of a ``simplex.noise_match_vertices``-simplex started the same way), else None."""
    k = cfg.simplex.vertices
    special, vocab = tokenizer.all_special_ids, len(tokenizer)
    vertices, head = model.simplex.vertices, model.simplex.head
    noise = [] if cfg.simplex.noise == "match" else None
    for r in range(cfg.simplex.replicas):
        seed, rows = cfg.train.seed + r, slice(r * k, (r + 1) * k)
        if model.use_prefix:  # under ZeRO-3 only the engine can run the partitioned backbone: after wrapping
            vertices[rows] = start_vertices(cfg, model, seed, special, vocab).to(vertices.device)
        if head is not None:
            start = initial_head(k, head.weight.shape[2], head.weight.shape[1], seed)
            head.weight[rows], head.bias[rows] = start["weight"], start["bias"]
        if noise is not None:
            m = cfg.simplex.noise_match_vertices
            method = "activations" if cfg.prefix.init.startswith("peft:") else cfg.prefix.init  # the spread's draws
            spread = initial_vertices(model, method, seed, cfg.prefix.init_std, special, vocab, num_vertices=m)
            noise.append(dirichlet_spread(spread))
    for p in model.simplex.parameters():
        engine.broadcast_(p.data)
    if noise is None:
        return None
    return engine.broadcast_(torch.stack(noise).to(engine.device).contiguous())
