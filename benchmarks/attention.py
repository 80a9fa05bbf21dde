"""What the prefix attention path buys: ``python -m benchmarks.attention [--lengths 64,256,1024]``.

Prints one JSON object. For each input length, one training step of each *side*
(:mod:`benchmarks.attention_steps`), timed interleaved with the shared harness (every round runs every side once,
in alternating order; median over rounds), so the ratios hold on a loaded machine:

- ``limit``: the frozen backbone with no prefix, gradients only to the input embeddings (what any prefix method
  costs at least: a full forward and backward through the frozen model);
- ``prefix``: this project's K-vertex training step (sample alpha, mix, forward, backward, AdamW) on ``prefix_sdpa``;
- ``default``: the same step on transformers' SDPA (explicit mask, repeated key/value heads);
- ``peft``: PEFT prefix tuning (K = 1, same P) on transformers' SDPA, its LM head on the same B rows as ours.

Memory: bytes held for backward per step (every tensor autograd saves, parameters excluded), and on a GPU the
peak allocated. ``--gpu`` (:mod:`benchmarks.attention_gpu`, also a section of ``launch/gpu_check.sh``) adds
which SDPA kernel runs with a prefix, on a Llama-shaped bf16 model with 8 key/value heads.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.attention_gpu import gpu_report
from benchmarks.attention_steps import compare_padding, compare_steps, random_batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n")[0])
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
        print(json.dumps(gpu_report(lengths, args.gpu_layers, rounds=args.rounds)))
        return 0
    from transformers import AutoModelForCausalLM

    from dist_subspace.core.embedded import resolve_model

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

        from dist_subspace.data.batching import Collator, label_token_ids
        from dist_subspace.data.sources import load_splits

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
