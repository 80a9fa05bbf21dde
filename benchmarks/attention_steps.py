"""The sides of the attention benchmark (:mod:`benchmarks.attention`): one training step each on a shared backbone,
this project's K-vertex step on ``prefix_sdpa`` or on transformers' SDPA, PEFT's prefix tuning and the no-prefix
limit; timed with the shared harness (:mod:`benchmarks.timing`), with the bytes each keeps for backward and the
attention paths it takes. The speed bench adds these sides with
``sides.update(attention_sides(backbone, input_ids, attention_mask, words))``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.timing import Step, interleaved_times, ratio
from dist_subspace.core import attention
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel, last_real_token_only


@dataclass
class Side:
    """One way of running a training step: ``prepare`` (switch the attention implementation; untimed) then
    ``step``. Calling the side does both."""

    prepare: Step
    step: Step

    def __call__(self) -> None:
        self.prepare()
        self.step()


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


def pair_ratios(times: dict[str, list[float]], pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """``a_over_b`` for each pair of sides that ran: the ratio of the median times (``of_medians``), and the median
    of the per-round ratios (``paired``; a side and its reference ran back to back in each round)."""
    out: dict[str, dict[str, float]] = {"of_medians": {}, "paired": {}}
    for a, b in pairs:
        if a in times and b in times:
            r = ratio(times[a], times[b])
            out["of_medians"][f"{a}_over_{b}"], out["paired"][f"{a}_over_{b}"] = r["median"], r["paired"]
    return out


def timed_summary(sides: dict[str, Side], rounds: int, pairs, device: torch.device) -> dict:
    """The sides timed interleaved (:func:`benchmarks.timing.interleaved_times`, ``prepare`` untimed), summarised:
    the headline clock is CPU time on a CPU (the machine may be shared), wall time on a GPU."""
    steps, prepare = {n: s.step for n, s in sides.items()}, {n: s.prepare for n, s in sides.items()}
    times = interleaved_times(steps, rounds, warmup=1, device=device, prepare=prepare)
    clock = "wall" if device.type == "cuda" else "cpu"
    return {
        "rounds": rounds,
        "clock": clock,
        "step_s": {name: statistics.median(t) for name, t in times[clock].items()},
        "ratios": pair_ratios(times[clock], pairs),
        "wall_ratios": pair_ratios(times["wall"], pairs),
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
