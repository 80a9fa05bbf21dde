"""Checkpoints hold only what is trained: the simplex, its optimizer and scheduler, the step, the best-so-far.

Everything is safetensors + JSON (no pickle) and world-size independent (the simplex is replicated).
A checkpoint is written into a temporary folder and renamed into place, so ``step-N/`` exists only complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dist_subspace.export import save_peft_prefix
from dist_subspace.model import PrefixSubspaceModel
from dist_subspace.simplex import centroid_alpha, expand_alpha, mix_prefix


def _simplex_parameters(model: PrefixSubspaceModel) -> dict[str, torch.nn.Parameter]:
    """The saved names: ``prefix.vertices`` ``[R * K, L, 2, H_kv, P, D]``, ``head.weight``/``head.bias``
    ``[R * K, ...]``, and ``adapter.<name>`` for a baseline's trained backbone parameters (LoRA)."""
    params = {"prefix.vertices": model.simplex.vertices}
    if model.simplex.head is not None:
        params.update({f"head.{n}": p for n, p in model.simplex.head.named_parameters()})
    params.update({f"adapter.{n}": p for n, p in model.adapter.items()})
    return params


def replica_slice(tensors: dict[str, torch.Tensor], replica: int, num_vertices: int) -> dict[str, torch.Tensor]:
    """Seed replica ``replica``'s own tensors (its K rows of the vertices and head): what a one-replica run of
    the same seed would hold. Adapter tensors (R = 1 only) pass through."""
    rows = slice(replica * num_vertices, (replica + 1) * num_vertices)
    return {n: t if n.startswith("adapter.") else t[rows].contiguous() for n, t in tensors.items()}


def put_replica(tensors: dict[str, torch.Tensor], part: dict[str, torch.Tensor], replica: int, k: int) -> None:
    """Write one replica's tensors (from :func:`replica_slice`) back into full ``tensors`` in place."""
    rows = slice(replica * k, (replica + 1) * k)
    for name, value in part.items():
        if name.startswith("adapter."):
            tensors[name].copy_(value)
        else:
            tensors[name][rows].copy_(value)


def simplex_tensors(model: PrefixSubspaceModel) -> dict[str, torch.Tensor]:
    """fp32 CPU copies (never aliases of the live parameters) of everything that is trained."""
    return {
        name: p.detach().to("cpu", torch.float32, copy=True).contiguous()
        for name, p in _simplex_parameters(model).items()
    }


@torch.no_grad()
def load_simplex_tensors(model: PrefixSubspaceModel, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved simplex tensors into ``model`` (shapes must match)."""
    params = _simplex_parameters(model)
    if set(params) != set(tensors):
        raise ValueError(f"checkpoint holds {sorted(tensors)}, the model expects {sorted(params)}")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(tensors[name].shape)} != model {tuple(p.shape)}")
        p.copy_(tensors[name].to(p.device, p.dtype))


def _atomic_dir(target: Path) -> Path:
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.parent / f".old-{target.name}"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)


def save_checkpoint(
    folder: Path,
    model: PrefixSubspaceModel,
    optimizer: torch.optim.Optimizer,
    scheduler,
    step: int,
    best: dict,
    summaries: list[dict] | None = None,
) -> None:
    """Write ``folder`` (``.../checkpoints/step-N``) atomically. Call on one rank.

    ``summaries``: what each replica's ``summary.json`` holds so far (the initial test score), JSON values.

    ``best``: per replica, the best dev ``scores`` so far and their ``steps``, and ``tensors``: the simplex
    in which each replica's rows hold its best-so-far (or None before the first dev score).
    """
    tmp = _atomic_dir(folder)
    save_file(simplex_tensors(model), str(tmp / "simplex.safetensors"))
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = float(value)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    if best["tensors"] is not None:
        save_file(best["tensors"], str(tmp / "best_simplex.safetensors"))
    trainer_state = {
        "step": step,
        "optimizer": {"param_groups": state["param_groups"], "scalars": scalars},
        "scheduler": scheduler.state_dict(),
        "best": {"scores": best["scores"], "steps": best["steps"]},
        "summaries": summaries or [],
    }
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    _publish(tmp, folder)


def read_checkpoint(folder: Path) -> dict:
    """Everything in a checkpoint folder as plain data (CPU tensors, JSON values): ``simplex``, ``optimizer``
    (tensors), the trainer state's keys (``step``, ``optimizer`` scalars and groups, ``scheduler``) and ``best``
    (``scores``, ``steps``, ``tensors``). Read on one rank, sent to the others (node-local disks)."""
    state = json.loads((folder / "trainer_state.json").read_text())
    state["simplex"] = load_file(str(folder / "simplex.safetensors"))
    state["optimizer_tensors"] = load_file(str(folder / "optimizer.safetensors"))
    best = folder / "best_simplex.safetensors"
    state["best"]["tensors"] = load_file(str(best)) if best.exists() else None
    return state


def apply_checkpoint(state: dict, model: PrefixSubspaceModel, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Restore simplex, optimizer and scheduler from :func:`read_checkpoint`'s ``state``."""
    load_simplex_tensors(model, state["simplex"])
    per_param: dict[int, dict] = {}
    for key, value in state["optimizer_tensors"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    for key, value in state["optimizer"]["scalars"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = torch.tensor(value)
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])


def load_checkpoint(folder: Path, model: PrefixSubspaceModel, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore simplex, optimizer and scheduler from ``folder``; returns the trainer state: ``step``, and
    ``best`` in the form :func:`save_checkpoint` takes it."""
    state = read_checkpoint(folder)
    apply_checkpoint(state, model, optimizer, scheduler)
    return state


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete ``checkpoints/step-N`` in a run folder, if any."""
    folders = [p for p in (output_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    return max(folders, key=lambda p: int(p.name[5:])) if folders else None


def save_final(folder: Path, model: PrefixSubspaceModel, info: dict, tensors: dict | None = None) -> None:
    """``final/``: ``simplex.safetensors``, ``simplex_config.json`` and, for decoders, ``peft_centroid/``.

    ``tensors``: one replica's simplex (:func:`replica_slice`); default: the model's own (R = 1).
    """
    tensors = simplex_tensors(model) if tensors is None else tensors
    tmp = _atomic_dir(folder)
    save_file(tensors, str(tmp / "simplex.safetensors"))
    g = model.geometry
    config = {
        "adapter": "prefix" if model.use_prefix else "lora",
        "num_vertices": model.num_vertices,
        "prefix_length": model.prefix_length,
        "num_layers": g.num_layers,
        "num_kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "kind": model.spec.kind,
        "dtype": str(model.compute_dtype).removeprefix("torch."),
        **info,
    }
    (tmp / "simplex_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if model.spec.kind == "decoder" and model.use_prefix:
        vertices = tensors["prefix.vertices"].float()  # [K, L, 2, H_kv, P, D]
        alpha = expand_alpha(centroid_alpha(vertices.shape[0]), 1, g.num_layers)
        centroid = mix_prefix(vertices, alpha)[0]  # [L, 2, H_kv, P, D]
        save_peft_prefix(centroid, g, info.get("model", ""), tmp / "peft_centroid")
    _publish(tmp, folder)
