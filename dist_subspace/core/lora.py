"""The LoRA baseline: PEFT's LoRA on the frozen backbone, scored through the same verbalizer or head.

It reuses :class:`PrefixSubspaceModel` with the prefix switched off, so the trainer, the checkpoints and every
evaluation mode treat it like any run (K = 1: one model, no simplex). Only the LoRA matrices (and an encoder's
head) train; they are saved as ``adapter.*`` tensors next to the (unused) prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_subspace.core.model import PrefixSubspaceModel


def add_lora(
    model: PrefixSubspaceModel, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] | None = None, seed: int = 0
) -> None:
    """Inject LoRA (rank ``rank``, scale ``alpha / rank``, no dropout) into the backbone's ``targets`` modules
    (default: the family's query and value projections) and make it the model's only trained part, besides a
    head. The A matrices are drawn from ``seed``; B starts at zero, so the model starts as the frozen one."""
    from peft import LoraConfig, inject_adapter_in_model

    modules = list(targets or model.spec.lora_targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=modules)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        inject_adapter_in_model(config, model.backbone)
    finally:
        torch.random.set_rng_state(state)
    model.adapter = {n: p for n, p in model.backbone.named_parameters() if "lora_" in n}
    if not model.adapter:
        raise ValueError(f"LoRA found no module named {modules} in {model.config.model_type}; set lora.targets")
    device = model.simplex.vertices.device
    for p in model.adapter.values():
        p.data = p.data.to(device, torch.float32)  # fp32 master weights, like the simplex
        p.requires_grad_(True)
    model.use_prefix = False
    model.simplex.vertices.requires_grad_(False)
