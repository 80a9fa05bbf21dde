"""What an optimizer step sees, as pure functions of (seed, step): its examples and its learning-rate factor.

No state: resume needs neither a data-loader position nor a scheduler object beyond the step.
"""

from __future__ import annotations

import functools
import math
from collections import Counter

import torch


@functools.lru_cache(maxsize=8)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    """One epoch's order, drawn once (an O(N) draw per epoch, not per step)."""
    return tuple(torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def step_examples(num_examples: int, seed: int, step: int, global_batch: int) -> list[int]:
    """The examples of optimizer step ``step``: a window on the stream of seeded epoch permutations.

    Depends only on (seed, step), so resume needs no data-loader state and the split over ranks and
    micro-batches does not change which examples a step sees.
    """
    start, out = step * global_batch, []
    epoch = start // num_examples
    while len(out) < global_batch:
        perm = _epoch_permutation(num_examples, seed, epoch)
        offset = start - epoch * num_examples if not out else 0
        out += perm[offset : offset + global_batch - len(out)]
        epoch += 1
    return out


@functools.lru_cache(maxsize=4)
def _grouped_window(lengths: tuple[int, ...], seed: int, first: int, global_batch: int, window: int) -> list[list[int]]:
    """The steps ``first .. first + window - 1`` of the plain stream, their examples sorted by length (ties in
    stream order) and dealt out again ``global_batch`` at a time, the resulting steps in a seeded order."""
    pool = [e for s in range(first, first + window) for e in step_examples(len(lengths), seed, s, global_batch)]
    pool.sort(key=lambda e: lengths[e])  # stable
    steps = [pool[j * global_batch : (j + 1) * global_batch] for j in range(window)]
    order = torch.randperm(window, generator=torch.Generator().manual_seed(seed * 100_003 + 7_919 * first + 1))
    return [steps[j] for j in order.tolist()]


def grouped_step_examples(lengths: tuple[int, ...], seed: int, step: int, global_batch: int, window: int) -> list[int]:
    """:func:`step_examples` grouped by length (``train.group_by_length``): the examples of each ``window``
    consecutive steps of the plain stream, sorted by their lengths ``[N]`` and cut into steps again, in a seeded
    order; each step's examples shortest first, so its micro-batches hold examples of like length. The window holds
    the same examples as often as the plain stream does (epochs stay whole across windows), and the order is still
    a pure function of (seed, step)."""
    first = step - step % window
    return list(_grouped_window(lengths, seed, first, global_batch, window)[step - first])


def sampling_coordinates(order: list[int], num_examples: int) -> list[int]:
    """The sampler's example coordinate for each entry of a step's ``order``: the example's index, plus
    ``num_examples`` times the number of earlier copies of it in the step. When the global batch exceeds the
    training set an example occurs several times in one step; each occurrence then draws its own alpha."""
    seen: Counter[int] = Counter()
    coordinates = []
    for i in order:
        coordinates.append(i + num_examples * seen[i])
        seen[i] += 1
    return coordinates


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up, then cosine / linear decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)
