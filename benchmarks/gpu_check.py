"""The one-GPU check behind ``bash launch/gpu_check.sh [OUT.json]``: ``python -m benchmarks.gpu_check --out F``.

On one H100/H200, in well under 8 minutes, it writes one JSON file (rewritten after every part, so a cut run
keeps what it measured):

- ``speed``: k3 against ``limit`` and ``peft`` in bf16 on a Llama-shaped model of 1.24B parameters built from
  a config (``llama-1b``: no download), batch 8 at sequence lengths 512 and 2,048: interleaved step times,
  tokens/s, model FLOPs utilisation (:func:`benchmarks.sides.step_flops` over the GPU's dense bf16
  peak), and each side's peak ``max_memory_allocated`` in a fresh process;
- ``cuda_graph``: sampler + mixer captured in a CUDA graph and replayed at new steps, equal to eager (alphas and
  prefix), and the mixer's forward + backward through ``torch.cuda.make_graphed_callables``;
- ``host_syncs``: every side's training step under ``torch.cuda.set_sync_debug_mode("warn")`` (how many syncs,
  from which lines), and k3's under ``"error"`` (passes only with zero syncs);
- ``sdpa``: which scaled-dot-product-attention kernels each side's step ran (profiler op names);
- ``compile``: sampler + mixer under ``torch.compile(fullgraph=True)`` with inductor, against eager;
- ``attention``: :func:`benchmarks.attention_gpu.gpu_report` on two Llama-3-8B-shaped layers at 512, 2,048
  and 8,192 tokens: which SDPA kernel runs behind a prefix, step time and peak memory of the prefix path, the
  default path and the no-prefix limit, and the two paths' equality.

``--dry-run``: the same code on the CPU with a tiny model (seconds; the CUDA-only parts say they were skipped),
as tests/test_bench.py runs it. Needs torch, transformers and peft; not DeepSpeed, Accelerate or ``datasets``.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.attention_gpu import gpu_report
from benchmarks.measure import measure, sampler_mixer
from benchmarks.sides import MODEL_CONFIGS, SIDES, BenchSpec, Side, Workload, build_workload, load_backbone
from dist_subspace.core import simplex
from dist_subspace.core.arch import prefix_geometry

# Dense bf16 peak of a GPU (TFLOP/s, from the vendor's data sheets), the first name found in the device name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
)
CHECK_SIDES = ("limit", "peft", "k3")
NOT_NEEDED = ("deepspeed", "datasets")  # a GPU image without them must run this


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak for a device name, None when it is not in :data:`PEAK_BF16_TFLOPS`."""
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_name), None)


def _where(frame: traceback.FrameSummary | warnings.WarningMessage) -> str:
    path = Path(frame.filename)
    return f"{path.parent.name}/{path.name}:{frame.lineno}"


def host_syncs(sides: dict[str, Side]) -> dict:
    """Host syncs in one training step of each side (``"warn"`` mode, counted by line), then k3's step under
    ``"error"`` mode, which raises at the first sync."""
    out: dict = {}
    for name, side in sides.items():
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                side.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites = Counter(_where(w) for w in caught if "synchroniz" in str(w.message))
        out[name] = {"syncs": sum(sites.values()), "sites": dict(sites)}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sides["k3"].step()
        out["k3_error_mode"] = {"passed": True}
    except RuntimeError as err:
        where = [_where(f) for f in traceback.extract_tb(err.__traceback__)[-3:]]
        out["k3_error_mode"] = {"passed": False, "error": str(err).strip().splitlines()[0], "where": where}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return out


