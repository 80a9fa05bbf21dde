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
