"""The padding of a generation run's training batches: ``python -m benchmarks.bench --generation padding
[--config configs/headlines.yaml] [--seeds 10] [--rounds 10]``.

How much of a micro-batch is padding at the run config's ``model.max_length`` and micro-batch, over the steps a run
draws (:func:`~dist_subspace.training.schedule.step_examples`, several seeds); what sorting by length within a
window of micro-batches (or the whole epoch) would leave; and, timed in one interleaved run, what the padding
costs a K = 3 step: each real batch as collated against itself cut to the width its real tokens would fill.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch

from benchmarks.generation import Progress, clock_name, interval
from benchmarks.sides import _optimizer_step, load_backbone
from benchmarks.timing import interleaved_times, ratios
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel


def padded_tokens(order: list[int], lengths: list[int], micro: int) -> int:
    """The tokens of ``order``'s micro-batches of ``micro`` examples, each padded to its longest."""
    return sum(
        len(rows) * max(lengths[i] for i in rows)
        for rows in (order[j : j + micro] for j in range(0, len(order), micro))
    )


def grouped_widths(lengths: list[int], order: list[int], micro: int, window: int) -> list[int]:
    """Micro-batch widths when each ``window`` consecutive examples of ``order`` are sorted by length before being
    cut into micro-batches of ``micro`` (``window`` = ``micro``: no grouping)."""
    widths = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        widths += [max(lengths[i] for i in chunk[j : j + micro]) for j in range(0, len(chunk), micro)]
    return widths


