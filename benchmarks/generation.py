"""Generation's bench: ``python -m benchmarks.bench --generation {train,decode,ensemble,padding}``.

- ``train``: a training step on prompt + response rows (a BBC article cut at its start so that it and its headline
  fill ``--seq-len`` tokens: no padding), the LM loss on the response tokens, on the sides of
  :mod:`benchmarks.sides` (``limit``, ``peft``, ``k1``, ``k3``), timed and measured by :func:`benchmarks.measure.
  measure` as the classification bench is (:func:`benchmarks.sides.headline_rows` makes the rows);
- ``decode``: greedy decoding of the same left-padded headline prompts, ``--max-new-tokens`` each (an end-of-
  sequence id the model cannot produce, so every side decodes exactly that many): this project's
  :func:`decode_rows` at the centroid of a K = 3 simplex (``centroid``) against transformers' own ``generate`` on
  the bare model (``limit``: no prefix; ``written``: the prefix's P tokens written out before each prompt, whose
  own keys and values the centroid is, so the two decode the same tokens), ``generate`` with the prefix handed
  in its cache (``hf_prefix``) and PEFT's own prefix-tuned ``generate`` with the exported centroid (``peft``);
  with ``--split``, each side once more at one new token (``@1``: the prompt's forward and one token), from which
  the cost of a token after the first follows, round by round;
- ``ensemble``: ``ensemble:S`` decoded as this project decodes it (the S points of each prompt stacked in one
  :func:`decode_rows` pass, their distributions mixed) against S separate single-point decodes of the same prompts
  (one pass per point), for each S of ``--points``;
- ``padding``: how much of a training batch is padding, and what it costs a step (:mod:`benchmarks.padding`).

Every timed measurement is one interleaved run (:mod:`benchmarks.timing`): the ratios are medians of per-round
ratios with distribution-free 95 % intervals; on one CPU thread the clock is the process's CPU time.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.sides import load_backbone
from benchmarks.timing import interleaved_times, ratios
from dist_subspace.core import simplex
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel

Progress = Callable[[str], None] | None


# ---- decoding --------------------------------------------------------------------------------------------------
PREFIX_TEXT = (
    " Write the headline of this BBC News article, short and factual, as the BBC's own editors would write it:"
)


DECODE_REFS = ("limit", "hf_prefix", "peft")  # the decode sides every side's time is divided by


@dataclass
class DecodeBench:
    """One backbone, a K = 3 simplex over it whose centroid is ``words``' own keys and values, and a batch of
    left-padded prompts."""

    model: PrefixSubspaceModel
    words: torch.Tensor  # [P] the prefix's tokens
    input_ids: torch.Tensor  # [B, S] left padded
    attention_mask: torch.Tensor  # [B, S]
    never: int  # an id the model cannot produce: no row ends early
    pad: int
    prompts: str  # where they come from


def decode_bench(model_name: str, prompts: int, prefix_length: int, backbone=None, tokenizer=None) -> DecodeBench:
    """Load the backbone (fp32, unless given), the simplex and ``prompts`` prompts: the test prompts of
    ``configs/headlines.yaml`` (bbc_headlines, first_n 160, dev 32, test 100; 120-word leads in the task's
    template) through the task's collator at 256 tokens; a model from a config: uniform ids of 3 lengths."""
    if backbone is None:
        backbone, tokenizer = load_backbone(model_name, torch.float32, torch.device("cpu"))
    vocab = backbone.config.vocab_size
    if tokenizer is not None:
        words = tokenizer(PREFIX_TEXT, add_special_tokens=False)["input_ids"]
        if len(words) < prefix_length:
            raise ValueError(f"--prefix-length {prefix_length}: the prefix text is {len(words)} tokens; use fewer")
        from dist_subspace.data.batching import Collator
        from dist_subspace.data.sources import load_splits

        splits = load_splits("bbc_headlines", "first_n", first_n=160, dev_size=32, test_size=100)
        batch = Collator(tokenizer, splits.task, True, 256).prompts(list(enumerate(splits.test[:prompts])))
        ids, mask, pad, source = (
            batch["input_ids"],
            batch["attention_mask"],
            tokenizer.pad_token_id,
            "bbc_headlines test",
        )
    else:
        g = torch.Generator().manual_seed(0)
        words = torch.randint(3, vocab, (prefix_length,), generator=g).tolist()
        ids = torch.randint(3, vocab, (prompts, 12), generator=g)
        mask = torch.ones_like(ids)
        for row in range(prompts):
            mask[row, : 3 * (row % 3)] = 0  # left padded: 12, 9 and 6 real tokens
        ids, pad, source = ids * mask, 0, "uniform random ids"
    words_t = torch.tensor(words[:prefix_length])
    model = PrefixSubspaceModel(backbone, 3, prefix_length, label_token_ids=[])
    own = model.kv_activations(words_t[None])  # [1, L, 2, H_kv, P, D]
    spread = initial_vertices(model, "activations", 0)
    with torch.no_grad():  # the vertices spread about the words' own keys and values, which are their centroid
        model.simplex.vertices.copy_(own + spread - spread.mean(0))
    model.eval()
    return DecodeBench(model, words_t, ids, mask, vocab, pad, source)


