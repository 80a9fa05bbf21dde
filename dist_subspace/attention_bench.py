"""What the prefix attention path buys: ``python -m dist_subspace.attention_bench [--lengths 64,256,1024]``.

Prints one JSON object. For each input length, one training step of each *side*, timed interleaved (every round
runs every side once, in a rotating order; median over rounds), so the ratios hold on a loaded machine:

- ``limit``: the frozen backbone with no prefix, gradients only to the input embeddings (what any prefix method
  costs at least: a full forward and backward through the frozen model);
- ``prefix``: this project's K-vertex training step (sample alpha, mix, forward, backward, AdamW) on ``prefix_sdpa``;
- ``default``: the same step on transformers' SDPA (explicit mask, repeated key/value heads);
- ``peft``: PEFT prefix tuning (K = 1, same P) on transformers' SDPA, its LM head on the same B rows as ours.

Memory: bytes held for backward per step (every tensor autograd saves, parameters excluded), and on a GPU the
peak allocated. ``--gpu`` (:mod:`dist_subspace.attention_gpu`, also a section of ``launch/gpu_check.sh``) adds
which SDPA kernel runs with a prefix, on a Llama-shaped bf16 model with 8 key/value heads.

The speed bench adds these sides with ``sides.update(attention_sides(backbone, input_ids, attention_mask, words))``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dist_subspace import attention
from dist_subspace.model import PrefixSubspaceModel, initial_vertices, last_real_token_only

Step = Callable[[], None]


@dataclass
class Side:
    """One way of running a training step: ``prepare`` (switch the attention implementation; untimed) then
    ``step``. Calling the side does both."""

    prepare: Step
    step: Step

    def __call__(self) -> None:
        self.prepare()
        self.step()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Steps:
    """Training steps on one backbone: this project's K-vertex step and the frozen-backbone limit, for any batch."""

    def __init__(self, backbone: nn.Module, label_token_ids: Sequence[int], prefix_length: int, num_vertices: int):
        self.backbone = backbone
        self.device = backbone.get_input_embeddings().weight.device
        self.words = torch.tensor(list(label_token_ids), device=self.device)
        model = PrefixSubspaceModel(backbone, num_vertices, prefix_length, label_token_ids=label_token_ids)
        model.place(self.device)
        model.simplex.vertices.data.copy_(initial_vertices(model, "normal", seed=0))
        self.model, self.optimizer = model, torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
        self.step_tensor = torch.zeros((), dtype=torch.long, device=self.device)

    def labels(self, batch: int) -> torch.Tensor:
        return torch.arange(batch, device=self.device) % len(self.words)

    def subspace(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Step:
        model, optimizer, labels = self.model, self.optimizer, self.labels(len(input_ids))
        index = torch.arange(len(input_ids), device=self.device)

        def step() -> None:
            alpha = model.sample_alpha(self.step_tensor, index)
            loss = F.cross_entropy(model(input_ids, attention_mask, alpha), labels)
            (loss + model.regulariser()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def limit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Step:
        backbone, words, labels = self.backbone, self.words, self.labels(len(input_ids))
        embeddings = backbone.get_input_embeddings()

        def step() -> None:  # no prefix: transformers' SDPA runs is_causal, its fast path
            embeds = embeddings(input_ids).detach().requires_grad_()  # [B, S, H]
            with last_real_token_only(backbone.base_model, attention_mask):  # the LM head on B rows, as ours
                out = backbone(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
            F.cross_entropy(out.logits[:, -1, words].float(), labels).backward()

        return step

    def enable(self) -> None:
        attention.enable(self.backbone)

    def disable(self) -> None:
        attention.disable(self.backbone)


def attention_sides(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    label_token_ids: Sequence[int],
    prefix_length: int = 8,
    num_vertices: int = 3,
    peft: bool = True,
) -> dict[str, Side]:
    """One training step per side (see the module docstring) on ``input_ids``/``attention_mask`` ``[B, S]`` for a
    causal LM ``backbone``; each side sets the attention implementation it needs, so sides may alternate. PEFT
    reads the last real token through the same hook as ours."""
    steps = _Steps(backbone, label_token_ids, prefix_length, num_vertices)
    subspace = steps.subspace(input_ids, attention_mask)
    sides = {
        "limit": Side(steps.disable, steps.limit(input_ids, attention_mask)),
        "prefix": Side(steps.enable, subspace),
        "default": Side(steps.disable, subspace),
    }
    if peft:
        from peft import PrefixTuningConfig, get_peft_model

        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_length)
        peft_model = get_peft_model(backbone, config).to(steps.device)
        peft_optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
        labels = steps.labels(len(input_ids))

        def peft_step() -> None:  # the LM head on the same contiguous B rows as ours (see last_real_token_only)
            with last_real_token_only(backbone.base_model, attention_mask):
                out = peft_model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
            F.cross_entropy(out.logits[:, -1, steps.words].float(), labels).backward()
            peft_optimizer.step()
            peft_optimizer.zero_grad(set_to_none=True)

        sides["peft"] = Side(steps.disable, peft_step)
    return sides


def padding_sides(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    label_token_ids: Sequence[int],
    prefix_length: int = 8,
    num_vertices: int = 3,
) -> dict[str, Side]:
    """What right padding buys, on one right-padded batch ``[B, S]`` and the same rows padded on the left:
    ``before`` (transformers' SDPA, left padding: this project until the prefix path), ``prefix_left`` (the
    prefix path's masked fallback), ``prefix_right`` (the prefix path, no mask), ``limit`` (no prefix)."""
    lengths = attention_mask.sum(1, keepdim=True)
    width = attention_mask.shape[1]
    order = (torch.arange(width, device=input_ids.device)[None] - (width - lengths)) % width  # roll right by pads
    left_ids, left_mask = input_ids.gather(1, order), attention_mask.gather(1, order)
    steps = _Steps(backbone, label_token_ids, prefix_length, num_vertices)
    return {
        "limit": Side(steps.disable, steps.limit(input_ids, attention_mask)),
        "before": Side(steps.disable, steps.subspace(left_ids, left_mask)),
        "prefix_left": Side(steps.enable, steps.subspace(left_ids, left_mask)),
        "prefix_right": Side(steps.enable, steps.subspace(input_ids, attention_mask)),
    }


def interleaved_seconds(sides: dict[str, Side], rounds: int, warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Every side's step time per round, ``wall`` and ``cpu`` (this process's CPU time: on a shared machine it
    leaves out the time the OS gave to other processes); ``prepare`` untimed. Round r starts at side r mod n, so
    no side always runs first or after the same one."""
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sides[name].prepare()
            _sync()
            wall, cpu = time.perf_counter(), time.process_time()
            sides[name].step()
            _sync()
            times["wall"][name].append(time.perf_counter() - wall)
            times["cpu"][name].append(time.process_time() - cpu)
    return times


def ratios(times: dict[str, list[float]], pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """``a_over_b`` for each pair: the ratio of the median times, and the median of the per-round ratios (a side
    and its reference ran back to back in each round, so load that drifts over the run cancels out)."""
    out: dict[str, dict[str, float]] = {"of_medians": {}, "paired": {}}
    for a, b in pairs:
        if a in times and b in times:
            key = f"{a}_over_{b}"
            out["of_medians"][key] = statistics.median(times[a]) / statistics.median(times[b])
            out["paired"][key] = statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))
    return out


def timed_summary(sides: dict[str, Side], rounds: int, pairs, device: torch.device) -> dict:
    """Interleaved timing, summarised: the headline clock is CPU time on a CPU (the machine may be shared), wall
    time on a GPU (kernels run asynchronously; synchronised around each step)."""
    times = interleaved_seconds(sides, rounds)
    clock = "wall" if device.type == "cuda" else "cpu"
    return {
        "rounds": rounds,
        "clock": clock,
        "step_s": {name: statistics.median(t) for name, t in times[clock].items()},
        "ratios": ratios(times[clock], pairs),
        "wall_ratios": ratios(times["wall"], pairs),
        "step_s_all": times,
    }


def saved_for_backward_bytes(step: Step, exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``step`` (``exclude``: parameters,
    resident anyway): the activation memory a training step holds at its peak."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def step_attention_paths(step: Step) -> dict[str, int]:
    """The prefix attention paths ``step`` took, with their call counts."""
    attention.attention_paths.clear()
    step()
    return dict(attention.attention_paths)


def compare_steps(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    label_token_ids: Sequence[int],
    rounds: int = 10,
    prefix_length: int = 8,
    peft: bool = True,
) -> dict:
    """Median step seconds per side, their ratios, bytes saved for backward, and the attention paths taken."""
    sides = attention_sides(backbone, input_ids, attention_mask, label_token_ids, prefix_length, peft=peft)
    params = [*backbone.parameters()]
    saved = {name: saved_for_backward_bytes(step, params) for name, step in sides.items()}
    paths = {name: step_attention_paths(sides[name]) for name in ("prefix", "default")}
    pairs = [(name, "limit") for name in sides if name != "limit"] + [("prefix", "default"), ("prefix", "peft")]
    return {
        "batch": len(input_ids),
        "seq_len": input_ids.shape[1],
        "prefix_length": prefix_length,
        **timed_summary(sides, rounds, pairs, input_ids.device),
        "saved_for_backward_mib": {k: v / 2**20 for k, v in saved.items()},
        "prefix_saved_over_default": saved["prefix"] / saved["default"],
        "attention_paths": paths,
    }


def compare_padding(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    label_token_ids: Sequence[int],
    rounds: int = 10,
    prefix_length: int = 8,
) -> dict:
    """:func:`padding_sides` timed interleaved: median step seconds, ratios, the attention paths taken."""
    sides = padding_sides(backbone, input_ids, attention_mask, label_token_ids, prefix_length)
    paths = {name: step_attention_paths(sides[name]) for name in ("prefix_left", "prefix_right")}
    pairs = [(name, "limit") for name in sides if name != "limit"]
    pairs += [("prefix_right", "before"), ("prefix_right", "prefix_left")]
    return {
        "batch": len(input_ids),
        "seq_len": input_ids.shape[1],
        "real_tokens": int(attention_mask.sum()),
        "prefix_length": prefix_length,
        **timed_summary(sides, rounds, pairs, input_ids.device),
        "attention_paths": paths,
    }


def random_batch(vocab: int, batch: int, length: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded random tokens ``[B, S]`` (ids 10..vocab-1, clear of special tokens) and an all-ones mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch, length), generator=gen).to(device)
    return ids, torch.ones_like(ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_subspace.attention_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded name, folder or hub id (CPU sides)")
    parser.add_argument(
        "--lengths", help="input lengths (tokens per example); 64,256,1024, or 512,2048,8192 with --gpu"
    )
    parser.add_argument("--batches", default="8,4,1", help="batch size per length")
    parser.add_argument("--prefix-length", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument(
        "--padding",
        action="store_true",
        help="what right padding buys: on a real padded batch (Rotten Tomatoes), or synthetic ones with --lengths",
    )
    parser.add_argument("--gpu", action="store_true", help="the GPU report instead (Llama-shaped bf16 model)")
    parser.add_argument("--gpu-layers", type=int, default=2)
    args = parser.parse_args(argv)
    lengths = [int(x) for x in (args.lengths or ("512,2048,8192" if args.gpu else "64,256,1024")).split(",")]
    if args.gpu:
        from dist_subspace.attention_gpu import gpu_report

        print(json.dumps(gpu_report(lengths, args.gpu_layers, rounds=args.rounds)))
        return 0
    from transformers import AutoModelForCausalLM

    from dist_subspace.embedded import resolve_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model(args.model)
    backbone = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).to(device).eval()  # no pickles
    for p in backbone.parameters():
        p.requires_grad_(False)
    result: dict = {"model": args.model, "device": str(device), "threads": torch.get_num_threads()}
    if args.padding and args.lengths:  # synthetic: row i of B keeps S - i * S / 2B tokens, right-padded
        result["padding"] = {}
        for length, batch in zip(lengths, [int(x) for x in args.batches.split(",")], strict=False):
            ids, mask = random_batch(backbone.config.vocab_size, batch, length, device)
            for i in range(batch):
                mask[i, length - i * length // (2 * batch) :] = 0
            row = compare_padding(backbone, ids * mask, mask, [11, 12], args.rounds, args.prefix_length)
            result["padding"][str(length)] = row
        print(json.dumps(result))
        return 0
    if args.padding:
        from transformers import AutoTokenizer

        from dist_subspace.batching import Collator, label_token_ids
        from dist_subspace.data import load_splits

        tokenizer = AutoTokenizer.from_pretrained(path)
        splits = load_splits("rotten_tomatoes", shots_per_class=4, seed=0, test_size=100)
        batch = Collator(tokenizer, splits.task, decoder=True)(list(enumerate(splits.train)))
        words = label_token_ids(tokenizer, splits.task.label_words)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        result["padding"] = compare_padding(backbone, ids, mask, words, args.rounds, args.prefix_length)
        print(json.dumps(result))
        return 0

    batches = [int(x) for x in args.batches.split(",")]
    if len(batches) != len(lengths):
        parser.error(f"--batches gives {len(batches)} sizes for {len(lengths)} lengths")
    result["lengths"] = {}
    for length, batch in zip(lengths, batches, strict=True):
        ids, mask = random_batch(backbone.config.vocab_size, batch, length, device)
        row = compare_steps(backbone, ids, mask, [11, 12], args.rounds, args.prefix_length, peft=not args.no_peft)
        result["lengths"][str(length)] = row
        print(json.dumps({"progress": length, **row["ratios"]["paired"]}), file=sys.stderr, flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
