"""A prefix as a PEFT prefix-tuning adapter, out (``PeftModel.from_pretrained`` loads it) and in (a PEFT adapter
as the start of a simplex)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dist_subspace.core.arch import PrefixGeometry


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


def prefix_from_peft_weight(weight: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """PEFT's prefix embedding ``[P, L * 2 * H_kv * D]`` -> our layout ``[L, 2, H_kv, P, D]`` (the inverse of
    :func:`peft_prefix_weight`)."""
    p = weight.shape[0]
    return weight.view(p, num_layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()


def read_peft_adapter(folder: Path) -> tuple[dict, torch.Tensor]:
    """A PEFT prefix-tuning adapter's ``adapter_config.json`` and prefix embedding ``[P, L * 2 * H_kv * D]``
    (safetensors only). ValueError, one line, when ``folder`` is not such an adapter."""
    folder = Path(folder)
    where = f"prefix.init=peft:{folder}"
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        hint = " (adapter_model.bin is a pickle: re-save it with safe_serialization=True)" if pickled else ""
        raise ValueError(f"{where}: no adapter_model.safetensors there{hint}; give a PEFT adapter folder")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: adapter_config.json cannot be read ({err}); give a PEFT adapter folder") from None
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{where}: a {config.get('peft_type')} adapter, not PREFIX_TUNING; give a prefix-tuning one")
    tensors = load_file(str(weights))
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{where}: adapter_model.safetensors holds {sorted(tensors)}, no prompt_embeddings")
    return config, tensors["prompt_embeddings"].float()


def load_peft_prefix(folder: Path, geometry: PrefixGeometry, prefix_length: int) -> torch.Tensor:
    """A PEFT prefix-tuning adapter (:func:`read_peft_adapter`) as a prefix ``[L, 2, H_kv, P, D]`` (float32) for a
    backbone of ``geometry``; ValueError, one line, when its geometry is not this backbone's and ``prefix.length``'s."""
    config, weight = read_peft_adapter(folder)
    g = geometry
    want = (prefix_length, g.num_layers * 2 * g.num_kv_heads * g.head_dim)
    if tuple(weight.shape) != want or config.get("num_layers", g.num_layers) != g.num_layers:
        raise ValueError(
            f"prefix.init=peft:{folder}: the adapter's prefix is {tuple(weight.shape)} over "
            f"{config.get('num_layers')} layers (P = {config.get('num_virtual_tokens')}), this backbone and "
            f"prefix.length need {want} over {g.num_layers} layers of {g.num_kv_heads} key/value heads x "
            f"{g.head_dim} (P = {prefix_length}); set prefix.length to the adapter's P, or use an adapter trained on "
            "this model"
        )
    return prefix_from_peft_weight(weight, g.num_layers, g.num_kv_heads, g.head_dim)
