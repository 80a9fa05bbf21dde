"""The end of a run (the recipe's last stage): each replica's best dev simplex scored on test (and the last step's,
as a control for selection), its ``final/`` (simplex, PEFT export, model card), summary and landscape."""

from __future__ import annotations

import time

from safetensors.torch import save_file

from dist_subspace.core.files import write_json
from dist_subspace.evaluation.scoring import write_landscapes
from dist_subspace.training.assembly import replica_config
from dist_subspace.training.card import CardFacts, render_card
from dist_subspace.training.checkpoint import load_simplex_tensors, replica_slice, save_final, simplex_tensors
from dist_subspace.training.engine import parameter_counts
from dist_subspace.training.guards import stop_if_write_fails
from dist_subspace.training.runfolder import write_rank_facts

LANDSCAPE_CAP_PARAMETERS = 1_000_000_000  # above this backbone size the landscape scores a capped dev subset


class FinishStage:
    """The recipe's ``finish``: mixed into :class:`dist_subspace.training.recipe.Recipe`, whose state it reads
    (cfg, model, engine, splits, best, summaries, dirs, ...)."""

    def finish(self) -> list[dict]:
        """Score each replica's best dev simplex on test and write its ``final/``, summary and landscape; the same
        for each further selection rule (``eval.also_select_by``): ``test_final@RULE`` and ``final_by/RULE/``."""
        cfg, metric = self.cfg, self.task.metric
        if cfg.eval.test_last:  # the control for selection: the simplex as training left it
            selected_last = all(s == self.step for best in self.best.values() for s in best["steps"])
            lasts = self.validate("test", record=False) if not selected_last else None
            for summary, last in zip(self.summaries, lasts or [None] * self.replicas, strict=True):
                summary["test_last"] = last[metric] if last is not None else None  # None: filled in below
        # The further rules first, the primary last: the model then holds final/'s simplex (for the landscape).
        for rule in [*self.rules[1:], self.rules[0]]:
            primary = rule == self.rules[0]
            best = self.best[rule]
            if best["tensors"] is not None:
                load_simplex_tensors(self.model, best["tensors"])
            suffix = "" if primary else f"@{rule}"
            finals = self.validate("test", record=primary)
            for mode in cfg.eval.extra_test_modes:  # rows in metrics.jsonl for final/'s simplex (the primary rule)
                for summary, result in zip(self.summaries, self.validate("test", mode, record=primary), strict=True):
                    summary[f"test_final_{mode}{suffix}"] = result[metric]
            for r, (summary, final) in enumerate(zip(self.summaries, finals, strict=True)):
                summary[f"test_final{suffix}"] = final[metric]
                summary[f"selected_step{suffix}"] = best["steps"][r]
                if not primary:
                    summary[f"dev{suffix}"] = best["scores"][r]
                elif cfg.eval.test_last and summary["test_last"] is None:  # every replica selected the last step
                    summary["test_last"] = final[metric]
            self.log(
                f"test {metric} after training ({cfg.eval.mode}, selected by {rule}): "
                f"{format_values(self.summaries, f'test_final{suffix}')}"
            )
            self._save_finals(rule, "final" if primary else f"final_by/{rule_folder(rule)}", finals)
        select_metric = cfg.eval.select_metric or self.task.select_metric  # what dev_score is (a loss: lower)
        for r, summary in enumerate(self.summaries):
            summary.update(metric=metric, select_metric=select_metric, mode=cfg.eval.mode, replica=r)
        if cfg.eval.test_last:
            lasts = format_values(self.summaries, "test_last")
            self.log(f"test {metric} at the last step ({cfg.eval.mode}, no selection): {lasts}")
        with stop_if_write_fails(self.engine, [d / "summary.json" for d in self.dirs], self.out):
            if self.engine.is_main:  # last: a summary means the run is done (the study reads it so)
                for folder, summary in zip(self.dirs, self.summaries, strict=True):
                    write_json(folder / "summary.json", summary, indent=2)
        write_rank_facts(self.model, self.engine, self.out)
        if self.trace:
            save_file(self.trace, str(self.out / "ranks" / f"trace-rank-{self.engine.rank}.safetensors"))
        if cfg.eval.landscape:
            self._landscape()
        self.engine.barrier()
        return self.summaries

    def _save_finals(self, rule: str, name: str, finals: list[dict]) -> None:
        """Each replica's simplex as the model holds it now (``rule``'s best) into ``REPLICA/name/``; ``finals``:
        each replica's test row of it (the card's scores)."""
        cfg = self.cfg
        with stop_if_write_fails(self.engine, [d / name for d in self.dirs], self.out):  # the checkpoints stay
            if self.engine.is_main:
                tensors = simplex_tensors(self.model)
                for r, summary in enumerate(self.summaries):
                    info = {
                        "model": cfg.model.name_or_path,
                        "sampling": cfg.simplex.sampling,
                        "task": self.task.name,
                        "selected_step": self.best[rule]["steps"][r],
                        "selected_by": rule,
                        "dev_score": self.best[rule]["scores"][r],
                        "seed": cfg.train.seed + r,
                        "data_seed": cfg.data.seed + r,
                    }
                    tensors_r = replica_slice(tensors, r, cfg.simplex.vertices)
                    card = self._card(r, summary, rule, finals[r]) if name == "final" else None
                    save_final(self.dirs[r] / name, self.model, info, tensors_r, card)

    def _card(self, r: int, summary: dict, rule: str, scores: dict) -> str:
        """Replica ``r``'s model card (``final/README.md``), its simplex selected by ``rule`` and scored ``scores``
        on test."""
        facts = CardFacts(
            run_dir=str(self.dirs[r]),
            kind=self.model.spec.kind,
            num_layers=self.model.geometry.num_layers,
            splits=self.splits[r],
            summary=summary,
            dev_score=self.best[rule]["scores"][r],
            command=self.command,
            world_size=self.engine.world_size,
            replica=r if self.replicas > 1 else None,
            test_scores={k: v for k, v in scores.items() if isinstance(v, (int, float))},
        )
        return render_card(replica_config(self.cfg, r), facts)

    def _landscape(self) -> None:
        """The dev metric over the simplex (a 2-D slice: the same point in every layer); on a capped dev subset
        for big backbones, where each of its ~28 points costs a full dev pass."""
        cap = self.cfg.eval.landscape_examples
        if cap == -1:
            _, frozen, _ = parameter_counts(self.model)
            cap = 64 if frozen > LANDSCAPE_CAP_PARAMETERS else 0
        dev = [s.dev[:cap] if cap else s.dev for s in self.splits]
        start = time.perf_counter()
        write_landscapes(
            self.model,
            self.engine,
            dev,
            self.collator,
            self.task,
            self.dirs,
            self.cfg.eval.landscape_resolution,
            self.cfg.train.eval_batch_size,
        )
        self.log(f"landscape: {len(dev[0])} dev examples per replica, {time.perf_counter() - start:.1f} s")


def format_values(summaries: list[dict], key: str) -> str:
    """Each replica's ``key`` for the log: ``0.8160, 0.7950``."""
    return ", ".join(f"{s[key]:.4f}" for s in summaries)


def rule_folder(rule: str) -> str:
    """A selection rule as a folder name: ``sampled:8`` -> ``sampled-8``."""
    return rule.replace(":", "-")
