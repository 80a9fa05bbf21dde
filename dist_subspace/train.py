"""Train a prefix subspace over a frozen model.

    python -m dist_subspace.train                                   # embedded default: SmolLM2-135M, Rotten Tomatoes
    python -m dist_subspace.train --config my.yaml simplex.vertices=4 train.max_steps=200
    accelerate launch --config_file launch/accelerate/cpu_zero3.yaml -m dist_subspace.train
    deepspeed --num_gpus 8 --module dist_subspace.train engine.deepspeed=zero3_bf16

Data flows one way: config -> data -> backbone + simplex -> engine -> loop -> checkpoint / evaluate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_subspace import simplex
from dist_subspace.arch import arch_spec
from dist_subspace.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_simplex_tensors,
    save_checkpoint,
    save_final,
    simplex_tensors,
)
from dist_subspace.cli import USER_ERRORS, exit_now, user_error
from dist_subspace.config import Config, ConfigError, load_config, save_config
from dist_subspace.data import Collator, FewShotSplits, label_token_ids, load_splits
from dist_subspace.embedded import resolve_model
from dist_subspace.engine import Engine, parameter_counts
from dist_subspace.evaluation import evaluate, write_landscape
from dist_subspace.metrics import task_loss
from dist_subspace.model import PrefixSubspaceModel, initial_vertices


def step_examples(num_examples: int, seed: int, step: int, global_batch: int) -> list[int]:
    """The examples of optimizer step ``step``: a window on the stream of seeded epoch permutations.

    Depends only on (seed, step), so resume needs no data-loader state and the split over ranks and
    micro-batches does not change which examples a step sees.
    """
    start, out = step * global_batch, []
    epoch = start // num_examples
    while len(out) < global_batch:
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        offset = start - epoch * num_examples if not out else 0
        out += perm[offset : offset + global_batch - len(out)]
        epoch += 1
    return out


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up, then cosine / linear decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)


def build(cfg: Config, engine: Engine) -> tuple[FewShotSplits, Collator, PrefixSubspaceModel, str]:
    """Data, tokenizer and the model with its backbone loaded (sharded under ZeRO-3) and wrapped; the
    simplex is on the device but not initialised."""
    from transformers import AutoConfig, AutoTokenizer

    splits = load_splits(**vars(cfg.data))
    task = splits.task
    with engine.main_process_first():  # the first rank converts an embedded model once; the rest read it
        path = resolve_model(cfg.model.name_or_path)
    decoder = arch_spec(AutoConfig.from_pretrained(path)).kind == "decoder"
    tokenizer = AutoTokenizer.from_pretrained(path)
    collator = Collator(tokenizer, task, decoder, cfg.model.max_length)
    backbone = engine.load_backbone(path, decoder)
    k, p = cfg.simplex.vertices, cfg.prefix.length
    if decoder:
        model = PrefixSubspaceModel(backbone, k, p, label_token_ids=label_token_ids(tokenizer, task.label_words))
    else:
        model = PrefixSubspaceModel(backbone, k, p, num_outputs=task.head_outputs)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.place(engine.device)
    model.backbone = engine.wrap_backbone(backbone)
    return splits, collator, model, path


class Recipe:
    """setup / train / validate / save / cleanup for one run."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)

    # ---- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.engine = engine = Engine(cfg)
        torch.manual_seed(cfg.train.seed)
        self.splits, self.collator, self.model, self.model_path = build(cfg, engine)
        model = self.model
        with torch.no_grad():  # after wrapping: under ZeRO-3 only the engine can run the partitioned backbone
            tokenizer = self.collator.tokenizer
            init = initial_vertices(
                model, cfg.prefix.init, cfg.train.seed, cfg.prefix.init_std, tokenizer.all_special_ids, len(tokenizer)
            )
            model.simplex.vertices.copy_(engine.broadcast_(init.to(engine.device).contiguous()))
            if model.simplex.head is not None:
                for p in model.simplex.head.parameters():
                    engine.broadcast_(p.data)
        params = list(model.trainable_parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        t = cfg.train
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.schedule)
        )
        self.step = 0
        self.trace: dict[str, torch.Tensor] = {}
        self.best: dict = {"score": None, "step": None, "tensors": None}
        self.sampler = simplex.sample_alpha
        if cfg.engine.compile:
            self.sampler = torch.compile(simplex.sample_alpha, fullgraph=True, dynamic=False)
        self._resume()
        # The sampler's step lives on the device: advanced in place, never read back by the host.
        self.step_tensor = torch.tensor(self.step, dtype=torch.long, device=engine.device)
        self._log_setup(self.model_path)

    def _resume(self) -> None:
        choice = self.cfg.train.resume
        folder = None
        if choice == "auto":
            folder = latest_checkpoint(self.out)
        elif choice != "none":
            folder = Path(choice)
        if folder is None:
            return
        state = load_checkpoint(folder, self.model, self.optimizer, self.scheduler)
        self.step, self.best = state["step"], state["best"]
        self.log(f"resumed from {folder} at step {self.step}")

    def _log_setup(self, path: str) -> None:
        cfg, engine = self.cfg, self.engine
        trainable, frozen, local_bytes = parameter_counts(self.model)
        g = self.model.geometry
        global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * engine.world_size
        self.log(f"engine: {engine.describe()}")
        self.log(f"model: {path} ({self.model.spec.kind}), L={g.num_layers} H_kv={g.num_kv_heads} D={g.head_dim}")
        self.log(
            f"simplex: K={cfg.simplex.vertices} P={cfg.prefix.length} sampling={cfg.simplex.sampling} "
            f"beta={cfg.simplex.beta} init={cfg.prefix.init}"
        )
        self.log(
            f"parameters: trainable {trainable:,} / frozen {frozen:,}; frozen bytes on this rank "
            f"{local_bytes / 2**20:.1f} MiB"
        )
        self.log(
            f"global batch {global_batch} = micro {cfg.train.micro_batch_size} x accumulation "
            f"{cfg.train.grad_accum} x world {engine.world_size}; {cfg.train.max_steps} optimizer steps"
        )
        s = self.splits
        self.log(f"data: {s.task.name}: train {len(s.train)}, dev {len(s.dev)}, test {len(s.test)}")

    # ---- logging ---------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.engine.is_main:
            print(f"[dist_subspace] {message}", flush=True)

    def record(self, split: str, **values) -> None:
        if not self.engine.is_main:
            return
        row = {"step": self.step, "split": split, **values}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, self.step)

    # ---- the loop --------------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches on every rank; returns the mean task loss over
        the global batch (0-d, on the device: read by the host only when logged)."""
        cfg, engine, model = self.cfg, self.engine, self.model
        mb, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
        examples = self.splits.train
        order = step_examples(len(examples), cfg.train.seed, self.step, mb * accum * engine.world_size)
        model.train()
        total = torch.zeros((), device=engine.device)
        for micro in range(accum):
            chunk = micro * engine.world_size + engine.rank  # the same chunks whatever the world/accum split
            ids = order[chunk * mb : (chunk + 1) * mb]
            batch = {k: v.to(engine.device) for k, v in self.collator([(i, examples[i]) for i in ids]).items()}
            alpha = self.sampler(
                cfg.train.seed,
                self.step_tensor,
                batch["index"],
                model.num_vertices,
                model.alpha_rows,
                cfg.simplex.sampling,
            )
            if cfg.train.trace:
                self.trace[f"step{self.step}.micro{micro}.index"] = batch["index"].cpu()
                self.trace[f"step{self.step}.micro{micro}.alpha"] = alpha.detach().cpu()
            logits = model(batch["input_ids"], batch["attention_mask"], alpha, batch.get("token_type_ids"))
            loss = task_loss(self.splits.task, logits, batch["labels"]) / accum
            loss.backward()
            total += loss.detach()
        reg = cfg.simplex.beta * model.regulariser()  # identical on every rank: no averaging needed
        if reg.requires_grad:
            reg.backward()
        params = list(model.trainable_parameters())
        total = engine.all_reduce_mean_grads(params, total)
        self.grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        self.lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_tensor += 1
        self.step += 1
        self.reg = reg.detach()
        return total

    def validate(self, split: str, mode: str | None = None) -> dict:
        examples = self.splits.dev if split == "dev" else self.splits.test
        result = evaluate(
            self.model,
            self.engine,
            examples,
            self.collator,
            self.splits.task,
            mode or self.cfg.eval.mode,
            self.cfg.train.eval_batch_size,
            self.cfg.simplex.sampling,
        )
        self.record(split, **{k: v for k, v in result.items() if k != "samples"})
        return result

    def _select(self) -> None:
        """Dev score for best-checkpoint selection (``eval.select_by``); keep the best simplex (tiny) in memory."""
        mode = self.cfg.eval.select_by
        result = self.validate("dev", mode) if mode != self.cfg.eval.mode else self.last_dev
        score = result[self.splits.task.metric]
        if self.best["score"] is None or score > self.best["score"]:
            self.best = {"score": score, "step": self.step, "tensors": simplex_tensors(self.model)}

    def save(self) -> None:
        if self.engine.is_main:
            folder = self.out / "checkpoints" / f"step-{self.step}"
            save_checkpoint(folder, self.model, self.optimizer, self.scheduler, self.step, self.best)
        self.engine.barrier()

    def train(self) -> dict:
        t = self.cfg.train
        metric = self.splits.task.metric
        self.writer = None
        if t.tensorboard and self.engine.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        summary: dict = {}
        if self.step == 0:
            initial = self.validate("test")
            summary["test_initial"] = initial[metric]
            self.log(f"test {metric} at the initial centroid: {initial[metric]:.4f} (n={initial['n']})")
        progress = None
        if t.progress and self.engine.is_main:
            from tqdm import tqdm

            progress = tqdm(total=t.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        global_batch = t.micro_batch_size * t.grad_accum * self.engine.world_size
        clock, losses = time.perf_counter(), []

        def due(every: int) -> bool:
            return self.step % every == 0 or self.step == t.max_steps

        while self.step < t.max_steps:
            losses.append(self.train_step())
            if progress is not None:
                progress.update(1)
            if due(t.log_every):
                loss = torch.stack(losses).mean().item()
                elapsed = time.perf_counter() - clock
                rate = global_batch * len(losses) / elapsed
                self.record(
                    "train",
                    loss=loss,
                    regulariser=self.reg.item(),
                    lr=self.lr,
                    grad_norm=float(self.grad_norm),
                    examples_per_s=rate,
                )
                if progress is not None:
                    progress.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:.1f}")
                clock, losses = time.perf_counter(), []
            if due(t.eval_every):
                self.last_dev = self.validate("dev")
                self._select()
            if due(t.save_every):
                self.save()
        if progress is not None:
            progress.close()
        return self.finish(summary)

    def finish(self, summary: dict) -> dict:
        """Select the best dev simplex, score it on test, write ``final/`` and the landscape."""
        metric = self.splits.task.metric
        if self.best["tensors"] is not None:
            load_simplex_tensors(self.model, self.best["tensors"])
        final = self.validate("test")
        summary.update(test_final=final[metric], selected_step=self.best["step"], mode=self.cfg.eval.mode)
        self.log(
            f"test {metric} after training ({self.cfg.eval.mode}, dev-selected step {self.best['step']}): "
            f"{final[metric]:.4f} (n={final['n']})"
        )
        if self.engine.is_main:
            info = {
                "model": self.cfg.model.name_or_path,
                "sampling": self.cfg.simplex.sampling,
                "task": self.splits.task.name,
                "selected_step": self.best["step"],
                "selected_by": self.cfg.eval.select_by,
                "dev_score": self.best["score"],
            }
            save_final(self.out / "final", self.model, info)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._write_rank_facts()
        if self.trace:
            save_file(self.trace, str(self.out / "ranks" / f"trace-rank-{self.engine.rank}.safetensors"))
        if self.cfg.eval.landscape:
            write_landscape(
                self.model,
                self.engine,
                self.splits.dev,
                self.collator,
                self.splits.task,
                self.out,
                self.cfg.eval.landscape_resolution,
                self.cfg.train.eval_batch_size,
            )
        self.engine.barrier()
        return summary

    def _write_rank_facts(self) -> None:
        """``ranks/rank-R.json``: what this rank holds (frozen shard, a hash of its simplex), to check sharding."""
        _, frozen, local_bytes = parameter_counts(self.model)
        digest = hashlib.sha256()
        for name, tensor in sorted(simplex_tensors(self.model).items()):
            digest.update(name.encode() + tensor.numpy().tobytes())
        facts = {
            "rank": self.engine.rank,
            "world_size": self.engine.world_size,
            "frozen_numel": frozen,
            "frozen_local_bytes": local_bytes,
            "dtype": str(self.model.compute_dtype),
            "simplex_sha256": digest.hexdigest(),
        }
        folder = self.out / "ranks"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{self.engine.rank}.json").write_text(json.dumps(facts) + "\n")

    def cleanup(self) -> None:
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        self.engine.end()


def prepare_output_dir(cfg: Config) -> None:
    """Refuse to overwrite a finished run or checkpoints by accident (before anything is loaded)."""
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir={str(out)!r} is a file; choose a folder")
    taken = (out / "final").exists() or latest_checkpoint(out) is not None
    if taken and cfg.train.resume == "none" and not cfg.train.overwrite:
        raise ConfigError(
            f"train.output_dir={str(out)!r} already holds a run; pass train.resume=auto to continue it, "
            "train.overwrite=true to start over, or a new train.output_dir"
        )
    if cfg.train.resume not in ("none", "auto") and not (Path(cfg.train.resume) / "trainer_state.json").exists():
        raise ConfigError(f"train.resume={cfg.train.resume!r} is not a checkpoint folder (no trainer_state.json)")


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl row; a line cut short by a killed job counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str], bool]:
    parser = argparse.ArgumentParser(prog="python -m dist_subspace.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a YAML file; without it the embedded default runs")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. simplex.vertices=4")
    args = parser.parse_intermixed_args(argv)  # key=value words may stand before and after --config
    return args.config, args.overrides, args.local_rank is not None


def main(argv: list[str] | None = None) -> int:
    config_path, overrides, deepspeed_launcher = parse_args(argv)
    try:
        cfg = load_config(config_path, overrides)
        if deepspeed_launcher and cfg.engine.deepspeed is None:
            cfg.engine.deepspeed = "zero3_bf16"  # launched by `deepspeed`: it means DeepSpeed; ZeRO-3 by default
        prepare_output_dir(cfg)
    except ConfigError as err:
        return user_error(err)
    recipe = Recipe(cfg)
    try:
        recipe.setup()
    except USER_ERRORS as err:
        return user_error(err)
    out = recipe.out
    if recipe.engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "examples.json").write_text(json.dumps(recipe.splits.manifest()) + "\n")
        log = out / "metrics.jsonl"
        if recipe.step > 0 and log.exists():  # resumed: drop rows logged after the checkpoint was taken
            rows = [r for r in log.read_text().splitlines() if _logged_step(r) <= recipe.step]
            log.write_text("".join(f"{r}\n" for r in rows))
        if cfg.train.resume == "none":  # a fresh run (train.overwrite=true was checked): clear the old one
            for stale in ("checkpoints", "final"):
                shutil.rmtree(out / stale, ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
    recipe.engine.barrier()
    summary = recipe.train()
    recipe.log(json.dumps(summary))
    recipe.cleanup()
    return 0


if __name__ == "__main__":
    exit_now(main())
