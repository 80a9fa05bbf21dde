"""Side-by-side measurements on one machine, in one process: ``python -m dist_subspace.bench [--model M]``.

Prints one JSON object:
- ``sampling_mixing_share``: the share of a training step (forward + backward + AdamW) spent sampling alpha
  and mixing the prefix (forward and backward of the einsum), the rest being the frozen backbone.
- ``k3_over_k1_step``: step time of a K = 3 subspace over ordinary prefix tuning (K = 1), same batch.
- ``compiled_over_eager_sampling_mixing``: with ``--compile``, torch.compile(fullgraph=True) of sampler + mixer.
Median of ``--repeats`` timed runs after ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dist_subspace import simplex
from dist_subspace.data import Collator, label_token_ids, load_splits
from dist_subspace.embedded import resolve_model
from dist_subspace.model import PrefixSubspaceModel, initial_vertices


def _median_seconds(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_subspace.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prefix-length", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    backbone = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype), use_safetensors=True)
    backbone = backbone.to(device).eval()
    splits = load_splits("rotten_tomatoes", shots_per_class=args.batch // 2, seed=0, test_size=100)
    batch = Collator(tokenizer, splits.task, decoder=True)(list(enumerate(splits.train)))
    batch = {k: v.to(device) for k, v in batch.items()}
    words = label_token_ids(tokenizer, splits.task.label_words)
    step = torch.zeros((), dtype=torch.long, device=device)
    result: dict = {
        "model": args.model,
        "device": str(device),
        "dtype": args.dtype,
        "batch": len(batch["index"]),
        "seq_len": batch["input_ids"].shape[1],
        "prefix_length": args.prefix_length,
    }

    def make(k: int) -> tuple[PrefixSubspaceModel, torch.optim.Optimizer]:
        model = PrefixSubspaceModel(backbone, k, args.prefix_length, label_token_ids=words)
        model.place(device)
        init = initial_vertices(model, exclude_token_ids=tokenizer.all_special_ids, vocab_size=len(tokenizer))
        model.simplex.vertices.data.copy_(init)
        return model, torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)

    def train_step(model, opt) -> None:
        alpha = model.sample_alpha(step, batch["index"])
        loss = F.cross_entropy(model(batch["input_ids"], batch["attention_mask"], alpha), batch["labels"])
        (loss + model.regulariser()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    k3, opt3 = make(3)
    k1, opt1 = make(1)
    t3 = _median_seconds(lambda: train_step(k3, opt3), args.warmup, args.repeats)
    t1 = _median_seconds(lambda: train_step(k1, opt1), args.warmup, args.repeats)
    rows = k3.alpha_rows

    def sample_and_mix(sampler=simplex.sample_alpha, mixer=simplex.mix_prefix):
        alpha = sampler(0, step, batch["index"], 3, rows, "example_layer")
        return mixer(k3.simplex.vertices, alpha)

    grad = torch.randn_like(sample_and_mix())

    def mixing_fwd_bwd(**kw) -> None:
        sample_and_mix(**kw).backward(grad)
        k3.simplex.vertices.grad = None

    t_mix = _median_seconds(mixing_fwd_bwd, args.warmup, args.repeats * 4)
    result.update(
        step_s_k3=t3, step_s_k1=t1, sampling_mixing_s=t_mix, sampling_mixing_share=t_mix / t3, k3_over_k1_step=t3 / t1
    )
    if args.compile:
        sampler = torch.compile(simplex.sample_alpha, fullgraph=True, dynamic=False)
        mixer = torch.compile(simplex.mix_prefix, fullgraph=True, dynamic=False)
        t_c = _median_seconds(lambda: mixing_fwd_bwd(sampler=sampler, mixer=mixer), args.warmup, args.repeats * 4)
        result.update(sampling_mixing_compiled_s=t_c, compiled_over_eager_sampling_mixing=t_c / t_mix)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
