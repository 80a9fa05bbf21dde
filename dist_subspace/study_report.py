"""The study's report from its cells (one per finished seed run): learning rates picked on dev, mean ± std per
method, the average over tasks, paired differences against prefix tuning (K = 1) with their p-values, a plot.

Everything is computed from ``cells`` alone, which ``study.json`` stores: the table is rebuilt without rerunning.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dist_subspace.files import write_atomic, write_json
from dist_subspace.study import BASELINE, DERIVED, StudySpec


def select_lrs(cells: list[dict]) -> dict[tuple[str, str, str], float]:
    """Per (task, model, method): the learning rate with the best mean dev score over seeds (ties: the
    smaller rate). Only rates whose every seed finished compete."""
    by_lr: dict[tuple[str, str, str], dict[float, list[float]]] = {}
    for c in cells:
        by_lr.setdefault((c["task"], c["model"], c["method"]), {}).setdefault(c["lr"], []).append(c["dev"])
    chosen = {}
    for key, lrs in by_lr.items():
        full = max(len(v) for v in lrs.values())
        complete = [lr for lr, v in lrs.items() if len(v) == full]
        chosen[key] = max(complete, key=lambda lr, lrs=lrs: (statistics.mean(lrs[lr]), -lr))
    return chosen


def method_scores(cells: list[dict], methods: list[str]) -> dict[tuple[str, str, str], dict[int, float]]:
    """Test score per seed for each (task, model, method), at the dev-selected learning rate."""
    chosen = select_lrs(cells)
    scores: dict[tuple[str, str, str], dict[int, float]] = {}
    for c in cells:
        key = (c["task"], c["model"], c["method"])
        if chosen.get(key) != c["lr"]:
            continue
        scores.setdefault(key, {})[c["seed"]] = c["test"]
        for derived, (source, field) in DERIVED.items():
            if derived in methods and c["method"] == source and c.get(field) is not None:
                scores.setdefault((c["task"], c["model"], derived), {})[c["seed"]] = c[field]
    return scores


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """Paired comparison of two methods over their common keys: mean difference, wins, t-test and Wilcoxon."""
    from scipy.stats import ttest_rel, wilcoxon

    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return None
    diffs = [a[k] - b[k] for k in keys]
    result = {"n": len(keys), "mean_diff": statistics.mean(diffs), "wins": sum(d > 0 for d in diffs)}
    result["ties"] = sum(d == 0 for d in diffs)
    if any(d != diffs[0] for d in diffs):
        result["t_p"] = float(ttest_rel([a[k] for k in keys], [b[k] for k in keys]).pvalue)
    if any(d != 0 for d in diffs):
        result["wilcoxon_p"] = float(wilcoxon(diffs).pvalue)
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarise(spec: StudySpec, cells: list[dict]) -> dict:
    """The table as data: per model, per method, per task: mean, std, n; the average over tasks; paired
    difference against K = 1 over every (task, seed) pair of that model."""
    scores = method_scores(cells, spec.methods)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for model in spec.models:
        rows = table.setdefault(model, {})
        for method in spec.methods:
            row: dict[str, Any] = {}
            for task in spec.tasks:
                values = list(scores.get((task, model, method), {}).values())
                if values:
                    mean, std = _mean_std(values)
                    row[task] = {"mean": mean, "std": std, "n": len(values)}
            complete = [row[t]["mean"] for t in spec.tasks if t in row]
            if len(complete) == len(spec.tasks):
                row["average"] = statistics.mean(complete)
            mine = {(t, s): v for t in spec.tasks for s, v in scores.get((t, model, method), {}).items()}
            base = {(t, s): v for t in spec.tasks for s, v in scores.get((t, model, BASELINE), {}).items()}
            if method != BASELINE:
                versus = paired({str(k): v for k, v in mine.items()}, {str(k): v for k, v in base.items()})
                if versus:
                    row["vs_k1"] = versus
            if row:
                rows[method] = row
    lrs = {"/".join(k): v for k, v in select_lrs(cells).items()}
    return {"table": table, "selected_lr": lrs}


def markdown(spec: StudySpec, summary: dict) -> str:
    """One table per model: methods x tasks (mean ± std over seeds, x100), the average, Δ vs K = 1 (p)."""
    out = []
    for model, rows in summary["table"].items():
        head = ["method", *spec.tasks, "average", f"Δ vs {BASELINE} (paired t p; wins)"]
        out += [f"**{model}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, row in rows.items():
            cells = [method]
            for task in spec.tasks:
                r = row.get(task)
                cells.append(f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f} (n={r['n']})" if r else "—")
            cells.append(f"{100 * row['average']:.1f}" if "average" in row else "—")
            v = row.get("vs_k1")
            if v:
                p = f"{v['t_p']:.3f}" if "t_p" in v else "n/a"
                cells.append(f"{100 * v['mean_diff']:+.1f} (p={p}; {v['wins']}/{v['n']})")
            else:
                cells.append("" if method == BASELINE else "—")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def diversity_curves(cells: list[dict], methods: tuple[str, ...] = ("k3", "k3_centred")) -> dict:
    """Mean over seeds (at the selected rate) of the vertices' cos^2 (raw, centred) per step, per model/method."""
    chosen = select_lrs(cells)
    curves: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for c in cells:
        if c["method"] not in methods or chosen.get((c["task"], c["model"], c["method"])) != c["lr"]:
            continue
        path = Path(c["folder"]) / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            row = json.loads(line)
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