def sdpa_backends(sides: dict[str, Side]) -> dict:
    """The scaled-dot-product-attention ops each side's training step ran, and the backends they name."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    names = {"flash": "flash", "efficient": "efficient", "cudnn": "cudnn", "math": "math"}
    out = {}
    for name, side in sides.items():
        with profile(activities=activities) as prof:
            side.step()
        ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key})
        backends = sorted({b for op in ops for key, b in names.items() if key in op})
        out[name] = {"backends": backends, "ops": ops}
    return out


def cuda_graph_sampler_mixer(w: Workload, num_vertices: int = 3, replays: int = 5) -> dict:
    """Capture sampler + mixer (``[B, L, K]`` alphas -> ``[B, L, 2, H_kv, P, D]`` prefix) in a CUDA graph, replay
    it at new steps (the step counter is changed in place) and compare with eager; then the mixer's forward +
    backward through ``make_graphed_callables``."""
    g = prefix_geometry(w.backbone.config)
    dtype = next(w.backbone.parameters()).dtype
    shape = (num_vertices, g.num_layers, 2, g.num_kv_heads, w.prefix_length, g.head_dim)
    vertices = torch.randn(shape, device=w.device)
    step = torch.zeros((), dtype=torch.long, device=w.device)

    def sample_and_mix() -> tuple[torch.Tensor, torch.Tensor]:
        alpha = simplex.sample_alpha(0, step, w.index, num_vertices, g.num_layers, "example_layer")
        return alpha, simplex.mix_prefix(vertices, alpha).to(dtype)

    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):  # warm up outside the capture, as CUDA graphs ask
        for _ in range(3):
            sample_and_mix()
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_alpha, static_prefix = sample_and_mix()
    equal, seen = [], []
    for n in range(1, replays + 1):
        step.fill_(n)
        graph.replay()
        alpha, prefix = sample_and_mix()
        equal.append(torch.equal(static_alpha, alpha) and torch.equal(static_prefix, prefix))
        seen.append(static_alpha.clone())
    out: dict = {
        "captured": True,
        "replays": replays,
        "replays_equal_eager": all(equal),
        "alphas_change_with_step": all(not torch.equal(a, b) for a, b in itertools.pairwise(seen)),
        "replay_s": _median(lambda: graph.replay()),
        "eager_s": _median(sample_and_mix),
    }
    try:
        leaf = vertices.clone().requires_grad_()
        graphed = torch.cuda.make_graphed_callables(simplex.mix_prefix, (leaf, static_alpha.clone()))
        grad = torch.randn_like(static_prefix, dtype=leaf.dtype)
        alpha = static_alpha.clone()
        got = graphed(leaf, alpha)
        got.backward(grad)
        got_grad, leaf.grad = leaf.grad.clone(), None
        want = simplex.mix_prefix(leaf, alpha)
        want.backward(grad)
        out["mixer_forward_backward_graphed_equal"] = torch.equal(got, want) and torch.equal(got_grad, leaf.grad)
    except Exception as err:  # a failure here is a finding to report, not a reason to lose the rest
        out["mixer_forward_backward_graphed_error"] = f"{type(err).__name__}: {err}".splitlines()[0]
    return out


def _median(fn, repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _section(into: dict, key: str, fn, save) -> None:
    """``into[key] = fn()`` (or the error it raised, with its traceback's end) and its ``seconds``; then ``save()``
    the JSON file."""
    start = time.perf_counter()
    try:
        into[key] = fn()
    except Exception as err:  # keep the other sections: one JSON file is the deliverable
        error = f"{type(err).__name__}: {err}".strip().splitlines()[0]
        into[key] = {"error": error, "traceback": traceback.format_exc()[-1500:]}
    into[key]["seconds"] = time.perf_counter() - start
    save()


def attention_report(cuda: bool, rounds: int) -> dict:
    """Issue 11's kernels: on a GPU two Llama-3-8B-shaped layers at 512, 2,048 and 8,192 tokens; else (dry run)
    one layer of the bench's ``tiny-llama`` at 16 tokens, fp32 on the CPU."""
    if cuda:
        return gpu_report((512, 2048, 8192), num_layers=2, rounds=rounds)
    tiny = {k: v for k, v in MODEL_CONFIGS["tiny-llama"].items() if k not in ("model_type", "num_hidden_layers")}
    return gpu_report((16,), 1, rounds=1, prefix_length=4, shape=tiny, dtype=torch.float32, device="cpu")


def run_check(out: Path, dry_run: bool, seq_lens: tuple[int, ...], batch: int, rounds: int, peak: float | None) -> dict:
    """Every section of the module docstring, written to ``out`` as it goes; returns the result."""
    cuda = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda" if cuda else "cpu")
    base = BenchSpec(
        model="llama-1b" if not dry_run else "tiny-llama",
        batch=batch,
        prefix_length=16,
        dtype="bfloat16",
        device=device.type,
        sides=CHECK_SIDES,
        rounds=rounds,
        warmup=2 if not dry_run else 1,
        compile="off",
        clock="wall",
    )
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak or (peak_tflops(name) if cuda else None)
    result: dict = {
        "setup": {"device": name, "dry_run": dry_run, "model": base.model, "batch": batch, "seq_lens": list(seq_lens)},
        "peak_bf16_tflops": peak,
    }

    def save() -> None:
        out.write_text(json.dumps(result, indent=1) + "\n")

    start = time.perf_counter()
    backbone, _ = load_backbone(base.model, torch.bfloat16, device)
    result["setup"]["model_params"] = sum(p.numel() for p in backbone.parameters())
    result["setup"]["load_s"] = time.perf_counter() - start
    workloads = {}

    def speed(seq: int) -> dict:
        spec = replace(base, seq_len=seq)
        workloads[seq] = build_workload(spec, backbone)
        m = measure(spec, workloads[seq])
        for side in m["sides"].values():
            side["mfu"] = side["model_tflops_per_s"] / peak if peak else None
        return m

    result["speed"] = {}
    for seq in seq_lens:
        _section(result["speed"], str(seq), lambda seq=seq: speed(seq), save)
    w = workloads.get(seq_lens[0]) or build_workload(replace(base, seq_len=seq_lens[0]), backbone)
    sides = {n: SIDES[n](w) for n in CHECK_SIDES}
    for side in sides.values():
        side.step()
    skipped = {"skipped": "no CUDA device (dry run)"}
    _section(result, "sdpa", lambda: sdpa_backends(sides), save)
    _section(result, "host_syncs", lambda: host_syncs(sides) if cuda else skipped, save)
    _section(result, "cuda_graph", lambda: cuda_graph_sampler_mixer(w) if cuda else skipped, save)
    backend = "inductor" if not dry_run else "eager"
    _section(result, "compile", lambda: sampler_mixer(w, 3, backend, clock="wall"), save)
    _section(result, "attention", lambda: attention_report(cuda, rounds), save)
    result["modules_not_needed_but_imported"] = [m for m in NOT_NEEDED if m in sys.modules]
    result["total_s"] = time.perf_counter() - start
    save()
    return result


def main(argv: list[str] | None = None) -> int:
    from dist_subspace.core.cli import OneLineParser

    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    p = OneLineParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=default_out, help="the JSON file (default: $OUT/gpu_check.json)")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script, measures nothing")
    p.add_argument("--seq-lens", default=None, help="comma-separated (default 512,2048; dry run 16)")
    p.add_argument("--batch", type=int, default=None, help="default 8 (dry run 2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds (default 10; dry run 2)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    seq_lens = tuple(int(s) for s in (args.seq_lens or ("16" if args.dry_run else "512,2048")).split(","))
    batch = args.batch or (2 if args.dry_run else 8)
    rounds = args.rounds or (2 if args.dry_run else 10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = run_check(args.out, args.dry_run, seq_lens, batch, rounds, args.peak_tflops)
    print(json.dumps({"out": str(args.out), "total_s": result["total_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
