"""The study's questions, answered from its cells with the same statistics as the table (paired differences per seed,
the within-task sign-flip test over tasks, Holm's correction):

1. ``simplex``: does K = 3 beat K = 1 (both selected at the centroid)?
2. ``selection``: does the sampled dev metric pick better checkpoints than the centroid's, from the same K = 3 runs?
3. ``paper``: the paper's whole method (K = 3 selected by the sampled metric) against prefix tuning.

Each is asked over all tasks and sizes, then per sample size (over its tasks), per model; Holm's correction runs over
every p-value a model's questions give. ``gain_by_size`` is what the plot draws: per model and size, the per-seed
difference averaged over the tasks, with its 95 % t interval over seeds.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from dist_subspace.core.files import save_atomic
from dist_subspace.study.spec import StudySpec, task_label
from dist_subspace.study.stats import holm, mean_sd, sign_flip_test

QUESTIONS: dict[str, tuple[str, str, str]] = {
    "simplex": ("k3", "k1", "does K = 3 beat K = 1 (each selected at its centroid)?"),
    "selection": ("k3_sampled", "k3", "does the sampled dev metric pick better checkpoints than the centroid's?"),
    "paper": ("k3_sampled", "k1", "the paper's whole method against prefix tuning"),
}

Scores = dict[tuple[str, str, str], dict[int, float]]  # (task label, model, method) -> seed -> test score


def _pairs(scores: Scores, labels: list[str], model: str, method: str, versus: str) -> dict[str, list]:
    """Per task label, the (method, versus) test scores paired by seed (labels where both ran on 2+ seeds)."""
    out = {}
    for task in labels:
        mine, base = scores.get((task, model, method), {}), scores.get((task, model, versus), {})
        common = sorted(set(mine) & set(base))
        if len(common) >= 2:
            out[task] = [(mine[s], base[s]) for s in common]
    return out


def _by_seed(scores: Scores, labels: list[str], model: str, method: str, versus: str) -> dict[str, Any] | None:
    """The difference per seed averaged over the tasks where both ran on every one of those seeds, with its 95 % t
    interval over seeds (seeds are the independent replicates). None with fewer than 2 seeds."""
    from scipy import stats

    pairs = _pairs(scores, labels, model, method, versus)
    if not pairs:
        return None
    seeds = set.intersection(*(set(scores[(t, model, method)]) & set(scores[(t, model, versus)]) for t in pairs))
    if len(seeds) < 2:
        return None
    diffs = [
        statistics.mean(scores[(t, model, method)][s] - scores[(t, model, versus)][s] for t in pairs)
        for s in sorted(seeds)
    ]
    mean, sd = mean_sd(diffs)
    half = stats.t.ppf(0.975, len(diffs) - 1) * sd / len(diffs) ** 0.5
    return {"mean_diff": mean, "ci95": [mean - half, mean + half], "seeds": len(diffs), "tasks": len(pairs)}


def answer(spec: StudySpec, scores: Scores) -> dict[str, dict[str, dict[str, Any]]]:
    """Per model, per question: ``all`` (every task label) and per size, each with the sign-flip test over its tasks
    (``p``, ``p_holm``) and the per-seed difference averaged over tasks with its interval (``by_seed``)."""
    sizes = list(spec.sizes) or [""]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model in spec.models:
        answers: dict[str, dict[str, Any]] = {}
        for name, (method, versus, _) in QUESTIONS.items():
            if method not in spec.methods or versus not in spec.methods:
                continue
            groups = {"all": spec.task_labels()}
            if spec.sizes:
                groups.update({size: [task_label(t, size) for t in spec.tasks] for size in sizes})
            for group, labels in groups.items():
                pairs = _pairs(scores, labels, model, method, versus)
                if not pairs:
                    continue
                result = sign_flip_test(pairs)
                result["by_seed"] = _by_seed(scores, labels, model, method, versus)
                answers.setdefault(name, {})[group] = result
        family = {f"{q}/{g}": r["p"] for q, groups in answers.items() for g, r in groups.items()}
        for key, adjusted in holm(family).items():
            question, group = key.split("/", 1)
            answers[question][group]["p_holm"] = adjusted
        if answers:
            out[model] = answers
    return out


def questions_markdown(spec: StudySpec, answers: dict) -> str:
    """The answers as one table per model: question, group (all, or a size), mean difference over tasks in points,
    its 95 % interval over seeds, the sign-flip p and Holm's p."""
    out = []
    for model, questions in answers.items():
        out += [
            f"**{model}**: the questions (test points, mean over tasks of the paired difference; 95 % interval over "
            "seeds; sign-flip p over tasks; Holm over this model's questions)",
            "",
            "| question | size | difference [95 % interval] | seeds × tasks | p | Holm |",
            "|---|---|---|---|---|---|",
        ]
        for name, groups in questions.items():
            method, versus, _ = QUESTIONS[name]
            for group, r in groups.items():
                b = r["by_seed"]
                interval = f" [{100 * b['ci95'][0]:+.1f}, {100 * b['ci95'][1]:+.1f}]" if b else ""
                span = f"{b['seeds']} × {b['tasks']}" if b else f"{r['pairs']} pairs"
                out.append(
                    f"| {method} − {versus} | {group} | {100 * r['mean_diff']:+.1f}{interval} | {span} | "
                    f"{r['p']:.3f} | {r['p_holm']:.3f} |"
                )
        out.append("")
    return "\n".join(out)


def plot_gain_by_size(spec: StudySpec, answers: dict, path: Path) -> bool:
    """``gain_by_size.png``: per question (a panel), the difference against the sample size, one line per model,
    with its 95 % interval over seeds. False (nothing drawn) without sizes or answers per size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = list(spec.sizes)
    names = [q for q in QUESTIONS if any(q in a for a in answers.values())]
    if len(sizes) < 2 or not names:
        return False
    fig = Figure(figsize=(5 * len(names), 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        method, versus, title = QUESTIONS[name]
        for i, (model, questions) in enumerate(answers.items()):
            points = [(x, questions[name][s]["by_seed"]) for x, s in enumerate(sizes) if s in questions.get(name, {})]
            points = [(x, b) for x, b in points if b]
            if not points:
                continue
            xs = [x + 0.06 * (i - (len(answers) - 1) / 2) for x, _ in points]
            ys = [100 * b["mean_diff"] for _, b in points]
            low = [y - 100 * b["ci95"][0] for y, (_, b) in zip(ys, points, strict=True)]
            high = [100 * b["ci95"][1] - y for y, (_, b) in zip(ys, points, strict=True)]
            ax.errorbar(xs, ys, yerr=[low, high], fmt="o-", capsize=3, label=model)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_xlabel("training examples")
        ax.set_ylabel(f"{method} − {versus}, test points (95 % interval)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return True
