"""The study's report from its cells (one per finished seed run): learning rates picked on dev, mean ± sample SD
per method and task, each method's paired difference against prefix tuning (K = 1) per task with its 95 % interval,
over tasks a within-task sign-flip permutation test with Holm's correction over the methods compared, and a plot.

Everything is computed from ``cells`` alone, which ``study.json`` stores: the table is rebuilt without rerunning. A
(task, model, method) whose learning-rate grid has not finished on every seed is missing, never selected among
the rates that happen to have finished.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dist_subspace.core.files import read_json, write_atomic, write_json
from dist_subspace.data.tasks import LOSS_METRICS
from dist_subspace.study.plot import plot
from dist_subspace.study.questions import answer, plot_gain_by_size, questions_markdown
from dist_subspace.study.spec import BASELINE, DERIVED, StudySpec
from dist_subspace.study.spread import metrics_rows, simplex_spread, spread_markdown
from dist_subspace.study.stats import holm, mean_sd, paired, sign_flip_test

Key = tuple[str, str, str]  # (task, model, method)


def grid_lrs(spec: StudySpec, method: str) -> list[float]:
    return spec.lora_lrs if method == "lora" else spec.lrs


def select_lrs(cells: list[dict], spec: StudySpec) -> dict[Key, float]:
    """Per (task, model, trained method): the learning rate with the best mean dev score over seeds (ties: the
    smaller rate), once every rate of its grid has every seed; until then the method has no selection there."""
    dev: dict[Key, dict[float, list[float]]] = {}
    sign: dict[Key, float] = {}  # -1 where dev is a loss (a generation task's default): the lowest mean wins
    for c in cells:
        key = (c["task"], c["model"], c["method"])
        dev.setdefault(key, {}).setdefault(c["lr"], []).append(c["dev"])
        sign[key] = -1.0 if c.get("select_metric") in LOSS_METRICS else 1.0
    chosen = {}
    for key, by_lr in dev.items():
        grid = grid_lrs(spec, key[2])
        if all(len(by_lr.get(lr, [])) == spec.seeds_for(key[1]) for lr in grid):
            chosen[key] = max(grid, key=lambda lr, by_lr=by_lr, s=sign[key]: (s * statistics.mean(by_lr[lr]), -lr))
    return chosen


def method_scores(cells: list[dict], spec: StudySpec) -> dict[Key, dict[int, float]]:
    """Test score per seed for each (task, model, method) at its dev-selected learning rate; a derived method
    (read from another method's runs) at its source's."""
    chosen = select_lrs(cells, spec)
    scores: dict[Key, dict[int, float]] = {}
    for c in cells:
        if chosen.get((c["task"], c["model"], c["method"])) != c["lr"]:
            continue
        scores.setdefault((c["task"], c["model"], c["method"]), {})[c["seed"]] = c["test"]
        for derived, (source, field) in DERIVED.items():
            if derived in spec.methods and c["method"] == source and c.get(field) is not None:
                scores.setdefault((c["task"], c["model"], derived), {})[c["seed"]] = c[field]
    return scores


def _versus(
    scores: dict[Key, dict[int, float]], spec: StudySpec, model: str, method: str, baseline: str
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """``method`` against ``baseline`` on ``model``: per task (where both have 2 or more common seeds) the paired
    difference, and over those tasks the sign-flip test (None where no task has one)."""
    per_task, pairs = {}, {}
    for task in spec.task_labels():
        mine, base = scores.get((task, model, method), {}), scores.get((task, model, baseline), {})
        versus = paired(mine, base)
        if versus:
            per_task[task] = versus
            pairs[task] = [(mine[k], base[k]) for k in sorted(set(mine) & set(base))]
    return per_task, (sign_flip_test(pairs) if pairs else None)


def convergence(cells: list[dict], spec: StudySpec) -> dict[Key, dict[str, Any]]:
    """Per (task, model, trained or viewed method) at its dev-selected rate: the mean final train loss over seeds and
    the share of seeds whose selected step is the last evaluation (dev still rising there: not converged)."""
    chosen = select_lrs(cells, spec)
    seen: dict[Key, list[dict]] = {}
    for c in cells:
        key = (c["task"], c["model"], c["method"])
        if chosen.get(key) == c["lr"] and c.get("last_eval_step") is not None:
            seen.setdefault(key, []).append(c)
    out = {}
    for key, group in seen.items():
        losses = [c["final_train_loss"] for c in group if c.get("final_train_loss") is not None]
        at_last = sum(c["selected_step"] == c["last_eval_step"] for c in group) / len(group)
        out[key] = {"final_loss": statistics.mean(losses) if losses else None, "at_last": at_last}
        out[key]["converged"] = at_last <= 0.5
    return out


def summarise(spec: StudySpec, cells: list[dict]) -> dict:
    """The table as data. Per model, per method: per task mean, sample SD and n, the convergence of its runs
    (:func:`convergence`), and the paired difference from K = 1 with its interval; ``vs_k1``: over the tasks where
    both ran, the mean of the per-task differences, its sign-flip p-value and the Holm-adjusted one (over the
    methods compared for that model)."""
    scores = method_scores(cells, spec)
    converged = convergence(cells, spec)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for model in spec.models:
        rows = table.setdefault(model, {})
        for method in spec.methods:
            row: dict[str, Any] = {}
            for task in spec.task_labels():
                mine = scores.get((task, model, method), {})
                if mine:
                    mean, sd = mean_sd(list(mine.values()))
                    row[task] = {"mean": mean, "sd": sd, "n": len(mine)}
                    row[task].update(converged.get((task, model, method), {}))
            if method != BASELINE:
                per_task, over = _versus(scores, spec, model, method, BASELINE)
                for task, versus in per_task.items():
                    row[task]["vs_k1"] = versus
                if over:
                    row["vs_k1"] = over
            if row:
                rows[method] = row
        family = {m: r["vs_k1"]["p"] for m, r in rows.items() if "vs_k1" in r}
        for method, adjusted in holm(family).items():
            rows[method]["vs_k1"]["p_holm"] = adjusted
    lrs = {"/".join(k): v for k, v in select_lrs(cells, spec).items()}
    return {"table": table, "selected_lr": lrs}


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _paired_cell(versus: dict[str, Any]) -> str:
    """One task's paired difference: points, its 95 % interval, wins/n."""
    low, high = versus["ci95"]
    return f"{_points(versus['mean_diff'])} [{_points(low)}, {_points(high)}] ({versus['wins']}/{versus['n']})"


def _task_count(n: int) -> str:
    return f"{n} task{'s' * (n != 1)}"


def _score_cell(r: dict[str, Any] | None) -> str:
    """``mean ± SD (n)`` ×100, then the final train loss and the share of seeds selected at the last evaluation;
    ``not converged`` where that share is over half."""
    if not r:
        return "—"
    text = f"{100 * r['mean']:.1f} ± {100 * r['sd']:.1f} ({r['n']})"
    if "at_last" in r:
        loss = f"loss {r['final_loss']:.3f}, " if r.get("final_loss") is not None else ""
        text += f"; {loss}last {100 * r['at_last']:.0f} %" + ("" if r["converged"] else " **not converged**")
    return text


def markdown(spec: StudySpec, summary: dict) -> str:
    """Per model: methods x tasks (mean ± SD over seeds, x100; the final train loss and the share of seeds whose
    selected step is the last evaluation; — where not finished), then each method's paired difference from K = 1
    per task with its 95 % interval, and over tasks with its p-values (sign flips; Holm)."""
    out = []
    labels = spec.task_labels()
    for model, rows in summary["table"].items():
        if not rows:
            continue
        head = ["method", *labels]
        seeds = spec.seeds_for(model)
        out += [
            f"**{model}**: test score ×100, mean ± SD over seeds (n of {seeds}); final train loss; share of "
            "seeds selected at the last evaluation (over half: not converged)",
            "",
        ]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, row in rows.items():
            out.append("| " + " | ".join([method, *(_score_cell(row.get(task)) for task in labels)]) + " |")
        head = ["method", *labels, "over tasks (p; Holm)"]
        out += ["", f"**{model}**: paired difference from {BASELINE}, points [95 % interval] (wins/n)", ""]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, row in rows.items():
            if method == BASELINE:
                continue
            cells = [method]
            for task in labels:
                v = row.get(task, {}).get("vs_k1")
                cells.append(_paired_cell(v) if v else "—")
            v = row.get("vs_k1")
            cells.append(
                f"{_points(v['mean_diff'])} (p={v['p']:.3f}; {v['p_holm']:.3f}, {_task_count(v['tasks'])})"
                if v
                else "—"
            )
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def diversity_curves(cells: list[dict], spec: StudySpec, methods: tuple[str, ...] = ("k3", "k3_centred")) -> dict:
    """Mean over seeds (at the selected rate) of the vertices' cos^2 (raw, centred) per step, per model/method."""
    chosen = select_lrs(cells, spec)
    curves: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for c in cells:
        if c["method"] not in methods or chosen.get((c["task"], c["model"], c["method"])) != c["lr"]:
            continue
        for row in metrics_rows(Path(c["folder"])):
            if row["split"] == "train" and "cos2" in row:
                key = f"{c['model']} {c['task']} {c['method']}"
                curves.setdefault(key, {}).setdefault(row["step"], []).append((row["cos2"], row["cos2_centred"]))
    return {
        key: {
            "steps": sorted(steps),
            "cos2": [statistics.mean(v[0] for v in steps[s]) for s in sorted(steps)],
            "cos2_centred": [statistics.mean(v[1] for v in steps[s]) for s in sorted(steps)],
        }
        for key, steps in curves.items()
    }


def spec_hash(spec: StudySpec) -> str:
    """A short hash of the resolved spec (every key, defaults included)."""
    return hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:16]


