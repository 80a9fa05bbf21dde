"""``study.png``: what the study's question is about, per model: each method's paired difference from K = 1 per
task with its 95 % interval (and over tasks), beside the raw test scores per task; the vertices' diversity during
training underneath."""

from __future__ import annotations

import math
from pathlib import Path

from dist_subspace.core.files import save_atomic
from dist_subspace.study.spec import BASELINE, StudySpec


def _colour(method: str) -> str:
    return "tab:orange" if method.startswith("k3") else "tab:grey" if method == "none" else "tab:blue"


def plot(spec: StudySpec, summary: dict, curves: dict, path: Path) -> None:
    """Draw ``summary`` (from :func:`dist_subspace.study.report.summarise`) and the diversity ``curves``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = summary["table"]
    models = [m for m in spec.models if table.get(m)]
    tasks = {m: [t for t in spec.task_labels() if any(t in r for r in table[m].values())] for m in models}
    columns = 1 + max((len(t) for t in tasks.values()), default=0)
    fig = Figure(figsize=(4.2 * columns + 2, 4.2 * (len(models) + 1)))
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(models) + 1, columns, squeeze=False)
    for row, model in enumerate(models):
        _differences(grid[row][0], model, table[model], tasks[model], spec)
        for ax, task in zip(grid[row][1:], tasks[model], strict=False):
            _scores(ax, model, task, table[model], spec)
        for ax in grid[row][1 + len(tasks[model]) :]:
            ax.set_visible(False)
    _diversity(grid[-1][0], curves)
    for ax in grid[-1][1:]:
        ax.set_visible(False)
    fig.tight_layout()
    save_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))  # a reader never sees half a PNG


def _differences(ax, model: str, rows: dict, tasks: list[str], spec: StudySpec) -> None:
    """Per method, per task: the mean paired difference from K = 1 (points) with its 95 % interval; at the right,
    the mean over tasks."""
    methods = [m for m in spec.methods if m not in (BASELINE, "none") and m in rows]  # none: far off any scale
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        xs, ys, errors = [], [], [[], []]
        for j, task in enumerate([*tasks, "over tasks"]):
            v = rows[method].get("vs_k1") if task == "over tasks" else rows[method].get(task, {}).get("vs_k1")
            if not v:
                continue
            mean = 100 * v["mean_diff"]
            low, high = (100 * c for c in v["ci95"]) if "ci95" in v else (mean, mean)
            xs.append(j + (i - (len(methods) - 1) / 2) * width)
            ys.append(mean)
            errors[0].append(mean - low)
            errors[1].append(high - mean)
        ax.errorbar(xs, ys, yerr=errors, fmt="o", color=_colour(method), label=method, capsize=2, markersize=4)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks) + 1), [*tasks, "over tasks"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"test − {BASELINE}, points (95 % interval)", fontsize=8)
    ax.set_title(f"{model}: paired difference from {BASELINE}", fontsize=9)
    if methods:
        ax.legend(fontsize=6)


def _scores(ax, model: str, task: str, rows: dict, spec: StudySpec) -> None:
    names = [m for m in spec.methods if task in rows.get(m, {})]
    means = [100 * rows[m][task]["mean"] for m in names]
    sds = [100 * rows[m][task]["sd"] for m in names]
    ax.bar(range(len(names)), means, yerr=sds, color=[_colour(m) for m in names], capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    if means:
        low = min(m - s for m, s in zip(means, sds, strict=True))
        ax.set_ylim(max(0.0, math.floor(low / 5) * 5 - 5), min(100.0, max(means) + max(sds) + 3))
    ax.set_title(f"{task} ({model})", fontsize=9)
    ax.set_ylabel("test ×100 (mean ± SD over seeds)", fontsize=8)


def _diversity(ax, curves: dict) -> None:
    for key, curve in curves.items():
        (line,) = ax.plot(curve["steps"], curve["cos2"], label=f"{key} raw")
        ax.plot(curve["steps"], curve["cos2_centred"], "--", color=line.get_color(), label=f"{key} centred")
    ax.set_xlabel("step")
    ax.set_ylabel("mean pairwise cos² of vertices")
    ax.set_title("vertex diversity during training", fontsize=9)
    if curves:
        ax.legend(fontsize=6)
