"""Checkpoints hold only what is trained: the simplex, its optimizer and scheduler, the step, the best-so-far.

Everything is safetensors + JSON (no pickle) and world-size independent (the simplex is replicated).
A checkpoint is written into a temporary folder, sealed (``checksums.json``, then every file and folder
fsync'ed) and renamed into place, so ``step-N/`` exists only complete, even after a power loss. A save
killed midway leaves ``.tmp-*``/``.old-*`` folders that :func:`recover_interrupted_saves` resolves on the
next start; docs/reliability.md lists every stage and what survives it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dist_subspace.core.export import save_peft_centroid
from dist_subspace.core.files import write_atomic
from dist_subspace.core.model import PrefixSubspaceModel


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
    fix = "it was trained with another simplex.vertices, prefix.length or model; use one of this configuration"
    if set(params) != set(tensors):
        raise ValueError(f"the checkpoint holds {sorted(tensors)}, this model expects {sorted(params)}: {fix}")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(
                f"{name}: the checkpoint's shape {tuple(tensors[name].shape)} differs from this model's "
                f"{tuple(p.shape)} ([K, L, 2, H_kv, P, D] for the prefix): {fix}"
            )
        p.copy_(tensors[name].to(p.device, p.dtype))


def _atomic_dir(target: Path) -> Path:
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


CHECKSUMS = "checksums.json"
# The run-folder format. 2: every checkpoint and final/ folder is sealed with checksums.json, which verification
# then requires; folders with no "format" (written before it) are checked on their safetensors headers alone.
FORMAT_VERSION = 2
MANIFESTS = ("trainer_state.json", "simplex_config.json")  # where a checkpoint / final/ folder states its format


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be used (missing, truncated or corrupt file); one-line message."""


def _crash_point(stage: str, path: Path) -> None:
    """The stages at which a save can be interrupted (``written``, ``sealed``, ``old-moved``, ``published``,
    ``pruning``). Does nothing; the reliability tests replace it to kill the process exactly there."""


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's (its entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _seal(folder: Path) -> None:
    """Write ``checksums.json`` (sha256 of every file), then fsync every file and folder, so that a rename
    that follows can never publish an empty or partial file (a power loss keeps renames, not unflushed data)."""
    sums = {str(p.relative_to(folder)): _sha256(p) for p in _files(folder)}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1) + "\n")
    for path in _files(folder):
        _fsync(path)
    for sub in sorted({p.parent for p in _files(folder)}, key=lambda p: -len(p.parts)):
        _fsync(sub)


