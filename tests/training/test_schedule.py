"""What a step sees: the plain stream of epoch permutations and its length-grouped variant (train.group_by_length),
both pure functions of (seed, step)."""

import random
from collections import Counter

import pytest

from dist_subspace.core.config import ConfigError, TrainConfig
from dist_subspace.training.schedule import grouped_step_examples, step_examples

LENGTHS = tuple(random.Random(0).choice([20, 40, 150, 250]) + random.Random(i).randrange(10) for i in range(40))


def _width(steps: list[list[int]], micro: int) -> int:
    """Tokens the micro-batches hold, padded to their longest row."""
    return sum(
        len(s[j : j + micro]) * max(LENGTHS[e] for e in s[j : j + micro])
        for s in steps
        for j in range(0, len(s), micro)
    )


@pytest.mark.parametrize("global_batch,window", [(8, 4), (8, 1), (6, 3), (16, 5)])
def test_a_window_holds_the_plain_streams_examples_sorted_into_like_lengths(global_batch, window):
    steps = range(2 * window)  # two whole windows
    plain = [step_examples(len(LENGTHS), 3, s, global_batch) for s in steps]
    grouped = [grouped_step_examples(LENGTHS, 3, s, global_batch, window) for s in steps]
    for first in (0, window):  # the same examples, as often: epochs stay whole across windows
        span = slice(first, first + window)
        assert Counter(e for s in grouped[span] for e in s) == Counter(e for s in plain[span] for e in s)
    assert all(len(s) == global_batch for s in grouped)
    for s in grouped:  # each step shortest first: its micro-batches are cut from a sorted run
        assert [LENGTHS[e] for e in s] == sorted(LENGTHS[e] for e in s)
    assert _width(grouped, 2) < _width(plain, 2)


def test_the_grouped_order_depends_only_on_seed_and_step():
    ask = [grouped_step_examples(LENGTHS, 1, s, 4, 4) for s in (7, 2, 5, 0)]  # any order of asking
    again = [grouped_step_examples(LENGTHS, 1, s, 4, 4) for s in (0, 2, 5, 7)]
    assert ask == [again[3], again[1], again[2], again[0]]
    assert [grouped_step_examples(LENGTHS, 2, s, 4, 4) for s in range(4)] != [
        grouped_step_examples(LENGTHS, 1, s, 4, 4) for s in range(4)
    ]
    # the window's steps come in a seeded order, not shortest first every window
    firsts = [min(LENGTHS[e] for e in grouped_step_examples(LENGTHS, seed, 0, 4, 8)) for seed in range(8)]
    assert len(set(firsts)) > 1


def test_a_negative_window_is_refused():
    with pytest.raises(ConfigError, match=r"train\.group_by_length"):
        TrainConfig(group_by_length=-1)
