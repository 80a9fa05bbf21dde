"""bf16 against fp32 on this machine, side by side: ``python -m benchmarks.bench --dtypes float32,bfloat16``.

The same model is loaded once per dtype; each copy gets a K = 3 simplex (fp32 vertices, the prefix mixed in the
compute dtype, as the trainer does) and two sides: a training step on a real few-shot batch (Rotten Tomatoes
through the task's collator: sample, mix, forward, loss and regulariser, backward, AdamW) and an evaluation
forward at the centroid on a batch of ``train.eval_batch_size`` rows. Every side runs once a round, interleaved
(:mod:`benchmarks.timing`); ratios are each dtype's time over the first's, with 95 % intervals. The initial
logits on the evaluation batch are compared too (relative to the largest; whether accuracy holds is the study's
question: a few cells in each dtype). Decoders (a verbalizer) and encoders (a head) alike.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from benchmarks.timing import interleaved_times, ratios
from dist_subspace.core import simplex
from dist_subspace.core.initialise import initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel


def _model(path: str, dtype: torch.dtype, decoder: bool, words, classes: int, prefix: int) -> PrefixSubspaceModel:
    from transformers import AutoModel, AutoModelForCausalLM

    loader = AutoModelForCausalLM if decoder else AutoModel
    backbone = loader.from_pretrained(path, dtype=dtype, use_safetensors=True).eval().requires_grad_(False)
    kwargs = {"label_token_ids": words} if decoder else {"num_outputs": classes}
    torch.manual_seed(0)  # an encoder's head: the same start in every dtype
    model = PrefixSubspaceModel(backbone, 3, prefix, **kwargs)
    model.simplex.vertices.data.copy_(initial_vertices(model, seed=0))
    return model


def dtype_facts(model_name: str, dtypes: list[str], batch: int, eval_batch: int, rounds: int, warmup: int) -> dict:
    """Seconds per training step and per evaluation forward for each dtype, their ratios to the first dtype."""
    from transformers import AutoConfig, AutoTokenizer

    from dist_subspace.core.arch import arch_spec
    from dist_subspace.core.embedded import resolve_model
    from dist_subspace.data.batching import Collator, label_token_ids
    from dist_subspace.data.sources import load_splits

    path = resolve_model(model_name)
    decoder = arch_spec(AutoConfig.from_pretrained(path)).kind == "decoder"
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = load_splits("rotten_tomatoes", shots_per_class=batch // 2, seed=0, test_size=eval_batch)
    collate = Collator(tokenizer, splits.task, decoder, max_length=128)
    train = collate(list(enumerate(splits.train)))
    test = collate(list(enumerate(splits.test)))
    words = label_token_ids(tokenizer, splits.task.label_words) if decoder else None
    steps, logits = {}, {}
    for name in dtypes:
        model = _model(path, getattr(torch, name), decoder, words, len(splits.task.label_names), prefix=16)
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
        counter = torch.zeros((), dtype=torch.long)
        centroid = simplex.centroid_alpha(3)

        def train_step(model=model, opt=opt, counter=counter) -> None:
            model.train()
            alpha = model.sample_alpha(counter, train["index"])  # [B, L, K]
            loss = F.cross_entropy(model(train["input_ids"], train["attention_mask"], alpha).float(), train["labels"])
            (loss + model.regulariser()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            counter.add_(1)

        @torch.no_grad()
        def evaluate(model=model, name=name, centroid=centroid) -> None:
            model.eval()
            logits[name] = model(test["input_ids"], test["attention_mask"], centroid).float()

        steps[f"train@{name}"], steps[f"eval@{name}"] = train_step, evaluate
    evaluate_only = {n: s for n, s in steps.items() if n.startswith("eval@")}
    for run in evaluate_only.values():  # before any training step: both dtypes score the same initial simplex
        run()
    first = {n: logits[n.split("@")[1]].clone() for n in evaluate_only}
    times = interleaved_times(steps, rounds, warmup, torch.device("cpu"))["cpu"]
    base = dtypes[0]
    result = {
        "model": model_name,
        "kind": "decoder" if decoder else "encoder",
        "threads": torch.get_num_threads(),
        "train_batch": len(train["index"]),
        "eval_batch": len(test["index"]),
        "rounds": rounds,
        "clock": "cpu",
        "seconds": {n: statistics.median(t) for n, t in times.items()},
        "times_s": times,
        "train_ratio": {n.split("@")[1]: r for n, r in ratios(times, f"train@{base}").items() if "train@" in n},
        "eval_ratio": {n.split("@")[1]: r for n, r in ratios(times, f"eval@{base}").items() if "eval@" in n},
    }
    reference = first[f"eval@{base}"]
    result["initial_logits_max_abs_diff"] = {
        n.split("@")[1]: (v - reference).abs().max().item() for n, v in first.items()
    }
    result["initial_logits_relative_diff"] = {  # of the largest logit: rounding, at the scale of the outputs
        n.split("@")[1]: (v - reference).abs().max().item() / reference.abs().max().item() for n, v in first.items()
    }
    return result


def format_dtypes(result: dict) -> str:
    """A readable table of :func:`dtype_facts`."""
    base = next(iter(result["train_ratio"]))
    lines = [
        f"{result['model']} ({result['kind']}), {result['threads']} thread(s), train batch {result['train_batch']}, "
        f"eval batch {result['eval_batch']}, {result['rounds']} rounds, CPU time",
        f"| dtype | train step s | × {base} [95 %] | eval forward s | × {base} [95 %] | logits, relative diff |",
        "|---|---|---|---|---|---|",
    ]
    for name in result["train_ratio"]:
        t, e = result["train_ratio"][name], result["eval_ratio"][name]
        lines.append(
            f"| {name} | {result['seconds'][f'train@{name}']:.3f} | {t['paired']:.3f} "
            f"[{t['paired_ci95'][0]:.3f}–{t['paired_ci95'][1]:.3f}] | {result['seconds'][f'eval@{name}']:.3f} | "
            f"{e['paired']:.3f} [{e['paired_ci95'][0]:.3f}–{e['paired_ci95'][1]:.3f}] | "
            f"{result['initial_logits_relative_diff'][name]:.2g} |"
        )
    return "\n".join(lines)
