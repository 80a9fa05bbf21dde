"""The study's statistics against independent computations: the sign-flip test's Monte-Carlo path (what a study of
more than 13 pairs runs) and its fixed seed, the boundary of its exact enumeration, and the paired tests at SciPy's
floor. Imports nothing but numpy, scipy and ``dist_subspace.study.stats``: runnable in a venv with only those."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest

from dist_subspace.study import stats
from dist_subspace.study.stats import PERMUTATIONS, paired, sign_flip_test

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
SCIPY_NEEDED = (1, 15)  # permutation_test(rng=), and wilcoxon's exact p with a zero difference (the test below)


def test_the_scipy_floor_is_what_the_statistics_need():
    """pyproject's ``scipy>=`` admits no release on which the report raises (``rng=``) or its Wilcoxon p changes:
    SciPy 1.11-1.14 fail the tests of this file (run in a venv with only scipy, numpy and pytest)."""
    (floor,) = re.findall(r'"scipy>=([0-9.]+)"', PYPROJECT.read_text())
    assert tuple(int(part) for part in floor.split(".")[:2]) >= SCIPY_NEEDED, floor


def _study(tasks: int, seeds: int, seed: int = 7) -> dict[str, list[tuple[float, float]]]:
    """Per task, (method, baseline) scores over ``seeds`` seeds: a small effect (+0.01) in noise (0.03)."""
    rng = np.random.default_rng(seed)
    return {
        f"task{t}": [
            (float(b + d), float(b))
            for b, d in zip(rng.uniform(0.6, 0.9, seeds), rng.normal(0.01, 0.03, seeds), strict=True)
        ]
        for t in range(tasks)
    }


def _weights(pairs: dict[str, list[tuple[float, float]]]) -> np.ndarray:
    """Each pair's difference weighted so that their sum is the test's statistic, the mean of the task means: a sign
    pattern s gives the statistic s @ weights."""
    return np.array([(m - b) / (len(pairs) * len(p)) for p in pairs.values() for m, b in p])


def _as_extreme(null: np.ndarray, observed: float) -> np.ndarray:
    """The sign patterns whose statistic is as far from 0 as the observed one (floating ties count)."""
    return np.abs(null) >= abs(observed) * (1 - 1e-9)


def test_sign_flip_test_on_50_pairs_draws_9999_resamples_with_a_fixed_seed_and_agrees_with_brute_force(monkeypatch):
    """5 tasks x 10 seeds, the study's shape: 2^50 sign patterns are too many to enumerate, so scipy draws 9,999.
    Their seed is fixed (the same cells always give the same p, whatever numpy's global state); the p-value agrees
    with 200,000 sign patterns drawn here and with the normal approximation of the statistic's null."""
    pairs = _study(5, 10)
    first = sign_flip_test(pairs)
    np.random.seed(123)  # the global state plays no part
    np.random.random(17)
    again = sign_flip_test(pairs)
    assert first == again
    assert first["tasks"] == 5 and first["pairs"] == 50
    weights = _weights(pairs)
    assert first["mean_diff"] == pytest.approx(weights.sum(), rel=1e-12)

    # Brute force: 200,000 sign patterns (standard error of p about 0.001; scipy's 9,999 about 0.007).
    rng, hits, draws = np.random.default_rng(2024), 0, 200_000
    for _ in range(draws // 20_000):
        signs = rng.choice([-1.0, 1.0], size=(20_000, weights.size))
        hits += int(_as_extreme(signs @ weights, weights.sum()).sum())
    assert first["p"] == pytest.approx(hits / draws, abs=0.03)
    # Normal approximation: under sign flips the statistic has mean 0 and variance sum(w^2).
    z = abs(weights.sum()) / math.sqrt((weights**2).sum())
    assert first["p"] == pytest.approx(math.erfc(z / math.sqrt(2)), abs=0.03)
    assert 0.05 < first["p"] < 0.5  # a p-value where the comparison means something

    # It is the seed that fixes p: another seed draws other resamples, another p (an exact test would not move).
    monkeypatch.setattr(stats, "PERMUTATION_SEED", stats.PERMUTATION_SEED + 1)
    other = sign_flip_test(pairs)
    assert other["p"] != first["p"] and other["p"] == pytest.approx(first["p"], abs=0.03)


def test_sign_flip_test_enumerates_every_pattern_up_to_13_pairs_and_draws_from_14(monkeypatch):
    """2^13 = 8,192 patterns are fewer than the 9,999 resamples: scipy enumerates them all, p is exactly the share
    of patterns as extreme (counted here over the same 8,192) and no seed moves it; at 14 pairs (16,384) it draws."""
    assert 2**13 <= PERMUTATIONS < 2**14
    pairs = {"a": _study(1, 7, seed=1)["task0"], "b": _study(1, 6, seed=2)["task0"]}  # 13 pairs, 2 tasks
    weights = _weights(pairs)
    null = np.array(list(itertools.product([-1.0, 1.0], repeat=13))) @ weights
    exact = _as_extreme(null, weights.sum()).mean()
    result = sign_flip_test(pairs)
    assert result["pairs"] == 13 and result["p"] == pytest.approx(exact, rel=1e-12)
    monkeypatch.setattr(stats, "PERMUTATION_SEED", stats.PERMUTATION_SEED + 1)
    assert sign_flip_test(pairs)["p"] == result["p"]

    more = {"a": pairs["a"], "b": [*pairs["b"], (0.75, 0.7)]}  # 14 pairs: drawn, so the seed matters
    drawn = sign_flip_test(more)["p"]
    monkeypatch.setattr(stats, "PERMUTATION_SEED", stats.PERMUTATION_SEED + 1)
    assert sign_flip_test(more)["p"] != drawn


def test_paired_tests_at_scipys_floor_wilcoxon_exact_with_a_zero_difference():
    """Differences 0.1, 0, 0.3, 0.2. Wilcoxon drops the zero: 3 positive differences, 1 of the 8 sign patterns as
    extreme on each side, p = 2 / 8 exactly (SciPy before 1.15 switched to a normal approximation here, 0.18).
    The t-test: t = mean / (sd / 2) on 3 degrees of freedom, whose distribution function has a closed form."""
    result = paired({0: 0.8, 1: 0.7, 2: 0.9, 3: 0.6}, {0: 0.7, 1: 0.7, 2: 0.6, 3: 0.4})
    diffs = [0.1, 0.0, 0.3, 0.2]
    assert result["n"] == 4 and result["wins"] == 3 and result["ties"] == 1
    assert result["wilcoxon_p"] == pytest.approx(2 / 8)
    mean, sd = sum(diffs) / 4, float(np.std(diffs, ddof=1))
    t = mean / (sd / 2)
    cdf = 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi  # Student t, 3 df
    assert result["t_p"] == pytest.approx(2 * (1 - cdf), rel=1e-9)
    half = 3.182446305284263 * sd / 2  # t(0.975, 3 df)
    assert result["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-9)
