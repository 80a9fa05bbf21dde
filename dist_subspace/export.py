"""Export a prefix as a PEFT prefix-tuning adapter (``PeftModel.from_pretrained`` loads it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_subspace.arch import PrefixGeometry


def peft_prefix_weight(prefix: torch.Tensor) -> torch.Tensor:
    """Our layout ``[L, 2, H_kv, P, D]`` -> PEFT's prefix embedding ``[P, L * 2 * H_kv * D]``.

    PEFT's ``get_prompt`` views the embedding as ``[B, P, L * 2, H_kv, D]`` and permutes to ``[L * 2, B, H_kv, P, D]``.
    """
    return prefix.permute(3, 0, 1, 2, 4).reshape(prefix.shape[3], -1).contiguous()


def peft_prefix_config(geometry: PrefixGeometry, prefix_length: int, base_model: str) -> dict:
    """The ``adapter_config.json`` of a CAUSAL_LM prefix-tuning adapter without projection."""
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": prefix_length,
        "num_layers": geometry.num_layers,
        "num_attention_heads": geometry.num_kv_heads,
        "token_dim": geometry.num_kv_heads * geometry.head_dim,
        "encoder_hidden_size": geometry.num_kv_heads * geometry.head_dim,
        "num_transformer_submodules": 1,
        "prefix_projection": False,
        "inference_mode": True,
    }


def save_peft_prefix(prefix: torch.Tensor, geometry: PrefixGeometry, base_model: str, out_dir: Path) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for ``prefix`` ``[L, 2, H_kv, P, D]``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = peft_prefix_config(geometry, prefix.shape[3], base_model)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    weight = peft_prefix_weight(prefix.detach().float().cpu())
    save_file({"prompt_embeddings": weight}, str(out_dir / "adapter_model.safetensors"))
