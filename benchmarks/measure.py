"""How ``python -m benchmarks.bench`` measures the sides of :mod:`benchmarks.sides`: interleaved
timing, peak memory in fresh processes, the sampler + mixer share and compile proof, ratios and targets."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import torch

from benchmarks.sides import ROOT, SIDES, BenchSpec, Side, Workload, build_workload, step_flops
from benchmarks.timing import interleaved_times, ratios, synchronize
from dist_subspace.core import simplex
from dist_subspace.core.arch import prefix_geometry


# ---- memory ----------------------------------------------------------------------------------------
def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def side_memory(side: Side, device: torch.device, steps: int = 2) -> dict:
    """Memory of a side that has just been built (call it in a fresh process): one step first, then the peak over
    ``steps`` more. ``peak_bytes``: all of it (weights, runtime, trained parameters, optimizer state, activations);
    ``step_bytes``: what a step adds on top of what stays between steps (``before_steps_bytes``).

    GPU: ``torch.cuda.max_memory_allocated``. CPU: the resident set's high-water mark (``VmHWM``), reset just
    before the steps (``/proc/self/clear_refs``); the first step also makes every weight resident (safetensors
    are mapped lazily), and the C allocator first hands freed memory back (``malloc_trim``), so that memory freed
    after the first step does not hide in the baseline, to be reused by the steps unseen.
    """
    side.step()  # optimizer state is made; every weight is touched
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            side.step()
        synchronize(device)
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc (Linux, as /proc is)
        before = _proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident set
        for _ in range(steps):
            side.step()
        peak, kind = _proc_status_bytes("VmHWM"), "rss"
    return {"kind": kind, "peak_bytes": peak, "before_steps_bytes": before, "step_bytes": peak - before}


def memory_in_fresh_process(spec: BenchSpec, side: str) -> dict:
    """:func:`side_memory` of ``side`` in a new ``python -m benchmarks.bench --memory-of SIDE`` process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "benchmarks.bench", f"--memory-of={side}", *spec.flags()]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"memory of side {side!r} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- sampler + mixer -------------------------------------------------------------------------------
def _median_seconds(fn: Callable[[], None], repeats: int, device: torch.device, clock: str, warmup: int = 3) -> float:
    now = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = now()
        fn()
        synchronize(device)
        times.append(now() - start)
    return statistics.median(times)


def sampler_mixer(
    w: Workload, num_vertices: int = 3, backend: str = "inductor", repeats: int = 30, clock: str = "wall"
) -> dict:
    """Time of sampling alpha ``[B, L, K]`` and mixing the prefix ``[B, L, 2, H_kv, P, D]`` (forward, cast to the
    compute dtype, backward) as in a K-vertex step; and, unless ``backend`` is ``off``, both compiled with
    ``torch.compile(fullgraph=True)`` (which raises on any graph break), checked against eager."""
    g = prefix_geometry(w.backbone.config)
    dtype = next(w.backbone.parameters()).dtype
    shape = (num_vertices, g.num_layers, 2, g.num_kv_heads, w.prefix_length, g.head_dim)
    vertices = torch.randn(shape, device=w.device).requires_grad_()
    step = torch.zeros((), dtype=torch.long, device=w.device)

    def forward(sampler=simplex.sample_alpha, mixer=simplex.mix_prefix) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = sampler(0, step, w.index, num_vertices, g.num_layers, "example_layer")  # [B, L, K]
        return alpha, mixer(vertices, alpha).to(dtype)

    grad = torch.randn_like(forward()[1])

    def forward_backward(**fns) -> None:
        forward(**fns)[1].backward(grad)
        vertices.grad = None

    out: dict = {"num_vertices": num_vertices, "eager_s": _median_seconds(forward_backward, repeats, w.device, clock)}
    if backend == "off":
        return out
    sampler = torch.compile(simplex.sample_alpha, fullgraph=True, dynamic=False, backend=backend)
    mixer = torch.compile(simplex.mix_prefix, fullgraph=True, dynamic=False, backend=backend)
    start = time.perf_counter()
    alpha_c, prefix_c = forward(sampler, mixer)
    compile_s = time.perf_counter() - start
    alpha_e, prefix_e = forward()
    timed = _median_seconds(lambda: forward_backward(sampler=sampler, mixer=mixer), repeats, w.device, clock)
    out["compiled"] = {
        "backend": backend,
        "fullgraph": True,  # torch.compile(fullgraph=True) raised nothing: one graph each, no break
        "first_call_s": compile_s,
        "s": timed,
        "over_eager": timed / out["eager_s"],
        "alpha_max_abs_diff": (alpha_c - alpha_e).abs().max().item(),
        "prefix_max_abs_diff": (prefix_c.float() - prefix_e.float()).abs().max().item(),
    }
    return out


