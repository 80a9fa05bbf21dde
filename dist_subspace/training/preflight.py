"""Checks that run before anything heavy loads: a bad input is refused in one line, with nothing written.

``train`` calls :func:`check_output_dir` then :func:`check_train`; ``evaluate`` calls :func:`check_run_folder`.
Every failure is a :class:`~dist_subspace.core.config.ConfigError` whose message says how to fix it.
docs/reliability.md lists each case and the test that proves it.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
from pathlib import Path

import yaml
from safetensors import safe_open

from dist_subspace.core.arch import PrefixGeometry, arch_spec
from dist_subspace.core.config import Config, ConfigError
from dist_subspace.core.embedded import EMBEDDED_MODELS, resolve_model
from dist_subspace.training.checkpoint import CheckpointError, latest_checkpoint, read_tensors, verify_folder

# What a run is: a checkpoint may only continue a run whose config agrees on these keys (others, such as
# train.max_steps or train.lr, may change on resume).
RUN_IDENTITY = (
    "model.name_or_path",
    "model.adapter",
    "prefix.length",
    "simplex.vertices",
    "simplex.replicas",
    "simplex.sampling",
    "data.task",
    "data.data_files",
    "data.protocol",
    "data.shots_per_class",
    "data.first_n",
    "data.train_size",
    "data.dev_size",
    "data.seed",
    "data.text_field",
    "data.text_pair_field",
    "data.label_field",
    "data.label_words",
    "data.template",
    "data.prompt_field",
    "data.response_field",
    "data.messages_field",
    "train.seed",
)
TRACKERS_EXTRA = ("tensorboard", "mlflow", "wandb")  # what pip install 'dist_subspace[trackers]' brings
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def is_main_rank() -> bool:
    """Rank 0 of the job, known from the launcher's environment before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def check_output_dir(out: Path) -> None:
    """Refuse an output folder that cannot be written, before the model loads (nothing is left behind)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"train.output_dir={str(out)!r}: {existing} is a file, not a folder; choose another folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"train.output_dir={str(out)!r} cannot be written ({existing}: {err.strerror}); choose a writable folder"
        ) from None


def _get(cfg: dict, dotted: str):
    section, key = dotted.split(".")
    return (cfg.get(section) or {}).get(key)


def check_same_run(cfg: Config, run_dir: Path, what: str) -> None:
    """Refuse to continue ``run_dir`` (``what`` names it in the message) under a config that differs in a
    :data:`RUN_IDENTITY` key."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{path} is not valid YAML; {what} cannot be checked against this config") from None
    ours = cfg.to_dict()
    for key in RUN_IDENTITY:
        if _get(saved, key) != _get(ours, key):
            raise ConfigError(
                f"{what} holds a different run: its {key}={_get(saved, key)!r}, this config's {_get(ours, key)!r}; "
                "resume with the same settings, or use a new train.output_dir"
            )


def check_checkpoint(cfg: Config, folder: Path) -> None:
    """A checkpoint to resume from: complete, not corrupt, and of this config's K and P (before loading)."""
    from dist_subspace.training.checkpoint import RESUME_HINT

    verify_folder(folder, ("simplex.safetensors", "optimizer.safetensors", "trainer_state.json"), RESUME_HINT)
    with safe_open(str(folder / "simplex.safetensors"), framework="pt") as f:
        names = f.keys()
        if "prefix.vertices" not in names:
            raise ConfigError(f"checkpoint {folder} holds no prefix.vertices; {RESUME_HINT}")
        shape = f.get_slice("prefix.vertices").get_shape()  # [K, L, 2, H_kv, P, D], read from the header
    rows, p = cfg.simplex.vertices * cfg.simplex.replicas, cfg.prefix.length
    if shape[0] != rows or shape[4] != p:
        raise ConfigError(
            f"checkpoint {folder} holds {shape[0]} vertices (R x K) of P={shape[4]} tokens, this config "
            f"{rows} (R={cfg.simplex.replicas} x K={cfg.simplex.vertices}) of P={p}; resume with its "
            "simplex.vertices, simplex.replicas and prefix.length, or start a new run"
        )


def check_resume(cfg: Config) -> None:
    """``train.resume``: the checkpoint it names (or the newest, for ``auto``) belongs to this run and reads."""
    out, choice = Path(cfg.train.output_dir), cfg.train.resume
    if choice == "none":
        return
    folder = latest_checkpoint(out) if choice == "auto" else Path(choice)
    if choice == "auto":
        check_same_run(cfg, out, f"train.output_dir={str(out)!r}")
    elif folder.parent.name == "checkpoints":
        check_same_run(cfg, folder.parent.parent, f"the run of train.resume={choice!r}")
    if folder is not None:
        check_checkpoint(cfg, folder)
        check_selection_rules(cfg, folder)


def check_selection_rules(cfg: Config, folder: Path) -> None:
    """A checkpoint keeps the best dev simplex of each rule it was trained with: a resume under a rule it did not keep
    (another ``eval.select_by``, a new ``eval.also_select_by``) would judge only the steps after it, and name the old
    rule's choice after the new one. Refused, before anything loads."""
    from dist_subspace.training.checkpoint import checkpoint_legacy_rule, checkpoint_rules

    kept = checkpoint_rules(folder) or [checkpoint_legacy_rule(folder)]
    missing = [rule for rule in cfg.eval.selection_rules() if rule not in kept]
    if missing:
        raise ConfigError(
            f"checkpoint {folder} kept its best dev simplex by {', '.join(kept)}, not by {', '.join(missing)} (the "
            f"steps before it were never judged so); resume with eval.select_by={kept[0]} and eval.also_select_by "
            f"among {kept[1:]}, or start a new run"
        )


