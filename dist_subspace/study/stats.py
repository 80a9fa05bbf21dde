"""The study's statistics, on plain numbers: paired differences with their t interval, a sign-flip permutation
test that keeps each pair in its task, and Holm's correction over the methods compared. scipy does the work (1.15
or later, pyproject's floor: ``permutation_test(rng=)``, and ``wilcoxon``'s exact p-value where a difference is 0)."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from typing import Any

PERMUTATIONS = 9999  # resamples of the sign-flip test (exact enumeration when 2^pairs is fewer)
PERMUTATION_SEED = 0  # the test's resamples are fixed: the same cells always give the same p-value


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and *sample* standard deviation (n - 1; 0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a: dict, b: dict, confidence: float = 0.95) -> dict[str, Any] | None:
    """``a`` against ``b`` over their common keys (seeds): the mean difference with its t interval, wins and ties,
    the paired t-test and the Wilcoxon signed-rank p-values. None for fewer than 2 common keys."""
    from scipy import stats

    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return None
    diffs = [a[k] - b[k] for k in keys]
    mean, sd = mean_sd(diffs)
    half = stats.t.ppf((1 + confidence) / 2, len(diffs) - 1) * sd / len(diffs) ** 0.5
    result = {"n": len(keys), "mean_diff": mean, "ci95": [mean - half, mean + half]}
    result.update(wins=sum(d > 0 for d in diffs), ties=sum(d == 0 for d in diffs))
    if any(d != diffs[0] for d in diffs):
        result["t_p"] = float(stats.ttest_rel([a[k] for k in keys], [b[k] for k in keys]).pvalue)
    if any(d != 0 for d in diffs):
        result["wilcoxon_p"] = float(stats.wilcoxon(diffs).pvalue)
    return result


def sign_flip_test(pairs: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """Over tasks: the mean over tasks of each task's mean paired difference, and its two-sided p-value under
    random sign flips of every (task, seed) difference (``scipy.stats.permutation_test``, ``samples``: the two
    scores of a pair swap, the pair stays in its task, so each task keeps its own weight and difficulty).

    ``pairs``: per task, its (method, baseline) scores paired by seed."""
    import numpy as np
    from scipy.stats import permutation_test

    tasks = [t for t, p in pairs.items() if p]
    x = np.array([m for t in tasks for m, _ in pairs[t]])
    y = np.array([b for t in tasks for _, b in pairs[t]])
    bounds = np.cumsum([0, *(len(pairs[t]) for t in tasks)])

    def statistic(x, y, axis=-1):  # x, y: [..., pairs]
        d = x - y
        return np.mean([d[..., lo:hi].mean(axis=-1) for lo, hi in itertools.pairwise(bounds)], 0)

    test = permutation_test(
        (x, y),
        statistic,
        permutation_type="samples",
        vectorized=True,
        n_resamples=PERMUTATIONS,
        rng=np.random.default_rng(PERMUTATION_SEED),
    )
    return {"tasks": len(tasks), "pairs": len(x), "mean_diff": float(test.statistic), "p": float(test.pvalue)}


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate): the k-th
    smallest is multiplied by (m - k + 1), then made monotone, capped at 1."""
    order = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted
