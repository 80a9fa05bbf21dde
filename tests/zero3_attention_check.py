"""Run by tests/test_attention.py under torchrun (2 processes): ZeRO-3 (backbone partitioned over the ranks) with
gradient checkpointing, the prefix path against transformers' SDPA on each rank's own right- and left-padded
micro-batch. ``python -m tests.zero3_attention_check MODEL_DIR DATA_FILE OUT_DIR`` writes ``rank-R.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_subspace.core import attention
from dist_subspace.core.cli import exit_now
from dist_subspace.core.config import load_config
from dist_subspace.training.assembly import build, initialise
from dist_subspace.training.engine import Engine


def left_padded(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same right-padded rows ``[B, S]``, padded on the left instead."""
    lengths = mask.sum(1)
    shift = (mask.shape[1] - lengths)[:, None]
    order = (torch.arange(mask.shape[1])[None] - shift) % mask.shape[1]  # roll each row right by its pad count
    return ids.gather(1, order), mask.gather(1, order)


def main(model_dir: str, data: str, out: str) -> int:
    overrides = [
        f"model.name_or_path={model_dir}",
        f"data.task={data}",
        "data.shots_per_class=8",
        "data.test_size=8",
        "engine.deepspeed=zero3_bf16",
        "model.dtype=float32",  # compared with the default path at fp32 tolerances
        "model.gradient_checkpointing=true",
    ]
    cfg = load_config(None, overrides)
    engine = Engine(cfg)
    splits, collator, model, _ = build(cfg, engine)
    initialise(cfg, model, collator.tokenizer, engine)
    partitioned = all(p.data.numel() == 0 for p in model.backbone.parameters())
    examples = list(enumerate(splits[0].train))[engine.rank * 4 : engine.rank * 4 + 4]
    batch = {k: v.to(engine.device) for k, v in collator(examples).items()}
    right = batch["input_ids"], batch["attention_mask"]
    model.train()
    alpha = model.sample_alpha(torch.tensor(0), batch["index"])
    runs = {}
    for padding, (ids, mask) in {"right": right, "left": left_padded(*right)}.items():
        for path, switch in (("prefix", attention.enable), ("default", attention.disable)):
            switch(model.backbone)
            attention.attention_paths.clear()
            model.simplex.vertices.grad = None
            logits = model(ids, mask, alpha)
            F.cross_entropy(logits, batch["labels"]).backward()
            runs[padding, path] = logits.detach(), model.simplex.vertices.grad.clone(), dict(attention.attention_paths)
    result = {
        "world_size": engine.world_size,
        "partitioned": partitioned,
        "padded": bool((batch["attention_mask"] == 0).any()),
        "layers": model.geometry.num_layers,
    }
    for padding in ("right", "left"):
        (a, ga, paths), (b, gb, default_paths) = runs[padding, "prefix"], runs[padding, "default"]
        result[padding] = {
            "logits_max_abs": (a - b).abs().max().item(),
            "grad_max_rel": ((ga - gb).abs().max() / gb.abs().max()).item(),
            "paths": paths,
            "default_paths": default_paths,
        }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank-{engine.rank}.json").write_text(json.dumps(result))
    engine.end()
    return 0


if __name__ == "__main__":
    exit_now(main(*sys.argv[1:4]))