def padding_facts(
    config: str = "configs/headlines.yaml",
    seeds: int = 10,
    windows: tuple[int, ...] = (4, 16, 0),
    rounds: int = 10,
    warmup: int = 1,
    timed: bool = True,
    progress: Progress = None,
) -> dict:
    """Padding in the micro-batches of the run ``config`` describes, over its ``train.max_steps`` steps and
    ``seeds`` seeds (train.seed 0..seeds-1); with each ``window`` (in micro-batches; 0: the whole epoch) sorted by
    length first, what would be left; ``timed``: each of ``rounds`` real batches (seed 0's first steps) through a K
    = 3 step as collated, against the same batch cut to the width its real tokens fill (``ceil(real / B)``: no
    padding), interleaved (the cost of the padding, paired by round)."""
    from transformers import AutoTokenizer

    from dist_subspace.core.config import load_config
    from dist_subspace.core.embedded import resolve_model
    from dist_subspace.data.batching import Collator
    from dist_subspace.data.sources import load_splits
    from dist_subspace.training.schedule import grouped_step_examples, step_examples

    cfg = load_config(config, [])
    path = resolve_model(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = load_splits(**vars(cfg.data))
    collator = Collator(tokenizer, splits.task, True, cfg.model.max_length)
    train = splits.train
    lengths = [len(collator.encode(e)["input_ids"]) for e in train]
    micro, steps = cfg.train.micro_batch_size, cfg.train.max_steps
    global_batch = micro * cfg.train.grad_accum  # one process
    real = padded = 0
    grouped = {w: 0 for w in windows}
    trainer = {w: 0 for w in windows if w}  # train.group_by_length=w, the trainer's own grouped order
    key = tuple(lengths)
    for seed in range(seeds):
        for w in trainer:
            for step in range(steps):
                trainer[w] += padded_tokens(grouped_step_examples(key, seed, step, global_batch, w), lengths, micro)
        orders = [step_examples(len(train), seed, step, global_batch) for step in range(steps)]
        stream = [i for order in orders for i in order]
        for order in orders:
            real += sum(lengths[i] for i in order)
            padded += padded_tokens(order, lengths, micro)
        for w in windows:
            window = len(train) if w == 0 else w * micro
            grouped[w] += micro * sum(grouped_widths(lengths, stream, micro, window))
    result: dict = {
        "setup": {
            "config": config,
            "task": splits.task.name,
            "train_examples": len(train),
            "max_length": cfg.model.max_length,
            "micro_batch_size": micro,
            "grad_accum": cfg.train.grad_accum,
            "steps": steps,
            "seeds": seeds,
        },
        "lengths": {
            "min": min(lengths),
            "median": statistics.median(lengths),
            "mean": statistics.mean(lengths),
            "max": max(lengths),
        },
        "real_tokens": real,
        "batch_tokens": padded,
        "padding_share": 1 - real / padded,
        "grouped": {
            ("epoch" if w == 0 else f"{w}_micro_batches"): {"batch_tokens": g, "padding_share": 1 - real / g}
            for w, g in grouped.items()
        },
        "group_by_length": {str(w): {"batch_tokens": g, "padding_share": 1 - real / g} for w, g in trainer.items()},
    }
    if timed:
        result["timed"] = padding_cost(cfg, path, collator, train, lengths, rounds, warmup, progress)
    return result


def padding_cost(cfg, path, collator, train, lengths, rounds: int, warmup: int, progress: Progress) -> dict:
    """A K = 3 step (as the bench's ``k3``: ``response_nll``, regulariser, clipping, AdamW) on seed 0's batches as
    collated (``padded``) against each batch cut to ``ceil(real tokens / B)`` columns (``cut``: the width its tokens
    fill unpadded; a step's cost does not depend on which tokens), one batch a round, both sides on it."""
    from dist_subspace.training.schedule import step_examples

    backbone, _ = load_backbone(cfg.model.name_or_path, torch.float32, torch.device("cpu"))
    model = PrefixSubspaceModel(backbone, 3, cfg.prefix.length, label_token_ids=[])
    model.simplex.vertices.data.copy_(initial_vertices(model, seed=0))
    model.train()
    params = list(model.trainable_parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    micro = cfg.train.micro_batch_size
    batches, widths = [], []
    for step in range(warmup + rounds):
        order = step_examples(len(train), 0, step, micro)
        batch = collator([(i, train[i]) for i in order])
        batches.append(batch)
        widths.append((batch["input_ids"].shape[1], math.ceil(sum(lengths[i] for i in order) / micro)))
    at = {"padded": 0, "cut": 0}
    counter = torch.zeros((), dtype=torch.long)

    def side(name: str) -> Callable[[], None]:
        def step() -> None:
            batch = batches[at[name]]
            width = widths[at[name]][0 if name == "padded" else 1]
            at[name] += 1
            ids, mask, labels = (batch[k][:, :width] for k in ("input_ids", "attention_mask", "labels"))
            alpha = model.sample_alpha(counter, batch["index"])
            nll, count = model.response_nll(ids, mask, labels, alpha)
            (nll.sum() / count.sum().clamp(min=1) + model.regulariser()).backward()
            _optimizer_step(params, opt)

        return step

    times = interleaved_times({n: side(n) for n in at}, rounds, warmup, torch.device("cpu"), progress)
    clock = clock_name()
    r = ratios(times[clock], "padded")["cut"]
    return {
        "clock": clock,
        "rounds": rounds,
        "widths": widths[warmup:],
        "padded_median_s": statistics.median(times[clock]["padded"]),
        "cut_median_s": statistics.median(times[clock]["cut"]),
        "cut_over_padded": r,
        "padding_cost_share": 1 - r["paired"],
        "times_s": times[clock],
        "wall_times_s": times["wall"],
    }


def format_padding(result: dict) -> str:
    """A readable summary of :func:`padding_facts`."""
    s, n = result["setup"], result["lengths"]
    lines = [
        f"{s['config']}: {s['task']}, {s['train_examples']} train examples of {n['min']}–{n['max']} tokens (median "
        f"{n['median']}, mean {n['mean']:.1f}), max_length {s['max_length']}, micro-batch {s['micro_batch_size']}, "
        f"{s['steps']} steps x {s['seeds']} seeds",
        "| batches | tokens in batches | padding share |",
        "|---|---|---|",
        f"| random (the trainer's) | {result['batch_tokens']:,} | {100 * result['padding_share']:.1f} % |",
    ]
    for name, g in result["grouped"].items():
        what = "the whole epoch" if name == "epoch" else name.replace("_", " ")
        lines.append(f"| sorted by length within {what} | {g['batch_tokens']:,} | {100 * g['padding_share']:.1f} % |")
    for w, g in result.get("group_by_length", {}).items():
        lines.append(
            f"| the trainer's `train.group_by_length={w}` | {g['batch_tokens']:,} | {100 * g['padding_share']:.1f} % |"
        )
    lines.append(f"real tokens: {result['real_tokens']:,}")
    if "timed" in result:
        t = result["timed"]
        lines.append(
            f"K = 3 step, {t['rounds']} batches, {t['clock']} time: padded {t['padded_median_s']:.2f} s, cut to "
            f"its real tokens' width {t['cut_median_s']:.2f} s; cut / padded {interval(t['cut_over_padded'])}: the "
            f"padding costs {100 * t['padding_cost_share']:.1f} % of a step"
        )
    return "\n".join(lines)
