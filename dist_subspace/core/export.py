"""A prefix as a PEFT prefix-tuning adapter, out (``PeftModel.from_pretrained`` loads it) and in (a PEFT adapter
as the start of a simplex)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dist_subspace.core.arch import PrefixGeometry
from dist_subspace.core.simplex import centroid_alpha, expand_alpha, mix_prefix


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


def save_peft_centroid(vertices: torch.Tensor, geometry: PrefixGeometry, base_model: str, out_dir: Path) -> None:
    """The centroid of ``vertices`` ``[K, L, 2, H_kv, P, D]`` as a PEFT adapter (:func:`save_peft_prefix`): what
    ``final/peft_centroid`` holds."""
    alpha = expand_alpha(centroid_alpha(vertices.shape[0]), 1, vertices.shape[1])  # [1, L, K]
    save_peft_prefix(mix_prefix(vertices.float(), alpha)[0], geometry, base_model, out_dir)


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


def peft_adapter_geometry(config: dict) -> PrefixGeometry | None:
    """The backbone geometry (L, H_kv, D) a PEFT prefix-tuning adapter was made for, from what PEFT's
    ``PrefixTuningConfig`` records in ``adapter_config.json``: ``num_layers`` (L), ``num_attention_heads`` (H_kv
    under grouped-query attention) and ``token_dim`` (H_kv * D). None when one of them is missing."""
    values = [config.get(key) for key in ("num_layers", "num_attention_heads", "token_dim")]
    if not all(isinstance(v, int) and v > 0 for v in values):
        return None
    layers, heads, width = values
    return PrefixGeometry(layers, heads, width // heads)


def _describe(g: PrefixGeometry) -> str:
    return f"{g.num_layers} layers x {g.num_kv_heads} key/value heads x head width {g.head_dim}"


def check_peft_fit(
    folder: Path, config: dict, weight: torch.Tensor, prefix_length: int, geometry: PrefixGeometry | None = None
) -> None:
    """ValueError, one line, unless a PEFT adapter (:func:`read_peft_adapter`'s config and prefix embedding
    ``[P, L * 2 * H_kv * D]``) holds the prefix its config describes, of ``prefix_length`` tokens and, when
    ``geometry`` is given, for a backbone of that L, H_kv and D, each compared on its own (the total width alone
    would take 6 heads x 32 for 3 x 64); the error names the adapter's base model."""
    where = f"prefix.init=peft:{folder}"
    if weight.dim() != 2:
        raise ValueError(
            f"{where}: prompt_embeddings is {tuple(weight.shape)}, not [P, L * 2 * H_kv * D]; save the adapter again "
            "with PEFT's save_pretrained"
        )
    tokens = weight.shape[0]
    if tokens != prefix_length:
        raise ValueError(
            f"{where}: the adapter's prefix is {tokens} tokens (num_virtual_tokens={config.get('num_virtual_tokens')}),"
            f" prefix.length is {prefix_length}; set prefix.length={tokens}"
        )
    own = peft_adapter_geometry(config)
    if own is not None:
        width = own.num_layers * 2 * own.num_kv_heads * own.head_dim
        if weight.shape[1] != width:
            raise ValueError(
                f"{where}: adapter_model.safetensors holds a prefix of {tuple(weight.shape)}, adapter_config.json says "
                f"{_describe(own)}, which is ({tokens}, {width}); save the adapter again with PEFT's save_pretrained"
            )
    if geometry is None:
        return
    g = geometry
    base = config.get("base_model_name_or_path")
    fix = "use a prefix-tuning adapter trained on this model" + (f", or set model.name_or_path={base}" if base else "")
    if own is None:  # no geometry recorded (not made by PEFT): the total width is all there is to compare
        want = (prefix_length, g.num_layers * 2 * g.num_kv_heads * g.head_dim)
        if tuple(weight.shape) != want:
            raise ValueError(
                f"{where}: the adapter's prefix is {tuple(weight.shape)}, this model's ({_describe(g)}) is {want} "
                f"(its adapter_config.json records no num_layers, num_attention_heads, token_dim); {fix}"
            )
        return
    pairs = [
        ("number of layers", own.num_layers, g.num_layers),
        ("number of key/value heads", own.num_kv_heads, g.num_kv_heads),
        ("head width", own.head_dim, g.head_dim),
    ]
    differs = [name for name, theirs, ours in pairs if theirs != ours]
    if differs:
        made = f"was made for {base} ({_describe(own)})" if base else f"is for {_describe(own)}"
        raise ValueError(
            f"{where}: the adapter {made}, this model has {_describe(g)}: a different {' and '.join(differs)}; {fix}"
        )


def load_peft_prefix(folder: Path, geometry: PrefixGeometry, prefix_length: int) -> torch.Tensor:
    """A PEFT prefix-tuning adapter (:func:`read_peft_adapter`) as a prefix ``[L, 2, H_kv, P, D]`` (float32) for a
    backbone of ``geometry``; ValueError, one line, when it does not fit it and ``prefix.length``
    (:func:`check_peft_fit`)."""
    config, weight = read_peft_adapter(folder)
    check_peft_fit(folder, config, weight, prefix_length, geometry)
    g = geometry
    return prefix_from_peft_weight(weight, g.num_layers, g.num_kv_heads, g.head_dim)
