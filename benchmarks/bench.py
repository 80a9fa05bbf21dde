"""Speed and memory side by side: ``python -m benchmarks.bench [--sides limit,peft,k1,k3,k6] [--table]``.

Every side trains on the same frozen model, batch, sequence length, prefix length P, dtype and loss (the
verbalizer's cross-entropy at the last position); their steps are timed interleaved, round by round:

- ``limit``: the least work a prefix method can do: frozen forward + backward down to the input embeddings;
- ``peft``: PEFT ``PrefixTuning`` (CAUSAL_LM) with the same P, AdamW on its prefix;
- ``k1``, ``k3``, ``k6``: this project with K = 1, 3, 6 (``example_layer`` sampling, regulariser on).

Prints one JSON object (``--table``: a readable table): each side's median and minimum step time, tokens/s,
its time over ``limit``, ``peft`` and ``k1``, its peak memory measured in a fresh process, the sampler + mixer
share of a K = 3 step, the proof that both compile with ``fullgraph=True``, and the issue's targets.

``--evaluation``: S points stacked into one pass against one pass per point, 2 processes ZeRO-3 (see
:mod:`benchmarks.evaluation`).

``--distributed``: 1 process against 2 processes with ZeRO-3 over gloo, through the trainer (see
:mod:`benchmarks.distributed`).

``--dtypes float32,bfloat16``: the same K = 3 training step and evaluation forward in each dtype, interleaved
(see :mod:`benchmarks.dtypes`): what ``model.dtype=auto`` buys on a CPU with native bf16.

``--generation train|decode|ensemble|padding``: text generation (see :mod:`benchmarks.generation`): the sides'
training step on prompt + response rows under the LM loss; greedy decoding at the centroid against transformers'
``generate``; ``ensemble:S`` stacked against S separate decodes; the padding of the headlines run's batches.

    python -m benchmarks.bench --seq-len 256 --table
    python -m benchmarks.bench --model llama-1b --dtype bfloat16 --device cuda --seq-len 2048
    python -m benchmarks.bench --model 'config:{"num_hidden_layers": 4, "hidden_size": 256, ...}'
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.sides import MODEL_CONFIGS, SIDES, BenchSpec
from dist_subspace.core.cli import OneLineParser


def _positive(flag: str, value: int, least: int = 1) -> None:
    if value < least:
        raise ValueError(f"{flag} must be >= {least} (got {value})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--sides",
        default=None,
        help=f"comma-separated, from {', '.join(SIDES)} (limit,peft,k1,k3,k6; generation: no k6)",
    )
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help=f"embedded alias, folder or hub id; or built from a config: {', '.join(MODEL_CONFIGS)}, "
        "config:{json} or config:file.json",
    )
    p.add_argument("--batch", type=int, default=None, help="rows per step (8); --evaluation: per forward (32)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per row (fixed length, cut from real text)")
    p.add_argument("--prefix-length", type=int, default=16, help="P")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (one step of every side each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--compile", default="inductor", choices=["inductor", "eager", "off"], help="backend for the proof")
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"], help="auto: cpu time on 1 CPU thread")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurements")
    p.add_argument("--table", action="store_true", help="a readable table instead of JSON")
    p.add_argument("--distributed", action="store_true", help="1 process vs 2 processes ZeRO-3 through the trainer")
    p.add_argument("--steps", type=int, default=8, help="--distributed: optimizer steps per run")
    p.add_argument("--keep", default=None, help="--distributed: keep the run folders under this folder")
    p.add_argument("--evaluation", action="store_true", help="stacked vs per-point evaluation, 2 processes ZeRO-3")
    p.add_argument("--dtypes", default=None, help="e.g. float32,bfloat16: a K = 3 step and evaluation in each")
    p.add_argument("--points", default=None, help="--evaluation: S of ensemble:S (8); --generation ensemble: 4,8")
    p.add_argument("--examples", type=int, default=32, help="--evaluation: examples scored (32: a few-shot dev set)")
    p.add_argument(
        "--generation",
        default=None,
        choices=["train", "decode", "ensemble", "padding"],
        help="text generation: a training step on prompt + response rows, decoding, ensemble stacking, padding",
    )
    p.add_argument("--prompts", type=int, default=None, help="--generation decode (8) / ensemble (2): prompts")
    p.add_argument("--max-new-tokens", type=int, default=16, help="--generation decode/ensemble: tokens a prompt")
    p.add_argument("--split", action="store_true", help="--generation decode: each side at 1 new token too")
    p.add_argument("--config", default="configs/headlines.yaml", help="--generation padding: the run config")
    p.add_argument("--seeds", type=int, default=10, help="--generation padding: train.seed 0..N-1")
    p.add_argument("--memory-jobs", type=int, default=None, help="fresh memory processes at a time (2; generation 1)")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # the fresh process of one side
    return p.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    """Check the flags (a ``ValueError`` that says how to fix one) and make the spec."""
    if args.sides is None:
        args.sides = "limit,peft,k1,k3" if args.generation else "limit,peft,k1,k3,k6"
    sides = tuple(s.strip() for s in args.sides.split(",") if s.strip())
    unknown = [s for s in sides if s not in SIDES]
    if not sides or unknown or len(set(sides)) != len(sides):
        raise ValueError(f"--sides {args.sides!r}: give distinct names from {', '.join(SIDES)}")
    if args.batch is None:
        args.batch = 32 if args.evaluation else 8
    _positive("--batch", args.batch)
    _positive("--seq-len", args.seq_len, 2)
    _positive("--prefix-length", args.prefix_length)
    _positive("--rounds", args.rounds)
    _positive("--warmup", args.warmup, 0)
    _positive("--steps", args.steps, 3)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here; use --device cpu")
    return BenchSpec(
        model=args.model,
        batch=args.batch,
        seq_len=args.seq_len,
        prefix_length=args.prefix_length,
        dtype=args.dtype,
        device=args.device,
        sides=sides,
        rounds=args.rounds,
        warmup=args.warmup,
        compile=args.compile,
        memory=not args.no_memory,
        clock=args.clock,
        task="generation" if args.generation == "train" else "classification",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dist_subspace.core.cli import user_error

    try:
        spec = spec_from_args(args)
        if args.memory_of is not None:
            from benchmarks.measure import side_memory
            from benchmarks.sides import build_workload

            workload = build_workload(spec)
            print(json.dumps(side_memory(SIDES[args.memory_of](workload), spec.torch_device())))
            return 0
        if args.generation is not None and args.generation != "train":
            result = _generation(args, spec)
            result["command"] = "python -m benchmarks.bench " + " ".join(argv if argv is not None else sys.argv[1:])
            print(_generation_table(args.generation, result) if args.table else json.dumps(result))
            return 0
        if args.evaluation:  # --batch: the rows-per-forward budget (train.eval_batch_size), both sides
            from benchmarks.evaluation import evaluation_facts, format_evaluation

            points = int(args.points or 8)
            result = evaluation_facts(spec.model, args.examples, points, args.batch, args.rounds)
            print(format_evaluation(result) if args.table else json.dumps(result))
            return 0
        if args.dtypes:  # the same K = 3 step and evaluation forward in each dtype, interleaved
            from benchmarks.dtypes import dtype_facts, format_dtypes

            names = args.dtypes.split(",")
            if len(names) < 2 or any(n not in ("float32", "bfloat16") for n in names):
                raise ValueError(
                    f"--dtypes {args.dtypes!r}: give two or more of float32, bfloat16, e.g. float32,bfloat16"
                )
            eval_batch = args.examples if args.examples != 32 else 64
            result = dtype_facts(spec.model, names, spec.batch, eval_batch, args.rounds, args.warmup)
            result["command"] = "python -m benchmarks.bench " + " ".join(argv if argv is not None else sys.argv[1:])
            print(format_dtypes(result) if args.table else json.dumps(result))
            return 0
        if args.distributed:
            from benchmarks.distributed import distributed_facts, format_distributed

            result = distributed_facts(spec.model, args.steps, args.keep)
            print(format_distributed(result) if args.table else json.dumps(result))
            return 0
        from benchmarks.measure import format_table, measure

        jobs = args.memory_jobs or (1 if args.generation else 2)
        _positive("--memory-jobs", jobs)
        result = measure(spec, progress=_progress, memory_jobs=jobs)
    except (ValueError, OSError) as err:
        return user_error(err)
    result["command"] = "python -m benchmarks.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.table and args.generation:
        from benchmarks.generation import format_train

        print(format_train(result))
    else:
        print(format_table(result) if args.table else json.dumps(result))
    return 0


def _progress(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)


def _generation(args: argparse.Namespace, spec: BenchSpec) -> dict:
    """``--generation decode|ensemble|padding`` (:mod:`benchmarks.generation`, :mod:`benchmarks.padding`)."""
    from benchmarks import generation

    if args.generation == "padding":
        _positive("--seeds", args.seeds)
        from benchmarks.padding import padding_facts

        return padding_facts(args.config, args.seeds, rounds=args.rounds, warmup=args.warmup, progress=_progress)
    _positive("--max-new-tokens", args.max_new_tokens, 2 if args.split else 1)
    if args.generation == "decode":
        prompts = args.prompts or 8
        _positive("--prompts", prompts)
        return generation.decode_facts(
            spec.model,
            prompts,
            args.max_new_tokens,
            spec.prefix_length,
            spec.rounds,
            spec.warmup,
            args.split,
            progress=_progress,
        )
    text = args.points or "4,8"
    try:
        points = tuple(int(p) for p in text.split(","))
    except ValueError:
        points = ()
    if not points or min(points) < 1:
        raise ValueError(f"--points {text!r}: give S of ensemble:S, comma-separated, each >= 1 (e.g. 4,8)")
    prompts = args.prompts or 2
    _positive("--prompts", prompts)
    return generation.ensemble_facts(
        spec.model,
        prompts,
        args.max_new_tokens,
        spec.prefix_length,
        points,
        spec.rounds,
        spec.warmup,
        progress=_progress,
    )


def _generation_table(mode: str, result: dict) -> str:
    from benchmarks import generation

    if mode == "padding":
        from benchmarks.padding import format_padding

        return format_padding(result)
    return generation.format_decode(result) if mode == "decode" else generation.format_ensemble(result)


if __name__ == "__main__":
    raise SystemExit(main())
