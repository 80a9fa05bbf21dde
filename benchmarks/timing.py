"""The one timing harness of every benchmark: steps interleaved round by round, per-round ratios with a
distribution-free confidence interval of their median.

On a CPU the headline clock is the process's CPU time (with one thread it equals the wall time on an idle machine,
and it leaves out the time other jobs held the core); on a GPU the wall time, synchronised around each step.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

Step = Callable[[], None]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    steps: dict[str, Step],
    rounds: int,
    warmup: int,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
    prepare: dict[str, Step] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """``{"wall": {side: seconds}, "cpu": {side: seconds}}`` of each side's step, ``rounds`` of them after
    ``warmup`` untimed rounds; one step of every side per round, in alternating order (A B C, C B A, ...), so that
    a slow spell of the machine lands on all sides. ``prepare[side]`` (untimed) runs before each of its steps."""
    names = list(steps)
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if prepare is not None and name in prepare:
                prepare[name]()
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            synchronize(device)
            if r >= warmup:
                times["wall"][name].append(time.perf_counter() - wall)
                times["cpu"][name].append(time.process_time() - cpu)
        if progress is not None:
            progress(f"round {r + 1 - warmup}/{rounds}" if r >= warmup else f"warm-up round {r + 1}/{warmup}")
    return times


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order statistics ``[x_(k), x_(n+1-k)]`` with the
    largest k whose binomial tail ``P(Binomial(n, 1/2) < k)`` stays within ``(1 - confidence) / 2``; with too few
    values for that, the range (which then covers less)."""
    x, n = sorted(values), len(values)
    k, tail = 0, 0.0
    while k < n // 2 and tail + math.comb(n, k) / 2**n <= (1 - confidence) / 2:
        tail += math.comb(n, k) / 2**n
        k += 1
    return (x[k - 1], x[n - k]) if k else (x[0], x[-1])


def ratio(times: Sequence[float], base: Sequence[float]) -> dict:
    """``times`` over ``base``, round by round: the median of the per-round ratios (``paired``: the two steps of a
    round ran side by side, so this one cancels the machine's drift best) with its 95 % interval (``paired_ci95``;
    a difference this run resolves lies outside it), the ratio of the medians and of the minima."""
    paired = [a / b for a, b in zip(times, base, strict=True)]
    return {
        "paired": statistics.median(paired),
        "paired_ci95": list(median_ci(paired)),
        "median": statistics.median(times) / statistics.median(base),
        "min": min(times) / min(base),
    }


def ratios(times: dict[str, list[float]], ref: str) -> dict[str, dict]:
    """Every side's :func:`ratio` over side ``ref``."""
    return {name: ratio(t, times[ref]) for name, t in times.items()}
