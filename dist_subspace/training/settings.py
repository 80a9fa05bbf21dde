"""What a run's settings decide before any process group exists: the compute dtype (``model.dtype``, bf16 where it
is native) and the DeepSpeed JSON (found by name or path, checked against the run config, its ``"auto"`` values
filled from it: one source of truth). Plain torch and dicts: no Accelerate, no DeepSpeed (the engine hands the
result to them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dist_subspace.core.config import Config, ConfigError
from dist_subspace.core.paths import DS_CONFIGS
from dist_subspace.training.memory import unfilled_auto


def resolve_ds_config(name: str) -> Path:
    """A DeepSpeed JSON by path or by name in ``ds_configs/`` (``zero3_bf16`` or ``zero3_bf16.json``)."""
    for candidate in (Path(name), DS_CONFIGS / name, DS_CONFIGS / f"{name}.json"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in DS_CONFIGS.glob("*.json"))
    raise ConfigError(f"engine.deepspeed={name!r}: no such file; give a path or one of {known}")


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that compute in bf16 natively


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux; an empty set where they cannot be read)."""
    try:
        with open(cpuinfo) as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def auto_dtype(capability: tuple[int, int] | None, flags: set[str] | frozenset[str] = frozenset()) -> torch.dtype:
    """bfloat16 where bf16 is native, float32 otherwise: a CUDA GPU of compute capability >= 8.0 (Ampere and
    later), or without a GPU (``capability`` None) a CPU whose ``flags`` include avx512_bf16 or AMX.

    V100 (7.0) and T4 (7.5) only emulate bf16 (slowly), although ``torch.cuda.is_bf16_supported()`` says yes: they
    get float32, as do CPUs without bf16 instructions (where bf16 matmuls are slower than fp32). The simplex and its
    optimizer stay float32 either way; only the frozen backbone and the mixed prefix run in the compute dtype.
    """
    if capability is not None:
        return torch.bfloat16 if capability >= (8, 0) else torch.float32
    return torch.bfloat16 if any(flag in flags for flag in CPU_BF16_FLAGS) else torch.float32


def compute_dtype(name: str) -> torch.dtype:
    """The backbone's dtype for ``model.dtype``: ``auto`` (see :func:`auto_dtype`), ``float32`` or ``bfloat16``."""
    if name == "auto":
        if torch.cuda.is_available():
            return auto_dtype(torch.cuda.get_device_capability())
        return auto_dtype(None, cpu_flags())
    return getattr(torch, name)


def read_ds_config(name: str) -> dict:
    """A DeepSpeed JSON (:func:`resolve_ds_config`) as a dict; a one-line error naming the file and line if invalid."""
    path = resolve_ds_config(name)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"engine.deepspeed: {path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"engine.deepspeed: cannot read {path} ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"engine.deepspeed: {path} must hold a JSON object, not {type(ds).__name__}")
    return ds


def _explicit(value) -> bool:
    return value is not None and value != "auto"


def _offload_device(zero: dict, key: str) -> str | None:
    device = (zero.get(key) or {}).get("device")
    return None if device in (None, "none") else device


def check_ds_config(
    ds: dict, cfg: Config, dtype: torch.dtype, world_size: int, cuda: bool, strict: bool = True
) -> None:
    """Refuse DeepSpeed settings that contradict the run config or need a GPU this machine lacks.

    ``strict`` (a JSON the user names with ``engine.deepspeed``): the run config is the one source of truth
    for batch sizes and dtype, so a value other than ``"auto"`` must agree with it. Not strict (a config that
    Accelerate built from its own YAML, with its own defaults): those values are overwritten with ours.
    """
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError("the DeepSpeed config's zero_optimization.stage must be 0, 1, 2 or 3")
    problem = unfilled_auto(zero, "the DeepSpeed config")
    if problem:
        raise ConfigError(problem)
    if _offload_device(zero, "offload_optimizer"):
        raise ConfigError(
            "the DeepSpeed config offloads an optimizer, but DeepSpeed has none here (the simplex is optimised "
            "outside it); remove zero_optimization.offload_optimizer"
        )
    if not cuda:
        if _offload_device(zero, "offload_param") == "nvme" or "aio" in ds:
            raise ConfigError(
                "the DeepSpeed config offloads to NVMe (async I/O), which needs a GPU machine; on this machine "
                'without a GPU use zero_optimization.offload_param.device="cpu"'
            )
        if (ds.get("amp") or {}).get("enabled"):
            raise ConfigError("the DeepSpeed config enables amp (NVIDIA apex), which needs a GPU; remove it")
    if not strict:
        return
    t = cfg.train
    for key, ours, name in (
        ("train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps", t.grad_accum, "train.grad_accum"),
    ):
        if _explicit(ds.get(key)) and ds[key] != ours:
            raise ConfigError(f'the DeepSpeed config sets {key}={ds[key]} but {name}={ours}; set it to "auto"')
    total = ds.get("train_batch_size")
    if _explicit(total):
        per_step = t.micro_batch_size * t.grad_accum
        if not isinstance(total, int) or total % world_size:
            raise ConfigError(
                f"the DeepSpeed config's train_batch_size={total!r} cannot be divided over {world_size} process(es); "
                'set it to "auto": the global batch is train.micro_batch_size x train.grad_accum x world size'
            )
        if total != per_step * world_size:
            raise ConfigError(
                f"the DeepSpeed config's train_batch_size={total} != train.micro_batch_size {t.micro_batch_size} x "
                f'train.grad_accum {t.grad_accum} x world size {world_size}; set it to "auto"'
            )
    for section, wanted in (("bf16", dtype == torch.bfloat16), ("fp16", False)):
        enabled = (ds.get(section) or {}).get("enabled")
        if isinstance(enabled, bool) and enabled != wanted:
            raise ConfigError(
                f"the DeepSpeed config sets {section}.enabled={str(enabled).lower()} but the compute dtype is "
                f'{str(dtype).removeprefix("torch.")} (model.dtype={cfg.model.dtype}); set it to "auto"'
            )


def _fill_ds_config(ds: dict, cfg: Config, dtype: torch.dtype, strict: bool = True) -> dict:
    """Replace DeepSpeed's ``"auto"`` values with ours (one source of truth: the run config)."""
    check_ds_config(ds, cfg, dtype, int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.is_available(), strict)
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


# ---- experiment trackers (Accelerate's: TensorBoard, MLflow, W&B, Comet, Aim, ClearML, DVCLive, SwanLab, Trackio) ----
# The pip package of each tracker Accelerate knows, where it differs from the tracker's name (mlflow-skinny also
# serves "mlflow": it logs to a tracking server or a file store; the full mlflow adds its default local database).
