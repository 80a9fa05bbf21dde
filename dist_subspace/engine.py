"""The one door to the distributed world: Accelerate and DeepSpeed live here and nowhere else.

The frozen backbone goes to DeepSpeed (ZeRO-3 partitions it at construction, gathers each layer for its
forward and backward) or stays a plain replicated module (one process, DDP-style, ZeRO off). The trainable
simplex never enters DeepSpeed: it is tiny, replicated on every rank in fp32, optimised by a plain torch
AdamW, and only its gradients are all-reduced (one flat tensor per optimizer step). So every launch form
runs the same optimizer code, checkpoints are world-size independent, and ranks stay bit-identical.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
from torch import nn

from dist_subspace.config import Config, ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


def resolve_ds_config(name: str) -> Path:
    """A DeepSpeed JSON by path or by name in ``ds_configs/`` (``zero3_bf16`` or ``zero3_bf16.json``)."""
    for candidate in (Path(name), DS_CONFIG_DIR / name, DS_CONFIG_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
    raise ConfigError(f"engine.deepspeed={name!r}: no such file; give a path or one of {known}")


def compute_dtype(name: str) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU that supports it and float32 elsewhere (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def _fill_ds_config(ds: dict, cfg: Config, dtype: torch.dtype) -> dict:
    """Replace DeepSpeed's ``"auto"`` values with ours (one source of truth: the run config)."""
    ds = json.loads(json.dumps(ds))
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.train.max_grad_norm
    ds.setdefault("bf16", {})["enabled"] = dtype == torch.bfloat16
    ds.setdefault("fp16", {})["enabled"] = dtype == torch.float16
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"the DeepSpeed config names a {key}; remove it: only the simplex is optimised, by us")
    return ds


def _single_process_env() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ.update(env)


class Engine:
    """Process group, device, DeepSpeed wrapping of the backbone, and the few collectives the loop needs."""

    def __init__(self, cfg: Config) -> None:
        self.dtype = compute_dtype(cfg.model.dtype)
        plugin = None
        if cfg.engine.deepspeed:
            ds = json.loads(resolve_ds_config(cfg.engine.deepspeed).read_text())
            plugin = DeepSpeedPlugin(hf_ds_config=_fill_ds_config(ds, cfg, self.dtype))
        elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            plugin = DeepSpeedPlugin()  # from `accelerate launch --config_file` (its deepspeed_config_file)
            plugin.deepspeed_config.update(_fill_ds_config(plugin.deepspeed_config, cfg, self.dtype))
        if plugin is not None and "RANK" not in os.environ:
            _single_process_env()  # plain `python -m` with DeepSpeed: be rank 0 of 1 (else it looks for MPI)
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or plugin is not None
        # Without a GPU, accelerate would make every rank "rank 0 of 1" while DeepSpeed sees them all: ask for gloo.
        handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
        self.accelerator = Accelerator(
            kwargs_handlers=handlers, deepspeed_plugin=plugin, gradient_accumulation_steps=cfg.train.grad_accum
        )
        self.deepspeed = plugin is not None
        self.zero_stage = plugin.zero_stage if plugin is not None else 0
        # ZeRO-1/2 shard optimizer state and gradients, which a frozen backbone has none of (and DeepSpeed refuses
        # them without an optimizer): under those stages the backbone is replicated, like plain data parallel.
        self.partitioned = self.zero_stage == 3
        # HfDeepSpeedConfig is alive now (made by the plugin): from_pretrained partitions under ZeRO-3.

    # ---- facts -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def describe(self) -> str:
        if self.partitioned:
            mode = "DeepSpeed ZeRO-3: frozen backbone partitioned over ranks"
        elif self.deepspeed:
            mode = f"DeepSpeed ZeRO-{self.zero_stage}: frozen backbone replicated (nothing of it to shard)"
        else:
            mode = "frozen backbone replicated (no DeepSpeed)"
        return f"{self.world_size} process(es) on {self.device.type}, {mode}, compute dtype {self.dtype}"

    # ---- the backbone ----------------------------------------------------------------------------
    def load_backbone(self, path: str, decoder: bool) -> nn.Module:
        """from_pretrained in the compute dtype; under ZeRO-3 each rank only ever holds its shard."""
        from transformers import AutoModel, AutoModelForCausalLM

        cls = AutoModelForCausalLM if decoder else AutoModel
        kwargs = {} if decoder else {"add_pooling_layer": False}
        try:
            model = cls.from_pretrained(path, dtype=self.dtype, **kwargs)
        except TypeError:  # families without a pooler
            model = cls.from_pretrained(path, dtype=self.dtype)
        model.eval()
        if not self.partitioned:
            model.to(self.device)
        elif not all(hasattr(p, "ds_id") for p in model.parameters()):  # never let a 70B model land whole on a rank
            raise RuntimeError("ZeRO-3 is on but from_pretrained built the backbone whole on this rank")
        return model

    def wrap_backbone(self, backbone: nn.Module) -> nn.Module:
        """Hand the frozen backbone to DeepSpeed (no optimizer: nothing in it trains); returns the module to call.

        ZeRO-3's gather/release hooks live on the module's own submodules, so we call the module, not the
        engine: the engine's forward adds training bookkeeping for an optimizer it does not have (and then
        refuses ``loss.backward()``). The engine is kept alive here, with its hooks.
        """
        if not self.partitioned:
            return backbone
        self.ds_engine = self.accelerator.prepare(backbone)
        return self.ds_engine.module

    # ---- collectives -----------------------------------------------------------------------------
    def all_reduce_mean_grads(self, params: Sequence[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Average the simplex gradients over ranks in one flat all-reduce, ``loss`` (0-d, or one per replica
        ``[R]``) riding along; returns the mean loss over ranks, shaped like ``loss``."""
        if self.world_size == 1:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(-1).to(grads[0].dtype)])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n
        return flat[offset:].view_as(loss).to(loss.dtype)

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (a picklable Python value, e.g. a checkpoint read from its disk) on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Make every rank hold rank 0's ``tensor`` (in place)."""
        if self.world_size > 1:
            dist.broadcast(tensor, src=0)
        return tensor

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (a picklable Python value), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def main_process_first(self):
        return self.accelerator.main_process_first()

    def end(self) -> None:
        """Close the process group and forget this run's Accelerate/DeepSpeed state, so a later run in the
        same process (a notebook, a test) starts clean instead of inheriting this one's plugin or ZeRO-3."""
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        self.accelerator.end_training()
        if dist.is_initialized():
            dist.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)
        unset_hf_deepspeed_config()


def parameter_counts(module: nn.Module) -> tuple[int, int, int]:
    """(trainable, frozen, bytes of frozen parameters held by this rank); ZeRO-3 shards count ``ds_numel``."""
    trainable = frozen = local_bytes = 0
    for p in module.parameters():
        numel = getattr(p, "ds_numel", p.numel())
        if p.requires_grad:
            trainable += numel
        else:
            frozen += numel
            local = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
            local_bytes += local * p.element_size()
    return trainable, frozen, local_bytes
