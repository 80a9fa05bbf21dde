"""One run, as a recipe: setup / train_step / validate / save / finish / cleanup (torchtune style).

Data flows one way: config -> data -> backbone + simplex -> engine -> loop -> checkpoint / evaluate.
"""

from __future__ import annotations

import hashlib
import json
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
from dist_subspace.config import Config
from dist_subspace.data import Collator, FewShotSplits, label_token_ids, load_splits
from dist_subspace.embedded import resolve_model
from dist_subspace.engine import Engine, parameter_counts
from dist_subspace.evaluation import evaluate, write_landscape
from dist_subspace.metrics import task_loss
from dist_subspace.model import PrefixSubspaceModel, initial_vertices
from dist_subspace.schedule import lr_factor, step_examples


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