# ---- one measurement -------------------------------------------------------------------------------
TARGETS: tuple[tuple[str, str, str, float], ...] = (  # (what, side, over side, at most)
    ("time", "k3", "k1", 1.03),
    ("time", "k3", "peft", 1.00),
    ("time", "k3", "limit", 1.05),
    ("peak_memory", "k3", "peft", 1.00),
    ("step_memory", "k3", "peft", 1.00),
)
SHARE_TARGET = 0.01  # sampler + mixer, of a K = 3 step


def targets(result: dict) -> list[dict]:
    """Every target of issue 7 that this run's sides allow, with its measured figure (a time ratio with its 95 %
    confidence interval) and whether it is met."""
    rows, sides = [], result["sides"]
    for what, side, ref, bound in TARGETS:
        if side not in sides or ref not in sides:
            continue
        if what == "time":
            r = result["time_ratios"][f"over_{ref}"][side]
            row = {"value": r["paired"], "ci95": r["paired_ci95"]}
        elif all(sides[s].get("memory") for s in (side, ref)):
            key = "peak_bytes" if what == "peak_memory" else "step_bytes"
            row = {"value": sides[side]["memory"][key] / sides[ref]["memory"][key]}
        else:
            continue
        rows.append({"what": f"{side}/{ref} {what}", "at_most": bound, **row, "met": row["value"] <= bound})
    share = result.get("sampler_mixer", {}).get("share_of_k3_step")
    if share is not None:
        what = "sampler+mixer share of a k3 step"
        rows.append({"what": what, "at_most": SHARE_TARGET, "value": share, "met": share < SHARE_TARGET})
    return rows


