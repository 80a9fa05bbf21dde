"""How much the trained simplex varies, per method and task (mean over seeds at the selected learning rate), read
from the run folders: does every point of the subspace score the same, or do its points differ?

- ``selected_step``: the step the dev score picked;
- ``cos2``, ``cos2_centred``: the vertices' mean pairwise cos² at the last step (raw, and centred over their P
  positions, which removes what all prefix tokens of a layer share);
- ``sampled_dev_sd``: the sample SD over the S draws of ``sampled:S`` at the last evaluation of the dev metric that
  selects (the task's metric; a generation task's dev loss per token), the spread of the paper's
  non-deterministic metric;
- ``landscape_range``: the largest minus the smallest dev metric over the landscape's grid on the triangle (the
  same point in every layer), when the runs drew it;
- ``centre_gap``: on that grid, the dev metric at the centroid minus the mean of the K vertices' (positive: the
  centre is a better model than the corners it mixes).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from dist_subspace.core.files import read_json


def metrics_rows(folder: Path) -> list[dict]:
    """A run folder's ``metrics.jsonl`` rows (none when it has none)."""
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_spread(folder: Path, metric: str | None) -> dict[str, float]:
    """One seed's numbers (those its run folder has); ``metric``: the task's metric, whose sampled SD is read (None
    for a run that did not record it: no SD then, rather than another metric's)."""
    rows, out = metrics_rows(folder), {}
    train = [r for r in rows if r["split"] == "train" and "cos2" in r]
    if train:
        out["cos2"], out["cos2_centred"] = train[-1]["cos2"], train[-1]["cos2_centred"]
    sampled = [r for r in rows if r["split"] == "dev" and str(r.get("mode", "")).startswith("sampled:")]
    if sampled and isinstance(sampled[-1].get(f"{metric}_std"), (int, float)):
        out["sampled_dev_sd"] = sampled[-1][f"{metric}_std"]
    landscape = read_json(folder / "landscape.json")
    if isinstance(landscape, dict) and landscape.get("values"):
        out["landscape_range"] = max(landscape["values"]) - min(landscape["values"])
        gap = centre_gap(landscape["points"], landscape["values"])
        if gap is not None:
            out["centre_gap"] = gap
    return out


def centre_gap(points: list[list[float]], values: list[float]) -> float | None:
    """The metric at the grid point nearest the centroid minus the mean over the vertices (points ``[N, K]``,
    values ``[N]``); None without a vertex."""
    k = len(points[0])
    centre = min(range(len(points)), key=lambda i: sum((a - 1 / k) ** 2 for a in points[i]))
    corners = [v for p, v in zip(points, values, strict=True) if max(p) > 1 - 1e-6]
    return values[centre] - statistics.mean(corners) if corners else None


def simplex_spread(cells: list[dict], chosen: dict[tuple[str, str, str], float]) -> dict[str, dict[str, Any]]:
    """Per ``"model task method"`` (trained methods at their selected rate ``chosen``): each number's mean over seeds,
    and ``seeds``."""
    groups: dict[str, list[dict]] = {}
    for c in cells:
        if chosen.get((c["task"], c["model"], c["method"])) != c["lr"]:
            continue
        metric = c.get("select_metric") or c.get("metric")  # what sampled:S ranks checkpoints by
        numbers = {"selected_step": c["selected_step"], **run_spread(Path(c["folder"]), metric)}
        groups.setdefault(f"{c['model']} {c['task']} {c['method']}", []).append(numbers)
    spread = {}
    for key, seeds in groups.items():
        names = sorted({name for s in seeds for name in s if s[name] is not None})
        row: dict[str, Any] = {"seeds": len(seeds)}
        for name in names:
            values = [s[name] for s in seeds if s.get(name) is not None]
            row[name] = statistics.mean(values)
        spread[key] = row
    return spread


def spread_markdown(spread: dict[str, dict[str, Any]]) -> str:
    """The spread as a table (cos² and ranges as they are, metrics x100)."""
    head = [
        "model task method",
        "selected step",
        "cos² raw",
        "cos² centred",
        "sampled dev SD ×100",
        "landscape range ×100",
        "centre − vertices ×100",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in spread.items():

        def cell(name: str, scale: float = 1.0, digits: int = 3, row=row) -> str:
            return f"{scale * row[name]:.{digits}f}" if name in row else "—"

        lines.append(
            f"| {key} | {cell('selected_step', digits=1)} | {cell('cos2')} | {cell('cos2_centred')} | "
            f"{cell('sampled_dev_sd', 100, 1)} | {cell('landscape_range', 100, 1)} | {cell('centre_gap', 100, 1)} |"
        )
    return "\n".join(lines)