def spec_history(spec: StudySpec, previous: dict | None) -> list[dict]:
    """The spec changes a study has seen since its first results: the previous ``study.json``'s history, plus one
    entry (time, old and new hash, each changed key's old and new value) when its spec differs from ``spec``."""
    if not isinstance(previous, dict) or not previous.get("cells"):
        return []
    history = list(previous.get("spec_history", []))
    old = previous.get("spec", {})
    if previous.get("spec_hash", spec_hash(StudySpec(**old))) != spec_hash(spec):
        new = asdict(spec)
        changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        history.append({"at": when, "from": previous.get("spec_hash"), "to": spec_hash(spec), "changed": changed})
    return history


def report(spec: StudySpec, cells: list[dict], root: Path, kinds: dict[str, str], problems: Sequence[str] = ()) -> dict:
    """Write ``study.json``, ``study.md``, ``study.png`` (and ``gain_by_size.png`` with sizes) under ``root``;
    returns the summary (+ markdown). ``problems``: the units this run could not train (failed, or claimed by
    another process), listed first; a spec that changed since the first results is listed too."""
    root.mkdir(parents=True, exist_ok=True)
    summary = summarise(spec, cells)
    answers = answer(spec, method_scores(cells, spec))
    curves = diversity_curves(cells, spec)
    spread = simplex_spread(cells, select_lrs(cells, spec))
    history = spec_history(spec, read_json(root / "study.json"))
    text = questions_markdown(spec, answers) + "\n" + markdown(spec, summary)
    text += "\n**How much the simplex varies** (mean over seeds)\n\n" + spread_markdown(spread)
    if history:  # a change after results exist: which keys, when
        lines = [
            f"- {h['at']}: {', '.join(f'{k}: {v[0]!r} -> {v[1]!r}' for k, v in h['changed'].items())}" for h in history
        ]
        text = "**The spec changed after results existed**\n\n" + "\n".join(lines) + "\n\n" + text
    if problems:  # their cells are missing from the table above (a method needs every rate of its grid)
        text = "**Not trained in this run**\n\n" + "\n".join(f"- {line}" for line in problems) + "\n\n" + text
    record = {"spec": asdict(spec), "spec_hash": spec_hash(spec), "spec_history": history, "model_kinds": kinds}
    record.update(cells=cells, **summary, questions=answers, diversity=curves, spread=spread, problems=list(problems))
    write_json(root / "study.json", record, indent=1)
    write_atomic(root / "study.md", text + "\n")
    plot(spec, summary, curves, root / "study.png")
    plot_gain_by_size(spec, answers, root / "gain_by_size.png")
    return {**summary, "questions": answers, "cells": len(cells), "markdown": text, "output_dir": str(root)}


