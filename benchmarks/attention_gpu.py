"""Which SDPA kernel runs behind a prefix, and what it costs, on a Llama-shaped bf16 model (the GPU half of
:mod:`benchmarks.attention`): ``python -m benchmarks.attention --gpu``, and a section of
``launch/gpu_check.sh``. Runs on CPU too, with tiny shapes (tests/test_attention_bench.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from benchmarks.attention_steps import (
    attention_sides,
    random_batch,
    saved_for_backward_bytes,
    step_attention_paths,
    timed_summary,
)
from benchmarks.timing import Step
from dist_subspace.core import attention
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel

LLAMA_SHAPE = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000
)
SDPA_OPS = {  # profiler op name fragments -> SDPA backend
    "flash": "flash",
    "efficient": "efficient",
    "cudnn": "cudnn",
    "_math": "math",
}


def _kernels(step: Step) -> list[str]:
    """The SDPA backends whose ops ran during ``step`` (from the profiler's op names)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
    names = {e.name for e in prof.events() if "attention" in e.name or "flash" in e.name}
    return sorted({backend for fragment, backend in SDPA_OPS.items() for n in names if fragment in n})


def _allowed_backends(step: Step) -> list[str]:
    """The SDPA backends the step still runs under when restricted to each one alone (``sdpa_kernel``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ok = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                step()
            ok.append(backend.name.lower())
        except RuntimeError:
            pass
    return ok


def gpu_report(
    lengths: Sequence[int] = (512, 2048, 8192),
    num_layers: int = 2,
    batch: int = 1,
    rounds: int = 10,
    prefix_length: int = 16,
    shape: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
) -> dict:
    """On a Llama-shaped model (random weights, ``num_layers`` layers, 8 key/value heads by default): per length,
    which SDPA backend runs with a prefix (profiled, and which backends accept the step alone), step time and peak
    memory of ``prefix``, ``default`` and the no-prefix ``limit``, and the prefix path's equality with the default
    path (logits and vertex gradients). Runs anywhere; the figures that matter need a GPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    config = LlamaConfig(**(shape or LLAMA_SHAPE), num_hidden_layers=num_layers, max_position_embeddings=2**14)
    with device:  # built where it runs: no host copy of the weights
        backbone = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    words = [11, 12]
    report: dict = {"device": str(device), "dtype": str(dtype), "layers": num_layers, "lengths": {}}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    for length in lengths:
        ids, mask = random_batch(config.vocab_size, batch, length, device)
        sides = attention_sides(backbone, ids, mask, words, prefix_length, peft=False)
        row: dict = {
            "kernels": {name: _kernels(step) for name, step in sides.items()},
            "prefix_runs_alone_on": _allowed_backends(sides["prefix"]),
            "attention_paths": step_attention_paths(sides["prefix"]),
            "equality": _equality(backbone, ids, mask, words, prefix_length),
        }
        peak = {}
        for name, step in sides.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                step()
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
        row.update(
            timed_summary(sides, rounds, [("prefix", "limit"), ("default", "limit"), ("prefix", "default")], device)
        )
        if peak:
            row["peak_mib"] = peak
        row["saved_for_backward_mib"] = {
            n: saved_for_backward_bytes(s, [*backbone.parameters()]) / 2**20 for n, s in sides.items()
        }
        report["lengths"][str(length)] = row
    return report


def _equality(backbone, ids, mask, words, prefix_length: int) -> dict:
    """Max differences between the prefix path and the default path: logits and vertex gradients (relative)."""
    model = PrefixSubspaceModel(backbone, 3, prefix_length, label_token_ids=words).place(ids.device)
    model.simplex.vertices.data.copy_(initial_vertices(model, "normal", seed=1))
    alpha = model.sample_alpha(torch.tensor(0, device=ids.device), torch.arange(len(ids), device=ids.device))
    out = {}
    for name, switch in (("prefix", attention.enable), ("default", attention.disable)):
        switch(backbone)
        model.simplex.vertices.grad = None
        logits = model(ids, mask, alpha)
        logits.square().sum().backward()
        out[name] = (logits.detach().float(), model.simplex.vertices.grad.clone())
    (a, ga), (b, gb) = out["prefix"], out["default"]
    return {
        "logits_max_abs": (a - b).abs().max().item(),
        "grad_max_rel": ((ga - gb).abs().max() / gb.abs().max().clamp(min=1e-30)).item(),
    }