def plot(spec: StudySpec, summary: dict, curves: dict, path: Path) -> None:
    """``study.png``: test score per method (mean ± std over seeds) for each task and model; the vertices'
    pairwise cos^2 (raw and centred) during training."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = summary["table"]
    blocks = [(m, t) for m in spec.models for t in spec.tasks if any(t in r for r in table.get(m, {}).values())]
    fig = Figure(figsize=(5 * len(blocks) + 5, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(blocks) + 1, squeeze=False)[0]
    for ax, (model, task) in zip(axes, blocks, strict=False):
        rows = summary["table"].get(model, {})
        names = [m for m in spec.methods if task in rows.get(m, {})]
        means = [100 * rows[m][task]["mean"] for m in names]
        stds = [100 * rows[m][task]["std"] for m in names]
        colours = ["tab:orange" if m.startswith("k3") else "tab:grey" if m == "none" else "tab:blue" for m in names]
        ax.bar(range(len(names)), means, yerr=stds, color=colours, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        if means:
            low = min(m - s for m, s in zip(means, stds, strict=True))
            ax.set_ylim(max(0.0, math.floor(low / 5) * 5 - 5), min(100.0, max(means) + max(stds) + 3))
        ax.set_title(f"{task}\n{model}", fontsize=9)
        ax.set_ylabel("test score ×100 (mean ± std over seeds)", fontsize=8)
    ax = axes[-1]
    for key, curve in curves.items():
        (line,) = ax.plot(curve["steps"], curve["cos2"], label=f"{key} raw")
        ax.plot(curve["steps"], curve["cos2_centred"], "--", color=line.get_color(), label=f"{key} centred")
    ax.set_xlabel("step")
    ax.set_ylabel("mean pairwise cos² of vertices")
    ax.set_title("vertex diversity during training", fontsize=9)
    if curves:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(spec: StudySpec, cells: list[dict], root: Path, kinds: dict[str, str]) -> dict:
    """Write ``study.json``, ``study.md`` and ``study.png`` under ``root``; returns the summary (+ markdown)."""
    root.mkdir(parents=True, exist_ok=True)
    summary = summarise(spec, cells)
    curves = diversity_curves(cells)
    text = markdown(spec, summary)
    record = {"spec": asdict(spec), "model_kinds": kinds, "cells": cells, **summary, "diversity": curves}
    write_json(root / "study.json", record, indent=1)
    write_atomic(root / "study.md", text + "\n")
    plot(spec, summary, curves, root / "study.png")
    return {**summary, "cells": len(cells), "markdown": text, "output_dir": str(root)}


def rebuild(study_json: Path) -> dict:
    """The report again from a ``study.json`` alone (nothing is rerun)."""
    record = json.loads(study_json.read_text())
    spec = StudySpec(**record["spec"])
    return summarise(spec, record["cells"])