def _publish(tmp: Path, target: Path) -> None:
    """Seal ``tmp`` and rename it to ``target``; an existing ``target`` is moved aside to ``.old-*`` first and
    deleted only once the new one is in place."""
    _crash_point("written", tmp)
    _seal(tmp)
    _crash_point("sealed", tmp)
    if target.exists():
        old = target.parent / f".old-{target.name}"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        _crash_point("old-moved", old)
        tmp.rename(target)
        _fsync(target.parent)
        _crash_point("published", target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
        _fsync(target.parent)
        _crash_point("published", target)


def discard_partial(target: Path) -> None:
    """Remove the temporary folder of a save of ``target`` that failed (e.g. a full disk)."""
    shutil.rmtree(target.parent / f".tmp-{target.name}", ignore_errors=True)


def recover_interrupted_saves(output_dir: Path) -> list[str]:
    """Resolve what a save killed midway left in a run folder; returns what was done, for the log.

    ``.tmp-X`` (never published) and ``.del-X`` (retention was deleting it) are removed; ``.old-X`` whose ``X``
    is missing (killed between the two renames of a replacement) is the previous, complete ``X``: it is put
    back; any other ``.old-X`` is removed. Run it on one process, before anything reads the run folder.
    """
    done = []
    for parent in (output_dir, output_dir / "checkpoints", *sorted(output_dir.glob("replica-*"))):
        if not parent.is_dir():
            continue
        for path in sorted(parent.iterdir()):
            prefix, target = path.name[:5], parent / path.name[5:]
            if prefix in (".tmp-", ".del-") or (prefix == ".old-" and target.exists()):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                done.append(f"removed {path}")
            elif prefix == ".old-":
                path.rename(target)
                _fsync(parent)
                done.append(f"restored {target} (a save was interrupted while replacing it)")
    return done


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The published ``checkpoints/step-N`` folders of a run, oldest first."""
    folders = [
        p
        for p in (output_dir / "checkpoints").glob("step-*")
        if p.name[5:].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return sorted(folders, key=lambda p: int(p.name[5:]))


def prune_checkpoints(output_dir: Path, keep: int, protect_steps: Sequence[int | None] = ()) -> list[Path]:
    """Keep the newest ``keep`` checkpoints and those of ``protect_steps`` (the best-so-far's steps, one per
    replica); delete older ones (each renamed to ``.del-*`` first, atomic, then removed). ``keep=0`` keeps all.
    Call after a save is complete: a checkpoint is deleted only once a newer one is published."""
    if keep < 1:
        return []
    folders = complete_checkpoints(output_dir)
    removed = []
    for folder in folders[:-keep]:
        if folder.name in {f"step-{s}" for s in protect_steps}:
            continue
        doomed = folder.parent / f".del-{folder.name}"
        folder.rename(doomed)
        _crash_point("pruning", doomed)
        shutil.rmtree(doomed)
        removed.append(folder)
    return removed


def folder_format(folder: Path, hint: str) -> int:
    """The format a checkpoint or ``final/`` folder declares in its manifest (1: none, written before formats)."""
    for name in MANIFESTS:
        path = folder / name
        if path.is_file():
            try:
                return int(json.loads(path.read_text()).get("format", 1))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError):
                raise CheckpointError(f"{path} is corrupt (not a JSON object); {hint}") from None
    return 1


def verify_folder(folder: Path, required: Sequence[str], hint: str) -> None:
    """Refuse a checkpoint or ``final/`` folder that is incomplete, truncated or corrupt, in one line ending in
    ``hint`` (what to do): every ``required`` file is there, every file matches ``checksums.json`` (mandatory
    from format 2 on; folders from before formats are only header-checked), every safetensors header reads."""
    for name in required:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: {name} is missing; {hint}")
    sums_path = folder / CHECKSUMS
    declared = folder_format(folder, hint)
    if declared >= 2 and not sums_path.is_file():
        raise CheckpointError(f"{sums_path} is missing (format {declared} folders are always sealed with it); {hint}")
    if sums_path.is_file():
        try:
            sums = json.loads(sums_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{sums_path} is corrupt (not JSON); {hint}") from None
        for name, digest in sums.items():
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"{path} is missing; {hint}")
            if _sha256(path) != digest:
                raise CheckpointError(f"{path} is truncated or corrupt (its sha256 differs from {CHECKSUMS}); {hint}")
    for path in folder.rglob("*.safetensors"):
        read_tensors(path, hint, header_only=True)


def read_tensors(path: Path, hint: str = "", header_only: bool = False) -> dict[str, torch.Tensor]:
    """``load_file`` with a one-line :class:`CheckpointError` for a missing, truncated or corrupt file."""
    try:
        if header_only:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
            return {}
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({detail}){'; ' + hint if hint else ''}") from None


def save_checkpoint(
    folder: Path,
    model: PrefixSubspaceModel,
    optimizer: torch.optim.Optimizer,
    scheduler,
    step: int,
    best: dict[str, dict],
    summaries: list[dict] | None = None,
) -> None:
    """Write ``folder`` (``.../checkpoints/step-N``) atomically. Call on one rank.

    ``summaries``: what each replica's ``summary.json`` holds so far (the initial test score), JSON values.

    ``best``: per selection rule (``eval.select_by``, ``eval.also_select_by``: ``centroid``, ``sampled:8``, ...), per
    replica, the best dev ``scores`` so far and their ``steps``, and ``tensors``: the simplex in which each replica's
    rows hold its best-so-far under that rule (or None before the first dev score). The rules are recorded, so that
    a resume under another rule is refused instead of keeping this rule's choice under the other's name.
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
    kept = {
        f"{rule}|{name}": t for rule, b in best.items() if b["tensors"] is not None for name, t in b["tensors"].items()
    }
    if kept:
        save_file(kept, str(tmp / "best_simplex.safetensors"))
    trainer_state = {
        "format": FORMAT_VERSION,
        "step": step,
        "optimizer": {"param_groups": state["param_groups"], "scalars": scalars},
        "scheduler": scheduler.state_dict(),
        "best": {"by": {rule: {"scores": b["scores"], "steps": b["steps"]} for rule, b in best.items()}},
        "summaries": summaries or [],
    }
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    _publish(tmp, folder)


RESUME_HINT = "delete that checkpoint folder to resume from the one before, or pass train.resume=<an older step-N>"


def checkpoint_rules(folder: Path) -> list[str] | None:
    """The selection rules whose best a checkpoint keeps (None: a checkpoint from before rules were recorded, which
    kept one best, under its run's ``eval.select_by``)."""
    best = json.loads((folder / "trainer_state.json").read_text()).get("best", {})
    return list(best["by"]) if "by" in best else None


def checkpoint_legacy_rule(folder: Path) -> str:
    """The rule a checkpoint from before rules were recorded kept its best by: its run's ``eval.select_by`` (the run
    folder's ``config.yaml``, written by the run that saved it), else ``centroid`` (the default)."""
    import yaml

    try:
        saved = yaml.safe_load((Path(folder).parent.parent / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "centroid"
    return str((saved.get("eval") or {}).get("select_by") or "centroid")


def read_checkpoint(folder: Path, legacy_rule: str = "centroid") -> dict:
    """Everything in a checkpoint folder as plain data (CPU tensors, JSON values): ``simplex``, ``optimizer``
    (tensors), the trainer state's keys (``step``, ``optimizer`` scalars and groups, ``scheduler``) and ``best``
    (per rule: ``scores``, ``steps``, ``tensors``; a checkpoint from before rules were recorded keeps its one best
    under ``legacy_rule``). Read on one rank, sent to the others (node-local disks). A missing, truncated or corrupt
    file is refused in one line (:class:`CheckpointError`)."""
    verify_folder(folder, ("simplex.safetensors", "optimizer.safetensors", "trainer_state.json"), RESUME_HINT)
    state = json.loads((folder / "trainer_state.json").read_text())
    state["simplex"] = read_tensors(folder / "simplex.safetensors", RESUME_HINT)
    state["optimizer_tensors"] = read_tensors(folder / "optimizer.safetensors", RESUME_HINT)
    path = folder / "best_simplex.safetensors"
    kept = read_tensors(path, RESUME_HINT) if path.exists() else {}
    if "by" not in state["best"]:  # one best, names without a rule
        state["best"] = {"by": {legacy_rule: {**state["best"], "tensors": None}}}
        kept = {f"{legacy_rule}|{name}": t for name, t in kept.items()}
    best = state["best"] = state["best"]["by"]
    for rule in best:
        tensors = {name.partition("|")[2]: t for name, t in kept.items() if name.partition("|")[0] == rule}
        best[rule]["tensors"] = tensors or None
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
    """The newest complete ``checkpoints/step-N`` in a run folder, if any (``.tmp-*``/``.old-*`` never count)."""
    folders = complete_checkpoints(output_dir)
    return folders[-1] if folders else None


def save_final(
    folder: Path, model: PrefixSubspaceModel, info: dict, tensors: dict | None = None, card: str | None = None
) -> None:
    """``final/``: ``simplex.safetensors``, ``simplex_config.json``, for decoders ``peft_centroid/``, and the model
    card ``README.md`` (``card``, see :mod:`dist_subspace.training.card`), sealed and published together.

    ``tensors``: one replica's simplex (:func:`replica_slice`); default: the model's own (R = 1).
    """
    tensors = simplex_tensors(model) if tensors is None else tensors
    tmp = _atomic_dir(folder)
    save_file(tensors, str(tmp / "simplex.safetensors"))
    g = model.geometry
    config = {
        "format": FORMAT_VERSION,
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
        save_peft_centroid(tensors["prefix.vertices"], g, info.get("model", ""), tmp / "peft_centroid")
    if card is not None:
        write_atomic(tmp / "README.md", card)
    _publish(tmp, folder)