def _generate(backbone, ids: torch.Tensor, mask: torch.Tensor, n: int, never: int, pad: int, **kwargs) -> torch.Tensor:
    """transformers' greedy ``generate`` -> the new tokens ``[B, n]``."""
    out = backbone.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        do_sample=False,
        num_beams=1,
        eos_token_id=never,
        pad_token_id=pad,
        **kwargs,
    )
    return out[:, ids.shape[1] :]


def _written_out(words: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, pad: int) -> tuple[torch.Tensor, ...]:
    """Each left-padded prompt with ``words`` written before it (still left padded: pads, words, prompt)."""
    rows, width, p = ids.shape[0], ids.shape[1], len(words)
    out = ids.new_full((rows, width + p), pad)
    out_mask = torch.zeros_like(out)
    for row in range(rows):
        real = ids[row][mask[row].bool()]
        n = p + len(real)
        out[row, width + p - n :] = torch.cat([words, real])
        out_mask[row, width + p - n :] = 1
    return out, out_mask


def decode_sides(b: DecodeBench, n: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The centroid sides at ``n`` new tokens, each returning its tokens ``[B, n]``."""
    from dist_subspace.core import attention
    from dist_subspace.evaluation.decoding import Decoding, beam_rows, decode_rows

    model, rows = b.model, b.input_ids.shape[0]
    backbone = model.backbone
    alpha = simplex.expand_alpha(simplex.centroid_alpha(3), rows, model.alpha_rows)  # [B, L, K]
    zeros, groups = torch.zeros(rows, dtype=torch.long), torch.arange(rows)
    written, written_mask = _written_out(b.words, b.input_ids, b.attention_mask, b.pad)

    def limit() -> torch.Tensor:
        attention.disable(backbone)
        return _generate(backbone, b.input_ids, b.attention_mask, n, b.never, b.pad)

    def written_side() -> torch.Tensor:
        attention.disable(backbone)
        return _generate(backbone, written, written_mask, n, b.never, b.pad)

    def hf_prefix() -> torch.Tensor:  # generate() with the prefix in its cache, transformers' own attention
        attention.disable(backbone)
        decoding = Decoding(max_new_tokens=n)
        return beam_rows(model, b.input_ids, b.attention_mask, alpha, zeros, decoding, b.never, b.pad, False)

    def centroid() -> torch.Tensor:  # as predict/evaluate/generate decode: the prefix attention path
        attention.enable(backbone)
        new, _ = decode_rows(model, b.input_ids, b.attention_mask, alpha, zeros, groups, Decoding(n), b.never)
        return new

    peft_model = peft_centroid(model)

    def peft() -> torch.Tensor:  # PEFT's own prefix-tuned generate() with the exported centroid
        attention.disable(backbone)
        return _generate(peft_model, b.input_ids, b.attention_mask, n, b.never, b.pad)

    return {"limit": limit, "written": written_side, "hf_prefix": hf_prefix, "peft": peft, "centroid": centroid}


def peft_centroid(model: PrefixSubspaceModel):
    """PEFT's ``PeftModel`` over ``model``'s backbone with the centroid, as ``final/peft_centroid`` exports it."""
    import tempfile
    from pathlib import Path

    from peft import PeftModel

    from dist_subspace.core.export import save_peft_centroid

    with tempfile.TemporaryDirectory() as folder:
        save_peft_centroid(model.simplex.vertices.detach(), model.geometry, "", Path(folder))
        return PeftModel.from_pretrained(model.backbone, folder).eval()


def ensemble_sides(b: DecodeBench, n: int, points: int) -> dict[str, Callable[[], torch.Tensor]]:
    """``ensemble:S`` of every prompt: ``stacked:S`` (S rows a prompt in one :func:`decode_rows` pass, mixed) and
    ``separate:S`` (S passes, one point each), both through the prefix attention path."""
    from dist_subspace.core import attention
    from dist_subspace.evaluation.decoding import Decoding, decode_rows
    from dist_subspace.evaluation.points import mode_points, rows_alpha

    model, rows = b.model, b.input_ids.shape[0]
    index = torch.arange(rows)
    pts = mode_points(model, "ensemble", points, "example_layer")
    alphas = [rows_alpha(p, index, model.alpha_rows) for p in pts]  # S x [B, L, K]
    stacked_alpha = torch.stack(alphas, dim=1).flatten(0, 1)  # [B * S, L, K]: each prompt's S points together
    ids, mask = b.input_ids.repeat_interleave(points, 0), b.attention_mask.repeat_interleave(points, 0)
    groups = torch.arange(rows).repeat_interleave(points)
    zeros = torch.zeros(rows * points, dtype=torch.long)

    def stacked() -> torch.Tensor:
        attention.enable(model.backbone)
        return decode_rows(model, ids, mask, stacked_alpha, zeros, groups, Decoding(n), b.never)[0]

    def separate() -> torch.Tensor:
        attention.enable(model.backbone)
        one = torch.zeros(rows, dtype=torch.long)
        out = [
            decode_rows(model, b.input_ids, b.attention_mask, a, one, index, Decoding(n), b.never)[0] for a in alphas
        ]
        return torch.stack(out, dim=1)  # [B, S, n]

    return {f"stacked:{points}": stacked, f"separate:{points}": separate}


def _timed(steps: dict[str, Callable[[], torch.Tensor]], rounds: int, warmup: int, progress: Progress) -> dict:
    """Every side once (its tokens), then timed interleaved: ``{"tokens": ..., "cpu": ..., "wall": ...}``."""
    tokens = {name: step() for name, step in steps.items()}
    times = interleaved_times(dict(steps), rounds, warmup, torch.device("cpu"), progress)  # outputs dropped
    return {"tokens": tokens, **times}


def clock_name() -> str:
    return "cpu" if torch.get_num_threads() == 1 else "wall"


def _setup(b: DecodeBench, model_name: str, n: int, rounds: int, warmup: int) -> dict:
    from benchmarks.measure import environment

    real = b.attention_mask.sum(1)
    return {
        "model": model_name,
        "dtype": "float32",
        "prompts": b.input_ids.shape[0],
        "prompt_tokens": {"width": b.input_ids.shape[1], "min": int(real.min()), "max": int(real.max())},
        "source": b.prompts,
        "prefix_length": len(b.words),
        "max_new_tokens": n,
        "rounds": rounds,
        "warmup": warmup,
        "clock": clock_name(),
        "interleaved": "one decode of every side per round, order reversed every other round",
        **environment(torch.device("cpu")),
    }


def decode_facts(
    model_name: str = "smollm2-135m",
    prompts: int = 8,
    max_new_tokens: int = 16,
    prefix_length: int = 16,
    rounds: int = 8,
    warmup: int = 1,
    split: bool = False,
    bench: DecodeBench | None = None,
    progress: Progress = None,
) -> dict:
    """The centroid sides (:func:`decode_sides`), interleaved: seconds a decode, new tokens a second, every side
    over ``limit``, ``hf_prefix`` and ``peft``; whether the prefix sides decode the same tokens; ``split``: each
    side at one new token too, and the cost of each later token, per round (its ratios too)."""
    b = bench or decode_bench(model_name, prompts, prefix_length)
    steps = decode_sides(b, max_new_tokens)
    if split:
        steps |= {f"{name}@1": step for name, step in decode_sides(b, 1).items()}
    run = _timed(steps, rounds, warmup, progress)
    clock, rows = clock_name(), b.input_ids.shape[0]
    times = run[clock]
    main = [name for name in steps if "@" not in name]
    result: dict = {"setup": _setup(b, model_name, max_new_tokens, rounds, warmup), "sides": {}}
    for name in main:
        t = times[name]
        result["sides"][name] = {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "new_tokens_per_s": rows * max_new_tokens / statistics.median(t),
            "times_s": t,
            "wall_times_s": run["wall"][name],
        }
        if split:
            first = times[f"{name}@1"]
            later = [(a - f) / (max_new_tokens - 1) for a, f in zip(t, first, strict=True)]  # per round
            result["sides"][name] |= {
                "first_token_median_s": statistics.median(first),
                "first_token_times_s": first,
                "later_token_median_s": statistics.median(later),
                "later_token_times_s": later,
                "later_tokens_per_s": rows / statistics.median(later),
            }
    result["time_ratios"] = {f"over_{ref}": ratios({n: times[n] for n in main}, ref) for ref in DECODE_REFS}
    if split:
        first = {n: times[f"{n}@1"] for n in main}
        later = {n: result["sides"][n]["later_token_times_s"] for n in main}
        result["first_token_ratios"] = {f"over_{ref}": ratios(first, ref) for ref in DECODE_REFS}
        result["later_token_ratios"] = {f"over_{ref}": ratios(later, ref) for ref in DECODE_REFS}
    tokens = run["tokens"]
    result["tokens"] = {
        "all_decoded_max_new_tokens": all(
            t.shape == (rows, 1 if name.endswith("@1") else max_new_tokens) for name, t in tokens.items()
        ),
        "centroid_equals_written": tokens["centroid"].tolist() == tokens["written"].tolist(),
        "centroid_equals_hf_prefix": tokens["centroid"].tolist() == tokens["hf_prefix"].tolist(),
        "centroid_equals_peft": tokens["centroid"].tolist() == tokens["peft"].tolist(),
        "centroid_differs_from_limit": tokens["centroid"].tolist() != tokens["limit"].tolist(),
    }
    return result


def ensemble_facts(
    model_name: str = "smollm2-135m",
    prompts: int = 2,
    max_new_tokens: int = 16,
    prefix_length: int = 16,
    points: tuple[int, ...] = (4, 8),
    rounds: int = 8,
    warmup: int = 1,
    bench: DecodeBench | None = None,
    progress: Progress = None,
) -> dict:
    """:func:`ensemble_sides` for each S of ``points``, all in one interleaved run: seconds, response tokens a
    second (one response a prompt), and the speed-up of stacking (separate over stacked) with its interval."""
    b = bench or decode_bench(model_name, prompts, prefix_length)
    steps: dict[str, Callable[[], torch.Tensor]] = {}
    for s in points:
        steps |= ensemble_sides(b, max_new_tokens, s)
    run = _timed(steps, rounds, warmup, progress)
    clock, rows = clock_name(), b.input_ids.shape[0]
    times = run[clock]
    result: dict = {"setup": {**_setup(b, model_name, max_new_tokens, rounds, warmup), "points": list(points)}}
    result["sides"] = {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "rows_per_pass": rows * int(name.split(":")[1]) if name.startswith("stacked") else rows,
            "passes": 1 if name.startswith("stacked") else int(name.split(":")[1]),
            "response_tokens_per_s": rows * max_new_tokens / statistics.median(t),
            "times_s": t,
            "wall_times_s": run["wall"][name],
        }
        for name, t in times.items()
    }
    result["speedup"] = {}
    for s in points:
        pair = {"separate": times[f"separate:{s}"], "stacked": times[f"stacked:{s}"]}
        r = ratios(pair, "stacked")["separate"]  # separate over stacked: > 1 when stacking saves
        result["speedup"][f"ensemble:{s}"] = r
    result["tokens"] = {
        "all_decoded_max_new_tokens": all(t.shape[-1] == max_new_tokens for t in run["tokens"].values()),
    }
    return result


# ---- tables ----------------------------------------------------------------------------------------------------
def interval(r: dict) -> str:
    """A paired ratio and its 95 % interval: ``0.993 (0.935–1.043)``."""
    return f"{r['paired']:.3f} ({r['paired_ci95'][0]:.3f}–{r['paired_ci95'][1]:.3f})"


def _over(table: dict, name: str, ref: str) -> str:
    return "1" if name == ref else interval(table[f"over_{ref}"][name])


def format_train(result: dict) -> str:
    """A Markdown table of a ``--generation train`` result (:func:`benchmarks.measure.measure`)."""
    s = result["setup"]
    lines = [
        f"{s['model']}, {s['dtype']}, batch {s['batch']} x {s['seq_len']} tokens ({s['tokens']}), P = "
        f"{s['prefix_length']}, {s['rounds']} interleaved rounds, {s['clock']} time",
        "| side | s a step, median (min) | tokens/s | head rows | × limit | × peft | × k1 | peak, MiB | step, MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    over = result["time_ratios"]
    for name, side in result["sides"].items():
        cells = [f"`{name}`", f"{side['median_s']:.2f} ({side['min_s']:.2f})", f"{side['tokens_per_s']:.0f}"]
        head = side.get("head_rows")
        cells.append(str(head) if head is not None else "–")
        for ref in ("limit", "peft", "k1"):
            r = over.get(f"over_{ref}", {}).get(name)
            cells.append("1" if ref == name else (interval(r) if r else "–"))
        mem = side.get("memory")
        cells += [f"{mem['peak_bytes'] / 2**20:,.0f}", f"{mem['step_bytes'] / 2**20:,.0f}"] if mem else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_decode(result: dict) -> str:
    """A Markdown table of :func:`decode_facts`."""
    s, split = result["setup"], "later_token_ratios" in result
    lines = [
        f"{s['model']}, {s['dtype']}, {s['prompts']} prompts ({s['source']}, {s['prompt_tokens']['min']}–"
        f"{s['prompt_tokens']['max']} tokens, left padded to {s['prompt_tokens']['width']}), P = {s['prefix_length']}"
        f", {s['max_new_tokens']} new tokens each, greedy, {s['rounds']} interleaved rounds, {s['clock']} time",
    ]
    head = "| side | s a decode, median (min) | new tokens/s | × limit | × hf_prefix | × peft |"
    rule = "|---|---|---|---|---|---|"
    if split:
        head += " first token s | × limit | later token ms | later tokens/s | × limit | × hf_prefix | × peft |"
        rule += "---|---|---|---|---|---|---|"
    lines += [head, rule]
    for name, side in result["sides"].items():
        cells = [f"`{name}`", f"{side['median_s']:.2f} ({side['min_s']:.2f})", f"{side['new_tokens_per_s']:.1f}"]
        cells += [_over(result["time_ratios"], name, ref) for ref in DECODE_REFS]
        if split:
            cells += [f"{side['first_token_median_s']:.2f}", _over(result["first_token_ratios"], name, "limit")]
            cells += [f"{1e3 * side['later_token_median_s']:.0f}", f"{side['later_tokens_per_s']:.1f}"]
            cells += [_over(result["later_token_ratios"], name, ref) for ref in DECODE_REFS]
        lines.append("| " + " | ".join(cells) + " |")
    t = result["tokens"]
    lines.append(
        f"every side decoded {s['max_new_tokens']} tokens a prompt: {t['all_decoded_max_new_tokens']}; centroid = "
        f"written out: {t['centroid_equals_written']}; = hf_prefix: {t['centroid_equals_hf_prefix']}; = peft: "
        f"{t['centroid_equals_peft']}; differs from "
        f"the bare model: {t['centroid_differs_from_limit']}"
    )
    return "\n".join(lines)


def format_ensemble(result: dict) -> str:
    """A Markdown table of :func:`ensemble_facts`."""
    s = result["setup"]
    lines = [
        f"{s['model']}, {s['dtype']}, {s['prompts']} prompts ({s['source']}, {s['prompt_tokens']['min']}–"
        f"{s['prompt_tokens']['max']} tokens), P = {s['prefix_length']}, {s['max_new_tokens']} new tokens each, "
        f"{s['rounds']} interleaved rounds, {s['clock']} time",
        "| mode | stacked: rows a pass, s (min) | separate: passes, s (min) | response tokens/s, stacked / separate | "
        "speed-up of stacking |",
        "|---|---|---|---|---|",
    ]
    for points in s["points"]:
        a, b = result["sides"][f"stacked:{points}"], result["sides"][f"separate:{points}"]
        lines.append(
            f"| `ensemble:{points}` | {a['rows_per_pass']}, {a['median_s']:.2f} ({a['min_s']:.2f}) | {b['passes']} x "
            f"{b['rows_per_pass']}, {b['median_s']:.2f} ({b['min_s']:.2f}) | {a['response_tokens_per_s']:.2f} / "
            f"{b['response_tokens_per_s']:.2f} | {interval(result['speedup'][f'ensemble:{points}'])} |"
        )
    return "\n".join(lines)