def check_model_folder(name_or_path: str, trust_remote_code: bool) -> None:
    """A local model folder: a readable config.json, a tokenizer, safetensors weights, and no code of its own
    unless ``trust_remote_code``. Embedded models and hub ids pass (transformers checks those when it loads)."""
    if name_or_path in EMBEDDED_MODELS:
        return
    try:
        path = Path(resolve_model(name_or_path))
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    if not path.is_dir():
        return  # a hub id
    where = f"model.name_or_path={name_or_path!r}"
    configs = {}
    for name in ("config.json", "tokenizer_config.json"):
        if (path / name).is_file():
            try:
                configs[name] = json.loads((path / name).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
                raise ConfigError(f"{where}: {name} cannot be read ({err}); restore it from the source") from None
    for name, content in configs.items():
        if isinstance(content, dict) and "auto_map" in content and not trust_remote_code:
            raise ConfigError(
                f"{where} ships its own Python code (auto_map in {name}), which is never run unless you set "
                "model.trust_remote_code=true; do that only for a model you trust"
            )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{where} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one there with "
            "AutoTokenizer.from_pretrained(SOURCE).save_pretrained(FOLDER)"
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern)]
        found = f" (found {', '.join(pickled)}: a pickle, which can run code when loaded)" if pickled else ""
        raise ConfigError(
            f"{where} has no .safetensors weights{found}; only safetensors are loaded: convert the weights with "
            "model.save_pretrained(FOLDER) in a session you trust"
        )
    for file in weights:
        try:
            read_tensors(file, "", header_only=True)
        except CheckpointError as err:
            raise ConfigError(f"{where}: {err}; download or convert the model again") from None


def check_optional_packages(cfg: Config) -> None:
    """Features that need a package outside the base install: each experiment tracker of ``train.report_to``
    (and ``train.tensorboard``) is one Accelerate knows, and its package is installed."""
    names = cfg.train.trackers()
    if not names:
        return
    from dist_subspace.training.engine import known_trackers, tracker_installed, tracker_package

    known = known_trackers()
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; {hint}Accelerate logs to {', '.join(known)}")
        if tracker_installed(name):
            continue
        package = tracker_package(name)
        if name == "tensorboard" and name not in cfg.train.report_to:  # train.tensorboard=true, the alias
            raise ConfigError(
                "train.tensorboard=true needs the tensorboard package: pip install 'dist_subspace[tensorboard]' "
                "(or pip install tensorboard), or set train.tensorboard=false"
            )
        extra = " (or pip install 'dist_subspace[trackers]')" if name in TRACKERS_EXTRA else ""
        raise ConfigError(
            f"train.report_to: {name} needs the {package} package: pip install {package}{extra}, "
            f"or remove {name} from train.report_to"
        )


def check_peft_adapter(folder: Path, prefix_length: int, geometry: PrefixGeometry | None = None) -> None:
    """``prefix.init=peft:PATH``: a PEFT prefix-tuning adapter in safetensors, of ``prefix.length`` tokens, holding
    the prefix ``[P, L * 2 * H_kv * D]`` its config describes and, given the backbone's geometry (read from its
    config before it loads), made for that L, H_kv and D, each compared on its own."""
    from dist_subspace.core.export import check_peft_fit, read_peft_adapter

    try:
        config, weight = read_peft_adapter(folder)
        check_peft_fit(folder, config, weight, prefix_length, geometry)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_train(cfg: Config) -> None:
    """Everything about a training run that can be refused before the engine starts and the model loads.
    Only rank 0 reads a checkpoint (on node-local disks the others may hold none): it alone checks it."""
    if is_main_rank():
        check_resume(cfg)
    check_model_folder(cfg.model.name_or_path, cfg.model.trust_remote_code)
    check_optional_packages(cfg)
    if cfg.prefix.init.startswith("peft:"):  # the adapter's files and P (its geometry: once the model is built)
        check_peft_adapter(Path(cfg.prefix.init.removeprefix("peft:")), cfg.prefix.length)
    if cfg.engine.deepspeed:
        from dist_subspace.training.settings import read_ds_config

        read_ds_config(cfg.engine.deepspeed)  # the values are checked when the engine fills them (all launchers)


def check_context(model_config, max_length: int, prefix_length: int, decoder: bool) -> None:
    """``model.max_length`` fits the model's positions: decoders place the input after the P prefix tokens;
    encoders keep positions 0..S-1 (RoBERTa and MPNet start at ``pad_token_id + 1``)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not limit:
        return
    if arch_spec(model_config).positions == "padding_offset":  # RoBERTa, MPNet: positions start at pad + 1
        limit -= model_config.pad_token_id + 1
    need = max_length + (prefix_length if decoder else 0)
    if need > limit:
        used = f"model.max_length={max_length}" + (f" + prefix.length={prefix_length}" if decoder else "")
        raise ConfigError(
            f"{used} = {need} positions, more than the model's {limit}; lower model.max_length to at most "
            f"{limit - (prefix_length if decoder else 0)} (longer inputs are truncated to it)"
        )


def check_run_folder(run_dir: Path) -> None:
    """``evaluate``: a finished run folder whose ``final/`` is complete and not corrupt (before loading)."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"{run_dir} is not a run folder (no config.yaml); pass the folder of a finished run (its train.output_dir)"
        )
    final = run_dir / "final"
    if not (final / "simplex.safetensors").is_file():
        raise ConfigError(
            f"{final / 'simplex.safetensors'} not found; pass the folder of a finished run (it has final/), "
            "or finish this one with train.resume=auto"
        )
    hint = "rewrite final/ with: python -m dist_subspace.train --config RUN/config.yaml train.resume=auto"
    try:
        verify_folder(final, ("simplex.safetensors",), hint)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