def compare(spec: StudySpec, cells: list[dict], method: str, versus: str) -> str:
    """``method`` against ``versus`` (any two methods, e.g. ``k3_last`` against ``k1_last``), as markdown per model:
    per task the paired difference with its 95 % interval and wins, over the tasks where both ran the sign-flip
    test (one comparison: no multiplicity correction)."""
    scores = method_scores(cells, spec)
    out = []
    for model in spec.models:
        per_task, over = _versus(scores, spec, model, method, versus)
        if over is None:
            continue
        labels = spec.task_labels()
        cells_md = [_paired_cell(per_task[task]) if task in per_task else "—" for task in labels]
        cells_md.append(f"{_points(over['mean_diff'])} (p={over['p']:.3f}, {_task_count(over['tasks'])})")
        out += [
            f"**{model}**: {method} − {versus}, points [95 % interval] (wins/n)",
            "",
            "| " + " | ".join([*labels, "over tasks"]) + " |",
            "|" + "---|" * (len(labels) + 1),
            "| " + " | ".join(cells_md) + " |",
            "",
        ]
    return "\n".join(out)


def rebuild(study_json: Path) -> dict:
    """The report again from a ``study.json`` alone (nothing is rerun)."""
    record = json.loads(study_json.read_text())
    spec = StudySpec(**record["spec"])
    return summarise(spec, record["cells"])
