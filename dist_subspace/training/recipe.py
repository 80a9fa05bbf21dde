"""One run, as a recipe: setup / train_step / validate / save / finish / cleanup (torchtune style).

Data flows one way: config -> data -> backbone + simplex -> engine -> loop -> checkpoint / evaluate.

Seed replicas (``simplex.replicas=R``): R independent runs over one frozen backbone. Every micro-batch holds
``micro_batch_size`` examples of each replica, each mixed from its own replica's vertices with its own alphas;
losses, regulariser, gradient clipping and best-dev selection are per replica, so replica r ends where the
one-replica run with seeds ``train.seed + r`` and ``data.seed + r`` ends (up to floating-point order).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

from dist_subspace.core import attention, simplex
from dist_subspace.core.config import Config, ConfigError
from dist_subspace.data.batching import truncation_report
from dist_subspace.data.tasks import better
from dist_subspace.evaluation.decoding import Decoding
from dist_subspace.evaluation.metrics import task_loss
from dist_subspace.evaluation.scoring import evaluate_replicas
from dist_subspace.training.assembly import build, initialise, replica_dir
from dist_subspace.training.card import training_command
from dist_subspace.training.checkpoint import (
    apply_checkpoint,
    checkpoint_legacy_rule,
    latest_checkpoint,
    prune_checkpoints,
    put_replica,
    read_checkpoint,
    replica_slice,
    save_checkpoint,
    simplex_tensors,
)
from dist_subspace.training.engine import Engine, parameter_counts
from dist_subspace.training.finish import FinishStage, format_values
from dist_subspace.training.guards import NonFiniteGuard, stop_if_write_fails
from dist_subspace.training.reporting import MetricsLog
from dist_subspace.training.runfolder import prepare_run_folders
from dist_subspace.training.schedule import (
    grouped_step_examples,
    lr_factor,
    sampling_coordinates,
    step_examples,
)

NOISE_SALT = 0x6E015E  # the noise control's stream of hashed normals differs from the alphas'


class Recipe(FinishStage):
    """setup / train / validate / save / cleanup for one run (of R seed replicas)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        self.replicas = cfg.simplex.replicas
        self.dirs = [replica_dir(self.out, r, self.replicas) for r in range(self.replicas)]
        self.command = training_command(sys.argv, dict(os.environ))  # for the model card, before any launcher setup

    # ---- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.engine = engine = Engine(cfg)
        self.metrics = MetricsLog(cfg, engine, self.dirs)
        self.metrics.start_trackers(os.environ)  # before the model loads: a tracker that cannot start fails at once
        torch.manual_seed(cfg.train.seed)
        self.splits, self.collator, self.model, self.model_path = build(cfg, engine)
        self.task = self.splits[0].task
        for said in cfg.train.resolve_budget(len(self.splits[0].train), engine.world_size):  # a budget in epochs
            self.log(said)
        model, r, mb = self.model, self.replicas, cfg.train.micro_batch_size
        self.noise_std = initialise(cfg, model, self.collator.tokenizer, engine)  # [R, L] or None
        params = list(model.trainable_parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        t = cfg.train
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.schedule)
        )
        self.step = 0
        self.trace: dict[str, torch.Tensor] = {}
        # Per selection rule (eval.select_by first), per replica: the best dev score so far, its step and simplex.
        self.rules = cfg.eval.selection_rules()
        self.best: dict[str, dict] = {
            rule: {"scores": [None] * r, "steps": [None] * r, "tensors": None} for rule in self.rules
        }
        self.summaries: list[dict] = [{} for _ in range(r)]
        self.guard = NonFiniteGuard(cfg.train.skip_nonfinite, cfg.train.max_nonfinite_in_row)
        self.sampler = simplex.sample_alpha
        if cfg.engine.compile:
            self.sampler = torch.compile(simplex.sample_alpha, fullgraph=True, dynamic=False)
        # Rows of a micro-batch are replica-major: mb examples of replica 0, then of replica 1, ...
        device = engine.device
        self.replica_rows = torch.arange(r, device=device).repeat_interleave(mb) if r > 1 else None
        seeds = torch.tensor([cfg.train.seed + i for i in range(r)], device=device)
        self.seed_rows = seeds.repeat_interleave(mb) if r > 1 else cfg.train.seed
        # train.group_by_length: each replica's training examples' lengths in tokens, as the collator cuts them
        self.lengths = (
            [tuple(len(self.collator.encode(e)["input_ids"]) for e in splits.train) for splits in self.splits]
            if cfg.train.group_by_length
            else None
        )
        self._resume()
        # The sampler's step lives on the device: advanced in place, never read back by the host.
        self.step_tensor = torch.tensor(self.step, dtype=torch.long, device=device)
        self._log_setup()

    def _resume(self) -> None:
        """Rank 0 decides what to resume and sends it to every rank: on node-local disks the other nodes hold
        no (or an older) checkpoint, and must not start elsewhere."""
        choice, state, folder = self.cfg.train.resume, None, None
        if self.engine.is_main and choice != "none":
            folder = latest_checkpoint(self.out) if choice == "auto" else Path(choice)
            state = read_checkpoint(folder, checkpoint_legacy_rule(folder)) if folder is not None else None
        state = self.engine.broadcast_object(state)
        if state is None:
            return
        apply_checkpoint(state, self.model, self.optimizer, self.scheduler)
        missing = [rule for rule in self.rules if rule not in state["best"]]
        if missing:  # preflight refuses this before anything loads; a checkpoint changed since is refused here
            raise ConfigError(
                f"the checkpoint kept no best under {missing}; resume with its rules {list(state['best'])}"
            )
        self.step, self.best = state["step"], {rule: state["best"][rule] for rule in self.rules}
        saved_lr, lr = self.scheduler.base_lrs[0], self.cfg.train.lr
        if saved_lr != lr:  # the checkpoint's optimizer and scheduler carry the old rate: the config's wins
            sched = self.scheduler
            sched.base_lrs = [lr] * len(sched.base_lrs)
            rates = [lr * factor(sched.last_epoch) for factor in sched.lr_lambdas]  # the schedule at this step
            for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
                group["lr"], group["initial_lr"] = rate, lr
            sched._last_lr = rates  # what get_last_lr() reports for the next step
            self.log(f"train.lr changed on resume: {saved_lr:g} -> {lr:g}, applied from step {self.step + 1}")
        self.summaries = state.get("summaries") or self.summaries  # the initial test score, scored before step 0
        self.log(f"resumed from {folder} at step {self.step} (read by rank 0, sent to every rank)")

    def _log_setup(self) -> None:
        cfg, engine = self.cfg, self.engine
        trainable, frozen, local_bytes = parameter_counts(self.model)
        g = self.model.geometry
        global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * engine.world_size
        self.log(f"engine: {engine.describe()}")
        self.log(
            f"model: {self.model_path} ({self.model.spec.kind}), L={g.num_layers} H_kv={g.num_kv_heads} D={g.head_dim}"
        )
        s = cfg.simplex
        self.log(
            f"simplex: K={s.vertices} P={cfg.prefix.length} sampling={s.sampling} beta={s.beta} "
            f"regulariser={s.regulariser} init={cfg.prefix.init} adapter={cfg.model.adapter} noise={s.noise}"
        )
        if self.replicas > 1:
            self.log(
                f"seed replicas: R={self.replicas} (train.seed, data.seed) + 0..{self.replicas - 1}, "
                f"one backbone; folders {self.dirs[0].name} .. {self.dirs[-1].name}"
            )
        self.log(
            f"parameters: trainable {trainable:,} / frozen {frozen:,}; frozen bytes on this rank "
            f"{local_bytes / 2**20:.1f} MiB"
        )
        self.log(
            f"global batch {global_batch} = micro {cfg.train.micro_batch_size} x accumulation "
            f"{cfg.train.grad_accum} x world {engine.world_size} (per replica); {cfg.train.max_steps} optimizer steps"
        )
        s = self.splits[0]
        self.log(f"data: {s.task.name}: train {len(s.train)}, dev {len(s.dev)}, test {len(s.test)} (per replica)")
        if engine.is_main:
            self.log(truncation_report(self.collator, {"train": s.train, "dev": s.dev, "test": s.test}))

    def prepare_folders(self) -> None:
        """Write the resolved config(s) and example manifests; on resume set aside what was logged and saved
        after the checkpoint; on a fresh start clear what an overwritten run left. Main process only."""
        if self.engine.is_main:
            manifests = [s.manifest() for s in self.splits]
            for moved in prepare_run_folders(self.cfg, self.out, self.dirs, manifests, self.step):
                self.log(moved)

    # ---- logging ---------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.engine.is_main:
            print(f"[dist_subspace] {message}", flush=True)

    # ---- the loop --------------------------------------------------------------------------------
    def _noise(self, seed, index: torch.Tensor, replica: torch.Tensor | None) -> torch.Tensor | None:
        """The noise-injection control: N(0, std_l^2) per prefix element ``[B, L, 2, H_kv, P, D]``, hashed like the
        alphas (stateless, resume-exact), ``std_l`` matching a simplex's sampling spread in layer l."""
        if self.noise_std is None:
            return None
        shape = self.model.simplex.vertices.shape[1:]  # [L, 2, H_kv, P, D]
        z = simplex.hashed_normal(seed + NOISE_SALT, self.step_tensor, index, shape.numel()).view(len(index), *shape)
        std = self.noise_std[replica if replica is not None else torch.zeros_like(index)]  # [B, L]
        return z * std[:, :, None, None, None, None]

    def train_step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches on every rank; returns the mean task loss over
        the global batch of each replica ``[R]`` (on the device: read by the host only when logged)."""
        cfg, engine, model = self.cfg, self.engine, self.model
        mb, accum, world, r = cfg.train.micro_batch_size, cfg.train.grad_accum, engine.world_size, self.replicas
        orders, coords = [], []
        for i, splits in enumerate(self.splits):
            seed, global_batch = cfg.train.seed + i, mb * accum * world
            if self.lengths is None:
                order = step_examples(len(splits.train), seed, self.step, global_batch)
            else:
                order = grouped_step_examples(self.lengths[i], seed, self.step, global_batch, cfg.train.group_by_length)
            orders.append(order)
            coords.append(sampling_coordinates(order, len(splits.train)))
        model.train()
        total = torch.zeros(r, device=engine.device)
        for micro in range(accum):
            chunk = micro * world + engine.rank  # the same chunks whatever the world/accum split
            window = slice(chunk * mb, (chunk + 1) * mb)
            items = [
                (c, self.splits[i].train[e])
                for i in range(r)
                for e, c in zip(orders[i][window], coords[i][window], strict=True)
            ]
            batch = self.collator(items)
            if engine.device.type == "cuda":  # page-locked host memory: the copy overlaps with compute
                batch = {key: v.pin_memory() for key, v in batch.items()}
            batch = {key: v.to(engine.device, non_blocking=True) for key, v in batch.items()}
            index = batch["index"]
            alpha = self.sampler(
                self.seed_rows, self.step_tensor, index, model.num_vertices, model.alpha_rows, cfg.simplex.sampling
            )
            if cfg.train.trace:
                self.trace[f"step{self.step}.micro{micro}.index"] = index.cpu()
                self.trace[f"step{self.step}.micro{micro}.alpha"] = alpha.detach().cpu()
            noise = self._noise(self.seed_rows, index, self.replica_rows)
            if self.task.generation:  # token-level: the mean over each replica's response tokens
                ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
                nll, count = model.response_nll(ids, mask, labels, alpha, self.replica_rows, noise)  # [B] each
                per_replica = nll.view(r, mb).sum(1) / count.view(r, mb).sum(1).clamp(min=1) / accum
            else:
                logits = model(
                    batch["input_ids"],
                    batch["attention_mask"],
                    alpha,
                    batch.get("token_type_ids"),
                    self.replica_rows,
                    noise,
                )
                per_replica = task_loss(self.task, logits, batch["labels"], reduction="none").view(r, mb).mean(1)
                per_replica = per_replica / accum
            per_replica.sum().backward()  # replicas share no parameter: each gets its own run's gradient
            total += per_replica.detach()
        # identical on every rank
        reg = cfg.simplex.beta * model.regulariser(cfg.simplex.regulariser, cfg.simplex.regularise_head)
        if reg.requires_grad:
            reg.backward()
        params = list(model.trainable_parameters())
        total = engine.all_reduce_mean_grads(params, total)
        self.grad_norm = simplex.clip_grad_norm_per_replica(params, r, cfg.train.max_grad_norm)
        self.lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        if self.guard.step_is_finite(engine, total, self.grad_norm, self.step + 1, self.out):  # all ranks agree
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_tensor += 1
        self.step += 1
        return total

    def _train_rows(self, losses: torch.Tensor, rate: float) -> list[dict]:
        """Per replica: loss, regulariser, the vertices' diversity (cos^2 raw and centred, distances), lr..."""
        cfg, k = self.cfg, self.cfg.simplex.vertices
        rows = []
        for r in range(self.replicas):
            vertices = self.model.simplex.vertices.detach()[r * k : (r + 1) * k]
            centre = -2 if cfg.simplex.regulariser == "cos2_centred" else None
            reg = cfg.simplex.beta * simplex.cosine_regulariser(vertices, 1, centre).item()
            row = {"loss": losses[r].item(), "regulariser": reg, "lr": self.lr, "grad_norm": self.grad_norm[r].item()}
            row.update(simplex.diversity(vertices, centre_dim=-2) if self.model.use_prefix else {})
            if self.model.simplex.head is not None and k > 1:  # do the K heads stay apart? (cos^2 of weights)
                heads = self.model.simplex.head.weight.detach()[r * k : (r + 1) * k]
                row["head_cos2"] = simplex.cosine_regulariser(heads).item()
            rows.append({**row, "examples_per_s": rate})
        return rows

    def validate(self, split: str, mode: str | None = None, record: bool = True) -> list[dict]:
        """Score every replica on its own ``split`` examples; one metrics row each (``record``)."""
        mode = mode or self.cfg.eval.mode
        examples = [s.dev if split == "dev" else s.test for s in self.splits]
        e = self.cfg.eval
        decodes = self.task.generation and (split == "test" or e.dev_generation)  # generation metrics need texts
        decoding = Decoding(e.max_new_tokens, num_beams=e.num_beams, seed=self.cfg.train.seed) if decodes else None
        desc = f"{split} {mode}" if self.cfg.train.progress and split == "test" else None
        clock = time.perf_counter()
        results = evaluate_replicas(
            self.model,
            self.engine,
            examples,
            self.collator,
            self.task,
            mode,
            self.cfg.train.eval_batch_size,
            self.cfg.simplex.sampling,
            desc=desc,
            decoding=decoding,
        )
        seconds = time.perf_counter() - clock  # one stacked pass for every replica: the same in each row
        if record:
            rows = [{**{k: v for k, v in r.items() if k != "samples"}, "seconds": seconds} for r in results]
            self.metrics.record(self.step, split, rows)
        return results

    def _select(self, last_dev: list[dict]) -> None:
        """Per selection rule, per replica, keep its best dev simplex so far in memory (tiny). Each rule's dev score
        is logged as a dev row in its mode (a mode scored once however many rules share it)."""
        metric, k = self.cfg.eval.select_metric or self.task.select_metric, self.cfg.simplex.vertices
        scored = {self.cfg.eval.mode: last_dev}
        current = None
        for rule, best in self.best.items():
            if rule not in scored:
                scored[rule] = self.validate("dev", rule)
            for r, result in enumerate(scored[rule]):
                if better(metric, result[metric], best["scores"][r]):
                    current = simplex_tensors(self.model) if current is None else current
                    if best["tensors"] is None:
                        best["tensors"] = {n: t.clone() for n, t in current.items()}
                    put_replica(best["tensors"], replica_slice(current, r, k), r, k)
                    best["scores"][r], best["steps"][r] = result[metric], self.step

    def save(self) -> None:
        folder = self.out / "checkpoints" / f"step-{self.step}"
        with stop_if_write_fails(self.engine, [folder], self.out):  # e.g. a full disk: one line, the previous kept
            if self.engine.is_main:
                save_checkpoint(
                    folder, self.model, self.optimizer, self.scheduler, self.step, self.best, self.summaries
                )
                kept = [step for best in self.best.values() for step in best["steps"]]
                prune_checkpoints(self.out, self.cfg.train.keep_checkpoints, kept)

    def train(self) -> list[dict]:
        t, metric = self.cfg.train, self.task.metric
        if self.step == 0 and self.cfg.eval.initial_test:
            for summary, initial in zip(self.summaries, self.validate("test"), strict=True):
                summary["test_initial"] = initial[metric]
            self.log(f"test {metric} at the initial centroid: {format_values(self.summaries, 'test_initial')}")
        progress = None
        if t.progress and self.engine.is_main:
            from tqdm import tqdm

            progress = tqdm(total=t.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        global_batch = t.micro_batch_size * t.grad_accum * self.engine.world_size * self.replicas
        clock, losses = time.perf_counter(), []

        def due(every: int) -> bool:
            return self.step % every == 0 or self.step == t.max_steps

        first_step = self.step + 1
        attention.attention_paths.clear()
        while self.step < t.max_steps:
            losses.append(self.train_step())
            if self.step == first_step:  # which attention paths one step took (the check that the fast path runs)
                paths = ", ".join(f"{p} x{n}" for p, n in attention.attention_paths.items()) or "transformers' own"
                self.log(f"attention: {self.model.config._attn_implementation}: {paths}")
            if progress is not None:
                progress.update(1)
            if due(t.log_every):
                stacked = torch.stack(losses)  # [steps, R]; skipped non-finite steps are counted, not averaged
                mean = stacked.masked_fill(~stacked.isfinite(), math.nan).nanmean(0)  # [R]
                rate = global_batch * len(losses) / (time.perf_counter() - clock)
                skipped = self.guard.log_fields()
                self.metrics.record(self.step, "train", [{**row, **skipped} for row in self._train_rows(mean, rate)])
                if progress is not None:
                    progress.set_postfix(loss=f"{mean.mean().item():.4f}", ex_s=f"{rate:.1f}")
                clock, losses = time.perf_counter(), []
            if due(t.eval_every):
                self._select(self.validate("dev"))
            if due(t.save_every):
                self.save()
        if progress is not None:
            progress.close()
        return self.finish()

    def cleanup(self) -> None:
        self.engine.end_trackers()
        self.engine.end()
