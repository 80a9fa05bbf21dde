"""Checks that need several processes under DeepSpeed ZeRO-3, run by the tests under a launcher (any of them):

    torchrun --nproc_per_node 2 -m tests.zero3_checks families MODELS_DIR OUT_DIR
    torchrun --nproc_per_node 2 -m tests.zero3_checks sharded-load MODEL_DIR OUT_DIR

``families``: each tiny backbone in MODELS_DIR/<family> loads through ``Engine.load_backbone`` (partitioned at
construction), trains a K = 3 simplex a few steps (each rank its half of the batch), and writes its final
vertices, what it holds, and (rank 0) every backbone parameter gathered after training (frozen, really loaded).
The decoders classify with a verbalizer; MPNet, an encoder whose self-attention takes the prefix itself (no cache,
core/mpnet.py), with a simplex head.
``sharded-load``: a checkpoint in several safetensors shards loads through ``Engine.load_backbone`` while a thread
samples this process's memory; every parameter is gathered and compared bit for bit with the shards.
Each rank writes ``OUT_DIR/<name>-rank<R>.json`` (and ``.safetensors`` for the vertices).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dist_subspace.core.initialise import initial_head, initial_vertices
from dist_subspace.core.model import PrefixSubspaceModel

FAMILIES = ["gemma2", "gemma3_text", "phi3", "gpt_neox", "mixtral", "qwen2_moe", "mpnet"]
ENCODERS = {"mpnet"}
K, P, STEPS, GLOBAL_BATCH, SEQ = 3, 4, 3, 4, 12  # SEQ + P > the tiny configs' window of 8
LABELS = [5, 6, 7]


def global_batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's whole batch, the same on every rank: ids, mask ``[N, S]`` (row 0 left-padded), labels and
    example index ``[N]``."""
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, vocab, (GLOBAL_BATCH, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    labels = torch.randint(0, len(LABELS), (GLOBAL_BATCH,), generator=gen)
    return ids, mask, labels, torch.arange(GLOBAL_BATCH) + step * GLOBAL_BATCH


def train_steps(model: PrefixSubspaceModel, rank: int, world: int, reduce) -> list[float]:
    """STEPS AdamW steps on the simplex, rank ``rank`` of ``world`` taking its slice of each batch; ``reduce(params,
    loss)`` averages gradients and loss over ranks (identity in one process). Returns the mean loss per step."""
    params = list(model.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    per_rank = GLOBAL_BATCH // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    losses = []
    model.train()
    for step in range(STEPS):
        ids, mask, labels, index = (t[mine] for t in global_batch(step, model.config.vocab_size))
        alpha = model.sample_alpha(torch.tensor(step), index)  # [B, L, K]
        loss = F.cross_entropy(model(ids, mask, alpha), labels)
        loss.backward()
        model.regulariser().backward()
        losses.append(float(reduce(params, loss.detach())))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def make_model(backbone: torch.nn.Module, family: str) -> PrefixSubspaceModel:
    """K = 3 over ``backbone``: a verbalizer over LABELS for a decoder; for an encoder a simplex head over as many
    classes, from a fixed seed (the same on every rank and in one process)."""
    if family not in ENCODERS:
        return PrefixSubspaceModel(backbone, K, P, label_token_ids=LABELS)
    model = PrefixSubspaceModel(backbone, K, P, num_outputs=len(LABELS))
    start = initial_head(K, model.config.hidden_size, len(LABELS), seed=0)
    model.simplex.head.weight.data.copy_(start["weight"])
    model.simplex.head.bias.data.copy_(start["bias"])
    return model


def start_vertices(model: PrefixSubspaceModel) -> torch.Tensor:
    """Independent K vertices from the frozen model's own activations (a forward through the backbone)."""
    return initial_vertices(model, "activations", seed=0, vocab_size=model.config.vocab_size)


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def gathered_parameters(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every (partitioned) parameter gathered whole, one at a time, as CPU copies."""
    import deepspeed

    full = {}
    for name, param in backbone.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            full[name] = param.data.detach().cpu().clone()
    return full


def compare_with_shards(full: dict[str, torch.Tensor], folder: Path) -> dict:
    """Bit-for-bit comparison of gathered parameters with the checkpoint's tensors of the same names."""
    saved = saved_tensors(folder)
    mismatched = [n for n, t in full.items() if n not in saved or not torch.equal(t, saved[n].to(t.dtype))]
    return {"compared": len(full), "saved": len(saved), "mismatched": mismatched}


def zero3_engine():
    from dist_subspace.core.config import load_config
    from dist_subspace.training.engine import Engine

    overrides = ["engine.deepspeed=zero3_bf16", "model.dtype=float32", f"train.micro_batch_size={GLOBAL_BATCH // 2}"]
    return Engine(load_config(None, overrides))  # fp32: compared with one process at fp32 tolerances


def families(models: Path, out: Path) -> None:
    from dist_subspace.training.engine import parameter_counts

    engine = zero3_engine()
    for family in FAMILIES:
        backbone = engine.load_backbone(str(models / family), decoder=family not in ENCODERS)
        model = make_model(backbone, family).place(engine.device)
        model.backbone = engine.wrap_backbone(backbone)
        with torch.no_grad():
            model.simplex.vertices.copy_(engine.broadcast_(start_vertices(model).contiguous()))
        losses = train_steps(model, engine.rank, engine.world_size, engine.all_reduce_mean_grads)
        _, frozen, local_bytes = parameter_counts(model)
        facts = {
            "world_size": engine.world_size,
            "losses": losses,
            "frozen_numel": frozen,
            "frozen_local_bytes": local_bytes,
            "partitioned": all(hasattr(p, "ds_id") for p in backbone.parameters()),
        }
        name = f"{family}-rank{engine.rank}"
        save_file({"vertices": model.simplex.vertices.detach().cpu()}, str(out / f"{name}.safetensors"))
        gathered = gathered_parameters(backbone)  # a collective: every rank takes part
        if engine.is_main:  # compared by the test with a plain from_pretrained (MoE experts are renamed at load)
            save_file(gathered, str(out / f"{family}-gathered.safetensors"))
        (out / f"{name}.json").write_text(json.dumps(facts))
    engine.end()


class MemorySampler:
    """This process's resident memory (``/proc/self/status``), sampled every millisecond on a thread: the peak of
    private (anonymous) and of file-backed (memory-mapped checkpoint) pages, in bytes."""

    FIELDS = ("RssAnon", "RssFile")

    def __init__(self) -> None:
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def read(cls) -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in cls.FIELDS:
                    values[key] = int(rest.split()[0]) * 1024
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.read().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(0.001)

    def __enter__(self) -> MemorySampler:
        self.before = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for key, value in self.read().items():
            self.peak[key] = max(self.peak[key], value)


def sharded_load(model_dir: Path, out: Path) -> None:
    engine = zero3_engine()
    engine.barrier()
    start = time.perf_counter()
    with MemorySampler() as memory:
        backbone = engine.load_backbone(str(model_dir), decoder=True)
    seconds = time.perf_counter() - start
    shards = sorted(model_dir.glob("*.safetensors"))
    params = list(backbone.parameters())
    facts = {
        "world_size": engine.world_size,
        "load_seconds": seconds,
        "before": memory.before,
        "peak": memory.peak,
        "partitioned": all(hasattr(p, "ds_id") for p in params),
        "numel": sum(p.ds_numel for p in params),
        "local_bytes": sum(p.ds_tensor.numel() * p.element_size() for p in params),  # this rank's partition
        "largest_param_bytes": max(p.ds_numel * p.element_size() for p in params),
        "largest_shard_bytes": max(s.stat().st_size for s in shards),
        "checkpoint_bytes": sum(s.stat().st_size for s in shards),
        "shards": len(shards),
        **compare_with_shards(gathered_parameters(backbone), model_dir),
    }
    (out / f"sharded-load-rank{engine.rank}.json").write_text(json.dumps(facts))
    engine.end()


# What a launcher tells each process about where it stands (torchrun, accelerate, deepspeed and SLURM all set these).
LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "CROSS_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def main(argv: list[str]) -> int:
    argv = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    command, source, out = argv[0], Path(argv[1]), Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    launch = {key: os.environ.get(key) for key in LAUNCH_VARIABLES}
    (out / f"launch-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(launch))
    {"families": families, "sharded-load": sharded_load}[command](source, out)
    return 0


if __name__ == "__main__":
    from dist_subspace.core.cli import exit_now

    exit_now(main(sys.argv[1:]))
