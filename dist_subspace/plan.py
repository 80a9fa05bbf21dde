"""Plan GPU memory before a run: ``python -m dist_subspace.plan --model MODEL --gpus N [...]``.

    python -m dist_subspace.plan --model meta-llama/Llama-3.1-70B --gpus 8 --gradient-checkpointing --table
    python -m dist_subspace.plan --config configs/llama3_70b_sst2.yaml --gpus 8 --table
    python -m dist_subspace.plan --model path/to/config.json --gpus 4 --nodes 2 --gpu-memory 40GiB

Prints one JSON object (``--table``: a readable table): bytes per GPU for the backbone shard, the gathered
parameters, the activations (with and without gradient checkpointing), the mixed prefix, the simplex with its
AdamW state, whether the total fits, the smallest change that makes it fit, and DeepSpeed's own ZeRO-3 estimate
for comparison. ``--model`` takes a config.json, a model folder, an embedded alias or a hub id whose config ships in
``configs/models/`` (no hub access needed). ``--config`` reads the model, micro-batch, P, K, checkpointing, input
length and DeepSpeed config from a run config; flags override it. The arithmetic lives in
:mod:`dist_subspace.training.memory`.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

from dist_subspace.core.cli import USER_ERRORS, user_error
from dist_subspace.core.config import ConfigError, load_config
from dist_subspace.core.paths import DS_CONFIGS, MODEL_CONFIGS, shown
from dist_subspace.training import memory

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20}
UNITS.update({"GIB": 2**30, "TIB": 2**40})


def parse_bytes(text: str) -> int:
    """``80GiB``, ``141GB``, ``512MiB`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise ConfigError(f"{text!r} is not a size; write e.g. 80GiB, 141GB or 40960MiB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def shipped_models() -> dict[str, Path]:
    """Hub ids and aliases -> the config.json copies in ``configs/models/`` (their ``_hub_ids`` and ``_aliases``)."""
    known = {}
    for path in sorted(MODEL_CONFIGS.glob("*.json")):
        data = json.loads(path.read_text())
        for name in [path.stem, *data.get("_hub_ids", []), *data.get("_aliases", [])]:
            known[name] = path
    return known


def model_config(name: str) -> tuple[dict, str]:
    """A config.json dict for a path to one, a model folder, an alias or a known hub id; and where it came from."""
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text()), str(path)
    known = shipped_models()
    if name in known:
        return json.loads(known[name].read_text()), shown(known[name])
    shipped = sorted(p.stem for p in MODEL_CONFIGS.glob("*.json"))
    raise ConfigError(
        f"--model {name!r}: no config.json there and not a model whose config ships in configs/models/ "
        f"({', '.join(shipped)}, or their hub ids); give a config.json or a model folder"
    )


def deepspeed_settings(name: str | None) -> dict:
    """What memory depends on in a DeepSpeed JSON (by path, or by name in ds_configs/); None: no DeepSpeed."""
    if name is None:
        return {"partitioned": False, "offload_params": False, "source": None}
    for candidate in (Path(name), DS_CONFIGS / name, DS_CONFIGS / f"{name}.json"):
        if candidate.is_file():
            zero = json.loads(candidate.read_text()).get("zero_optimization", {})
            break
    else:
        known = sorted(p.stem for p in DS_CONFIGS.glob("*.json"))
        raise ConfigError(f"--ds-config {name!r}: no such file; give a path or one of {known}")

    problem = memory.unfilled_auto(zero, f"--ds-config {name}")
    if problem:
        raise ConfigError(problem)

    def number(key: str, default):
        value = zero.get(key, default)
        return None if value == "auto" else int(value)

    return {
        "partitioned": zero.get("stage", 0) == 3,
        "offload_params": zero.get("offload_param", {}).get("device", "none") != "none",
        "max_live_parameters": number("stage3_max_live_parameters", 1_000_000_000),
        "prefetch_bucket": number("stage3_prefetch_bucket_size", 50_000_000),
        "persistence_threshold": number("stage3_param_persistence_threshold", 100_000),
        "source": shown(candidate),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dist_subspace.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="config.json, model folder, embedded alias or known hub id")
    parser.add_argument("--config", help="a run config (YAML): model, micro-batch, P, K, checkpointing, DeepSpeed")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU (default 80GiB)")
    parser.add_argument("--ds-config", help="DeepSpeed JSON, path or name in ds_configs/ (default zero3_bf16)")
    parser.add_argument("--micro-batch", type=int, help="examples per GPU per forward (default 4)")
    parser.add_argument("--seq-len", type=int, help="input tokens per example (default: model.max_length, 256)")
    parser.add_argument("--prefix-length", type=int, help="P (default 16)")
    parser.add_argument("--vertices", type=int, help="K, times the seed replicas (default 3)")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--dtype", choices=sorted(memory.DTYPE_BYTES), default="bfloat16")
    parser.add_argument("--overhead", default="2GiB", help="CUDA context, NCCL and allocator slack (default 2GiB)")
    parser.add_argument("--table", action="store_true", help="a readable table instead of JSON")
    return parser.parse_args(argv)


def setup_from(args: argparse.Namespace) -> tuple[str, memory.Setup, str | None]:
    """The model name, the :class:`memory.Setup` and the DeepSpeed config from flags over an optional run config."""
    run = load_config(args.config) if args.config else None
    name = args.model or (run.model.name_or_path if run else None)
    if name is None:
        raise ConfigError("give --model (a config.json, folder or hub id) or --config (a run config)")

    def pick(flag, from_run, default):
        if flag is not None:
            return flag
        return from_run if run is not None else default

    ds_name = pick(args.ds_config, run.engine.deepspeed if run else None, "zero3_bf16") or None
    ds = deepspeed_settings(ds_name)
    if args.gpus < 1 or args.nodes < 1:
        raise ConfigError("--gpus and --nodes must be >= 1")
    vertices = run.simplex.vertices * run.simplex.replicas if run else 3
    setup = memory.Setup(
        gpus_per_node=args.gpus,
        nodes=args.nodes,
        gpu_memory=parse_bytes(args.gpu_memory),
        micro_batch=pick(args.micro_batch, run.train.micro_batch_size if run else None, 4),
        seq_len=pick(args.seq_len, run.model.max_length if run else None, 256),
        prefix_length=pick(args.prefix_length, run.prefix.length if run else None, 16),
        vertices=pick(args.vertices, vertices, 3),
        checkpointing=bool(pick(args.gradient_checkpointing, run.model.gradient_checkpointing if run else None, False)),
        dtype=args.dtype,
        overhead=parse_bytes(args.overhead),
        **{k: v for k, v in ds.items() if k != "source"},
    )
    if min(setup.micro_batch, setup.seq_len, setup.prefix_length, setup.vertices) < 1:
        raise ConfigError("--micro-batch, --seq-len, --prefix-length and --vertices must be >= 1")
    return name, setup, ds["source"]


def report(name: str, setup: memory.Setup, ds_source: str | None) -> dict:
    """The plan as one JSON-ready dict."""
    config, source = model_config(name)
    shape = memory.model_shape(config)
    result = memory.plan(shape, setup)
    return {
        "model": name,
        "model_config": source,
        "model_type": shape.model_type,
        "ds_config": ds_source,
        "setup": asdict(setup),
        **result,
        "smallest_fix": memory.smallest_fix(shape, setup),
        "deepspeed_estimator": memory.deepspeed_estimates(shape, setup),
    }


def table(plan: dict) -> str:
    """A readable rendering of :func:`report`'s dict (GiB)."""

    def gib(n: int) -> str:
        return f"{n / memory.GiB:8.2f} GiB"

    s = plan["setup"]
    p = plan["parameters"]
    lines = [
        f"{plan['model']} ({plan['model_type']}, {p['total'] / 1e9:.2f}B parameters) on {s['nodes']} x "
        f"{s['gpus_per_node']} GPUs of {s['gpu_memory'] / memory.GiB:.1f} GiB, {plan['ds_config'] or 'no DeepSpeed'}",
        f"micro-batch {s['micro_batch']} x {s['seq_len']} tokens, P = {s['prefix_length']}, K = {s['vertices']}, "
        f"{s['dtype']}, gradient checkpointing {'on' if s['checkpointing'] else 'off'}",
        "",
        "per GPU",
    ]
    lines += [f"  {key.replace('_', ' '):28s}{gib(value)}" for key, value in plan["per_gpu_bytes"].items()]
    lines.append(f"  {'total':28s}{gib(plan['total_bytes'])}   {'fits' if plan['fits'] else 'DOES NOT FIT'}")
    lines += [
        "",
        f"activations without / with checkpointing: {gib(plan['activations_without_checkpointing']).strip()} / "
        f"{gib(plan['activations_with_checkpointing']).strip()}",
        f"largest module {gib(plan['largest_module_bytes']).strip()}; simplex {plan['simplex_parameters']:,} "
        "parameters",
        f"DeepSpeed's ZeRO-3 estimate (model states): every parameter trained "
        f"{gib(plan['deepspeed_estimator']['all_trained']).strip()}, optimizer offloaded "
        f"{gib(plan['deepspeed_estimator']['optimizer_offloaded']).strip()} (= backbone shard + 2 x largest module)",
    ]
    fix = plan["smallest_fix"]
    if not plan["fits"]:
        change = "nothing up to 64 nodes" if fix is None else " + ".join(fix["changes"])
        total = "" if fix is None else f" (total {gib(fix['total_bytes']).strip()})"
        lines.append(f"smallest change that fits: {change}{total}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        name, setup, ds_source = setup_from(args)
        plan = report(name, setup, ds_source)
    except USER_ERRORS as err:
        return user_error(err)
    print(table(plan) if args.table else json.dumps(plan), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