def environment(device: torch.device) -> dict:
    """Versions (PEFT's read without importing it), threads, and the GPU's name."""
    from importlib import metadata

    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    try:
        env["peft"] = metadata.version("peft")
    except metadata.PackageNotFoundError:
        env["peft"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _clock_stats(t: list[float]) -> dict:
    return {"median_s": statistics.median(t), "min_s": min(t), "times_s": t}


def measure(
    spec: BenchSpec,
    workload: Workload | None = None,
    progress: Callable[[str], None] | None = None,
    memory_jobs: int = 2,
) -> dict:
    """Time every side of ``spec`` interleaved round by round, the sampler + mixer share, the compile proof and
    (``spec.memory``) each side's peak memory in a fresh process; one JSON-ready dict. ``progress`` gets a line
    after every round. ``memory_jobs``: fresh processes at a time on a CPU (1 leaves a shared machine's other
    cores alone; one at a time on a GPU, always)."""
    device, clock = spec.torch_device(), spec.resolved_clock()
    w = workload or build_workload(spec)
    built = {name: SIDES[name](w) for name in spec.sides}
    times = interleaved_times({n: s.step for n, s in built.items()}, spec.rounds, spec.warmup, device, progress)
    chosen = times[clock]
    config = w.backbone.config
    tokens = spec.batch * spec.seq_len
    result: dict = {
        "setup": {
            **{k: v for k, v in asdict(spec).items() if k not in ("sides", "memory", "clock")},
            "dtype": str(spec.torch_dtype()).removeprefix("torch."),
            "device": device.type,
            "clock": clock,
            "model_params": sum(p.numel() for p in w.backbone.parameters()),
            "tokens": w.tokens,
            "interleaved": "one step of every side per round, order reversed every other round",
            **environment(device),
        },
        "sides": {},
    }
    for name, side in built.items():
        med = statistics.median(chosen[name])
        flops = step_flops(config, spec.batch, spec.seq_len, side.prefix_length, side.head_rows)
        result["sides"][name] = {
            **_clock_stats(chosen[name]),
            "tokens_per_s": tokens / med,
            "model_tflops_per_s": flops / med / 1e12,
            "step_flops": flops,
            "trainable_params": side.trainable_params,
            "head_rows": side.head_rows if side.head_rows is not None else spec.batch,
        }
        if clock != "wall":
            result["sides"][name]["wall"] = _clock_stats(times["wall"][name])
    refs = [ref for ref in ("limit", "peft", "k1") if ref in built]
    result["time_ratios"] = {f"over_{ref}": ratios(chosen, ref) for ref in refs}
    if clock != "wall":
        result["wall_time_ratios"] = {f"over_{ref}": ratios(times["wall"], ref) for ref in refs}
    mixing = sampler_mixer(w, 3, spec.compile, clock=clock)
    if "k3" in built:
        mixing["share_of_k3_step"] = mixing["eager_s"] / statistics.median(chosen["k3"])
    result["sampler_mixer"] = mixing
    del built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the cached activations back: the fresh processes need the GPU's memory
    if spec.memory:
        # Fresh processes ``memory_jobs`` at a time on CPU (each its own RSS; nothing is timed meanwhile); one at a
        # time on a GPU, whose memory they would share.
        jobs = 1 if device.type == "cuda" else memory_jobs
        with ThreadPoolExecutor(jobs) as pool:
            found = pool.map(lambda name: memory_in_fresh_process(spec, name), spec.sides)
            for name, memory in zip(spec.sides, found, strict=True):
                result["sides"][name]["memory"] = memory
        result["memory_ratios"] = memory_ratios(result["sides"])
    result["targets"] = targets(result)
    return result


def memory_ratios(sides: dict) -> dict:
    """Each side's peak and step memory over ``limit``'s and ``peft``'s."""
    out = {}
    for ref in ("limit", "peft"):
        if ref in sides:
            base = sides[ref]["memory"]
            out[f"over_{ref}"] = {
                name: {key: s["memory"][key] / base[key] for key in ("peak_bytes", "step_bytes")}
                for name, s in sides.items()
            }
    return out


def format_table(result: dict) -> str:
    """A readable table of one :func:`measure` result."""
    s = result["setup"]
    lines = [
        f"{s['model']} ({s['model_params'] / 1e6:.0f}M params), {s['device']} {s['dtype']}, batch {s['batch']} x "
        f"{s['seq_len']} tokens ({s['tokens']}), P = {s['prefix_length']}, {s['rounds']} interleaved rounds, "
        f"{s['clock']} time",
        f"{'side':<8}{'median s':>10}{'min s':>9}{'tok/s':>9}{'x limit':>9}{'x peft':>8}"
        f"{'peak MiB':>10}{'step MiB':>10}",
    ]
    over = result["time_ratios"]
    for name, side in result["sides"].items():
        cells = [f"{name:<8}", f"{side['median_s']:>10.4f}", f"{side['min_s']:>9.4f}", f"{side['tokens_per_s']:>9.0f}"]
        for ref, width in (("limit", 9), ("peft", 8)):
            r = over.get(f"over_{ref}", {}).get(name)
            cells.append(f"{r['paired']:>{width}.3f}" if r else f"{'-':>{width}}")
        mem = side.get("memory")
        cells += (
            [f"{mem['peak_bytes'] / 2**20:>10.0f}", f"{mem['step_bytes'] / 2**20:>10.0f}"]
            if mem
            else [f"{'-':>10}"] * 2
        )
        lines.append("".join(cells))
    mix = result["sampler_mixer"]
    line = f"sampler + mixer (K = 3, fwd + bwd): {mix['eager_s'] * 1e3:.2f} ms"
    if "share_of_k3_step" in mix:
        line += f" = {100 * mix['share_of_k3_step']:.3f} % of a k3 step"
    if "compiled" in mix:
        c = mix["compiled"]
        line += f"; compiled fullgraph ({c['backend']}): {c['s'] * 1e3:.2f} ms ({c['over_eager']:.2f} x eager)"
    lines.append(line)
    for t in result["targets"]:
        spread = " (95 % CI {:.3f}-{:.3f})".format(*t["ci95"]) if "ci95" in t else ""
        met = "met" if t["met"] else "MISSED"
        lines.append(f"target {t['what']} <= {t['at_most']}: {t['value']:.4f}{spread} {met}")
    lines.append("ratios: median of per-round ratios; memory: fresh process, peak of 2 steps after a first one")
    return "\n".join(lines)
