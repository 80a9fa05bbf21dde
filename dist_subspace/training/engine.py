"""The one door to the distributed world: Accelerate and DeepSpeed live here and nowhere else.

The frozen backbone goes to DeepSpeed (ZeRO-3 partitions it at construction, gathers each layer for its
forward and backward) or stays a plain replicated module (one process, DDP-style, ZeRO off). The trainable
simplex never enters DeepSpeed: it is tiny, replicated on every rank in fp32, optimised by a plain torch
AdamW, and only its gradients are all-reduced (one flat tensor per optimizer step). So every launch form
runs the same optimizer code, checkpoints are world-size independent, and ranks stay bit-identical.

The experiment trackers of ``train.report_to`` are Accelerate's too: named when the Accelerator is made, started,
fed and finished through :meth:`Engine.start_trackers`, :meth:`Engine.log_metrics` and :meth:`Engine.end_trackers`
(the main process alone logs). MLflow is pointed at its store for the tracker's life only (:func:`_point_mlflow`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration
from torch import nn

from dist_subspace.core.config import Config, ConfigError
from dist_subspace.training.settings import _fill_ds_config, compute_dtype, read_ds_config

TRACKER_PACKAGES = {"comet_ml": "comet-ml"}
TENSORBOARD_FOLDER = "tensorboard"  # OUTPUT_DIR/tensorboard: where train.tensorboard=true always wrote
# What _point_mlflow may set in os.environ while the MLflow tracker runs, and puts back as it was after it.
MLFLOW_SETTINGS = ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE")


def known_trackers() -> list[str]:
    """The tracker names Accelerate can log to (``all`` aside), as ``train.report_to`` spells them."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def tracker_installed(name: str) -> bool:
    """Whether the package of tracker ``name`` is installed, as Accelerate checks it (without importing it)."""
    from accelerate.utils import imports

    check = getattr(imports, f"is_{name}_available", None)
    return bool(check()) if check is not None else True  # a tracker registered from Python brings its own


def tracker_package(name: str) -> str:
    """What to ``pip install`` for tracker ``name``."""
    return TRACKER_PACKAGES.get(name, name)


def _accelerate_sees() -> set[str]:
    """The trackers Accelerate will log to: those whose package it found, and any registered from Python."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    built_in = {t.value for t in LoggerType}
    return {str(t) for t in get_available_trackers()} | {name for name in LOGGER_TYPE_TO_CLASS if name not in built_in}


def _single_process_env() -> list[str]:
    """Set what a launcher would for rank 0 of 1 on a free port; returns the names set (end() removes them, so a
    process started later from this one, a test's subprocess say, does not believe it was launched)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ.update(env)
    return list(env)


class Engine:
    """Process group, device, DeepSpeed wrapping of the backbone, and the few collectives the loop needs."""

    def __init__(self, cfg: Config) -> None:
        self.dtype = compute_dtype(cfg.model.dtype)
        # Accelerate sets this when given a plugin, and reads it in every later Accelerator: restored by end().
        self._use_deepspeed_env = os.environ.get("ACCELERATE_USE_DEEPSPEED")
        self.trust_remote_code = cfg.model.trust_remote_code
        plugin = None
        if cfg.engine.deepspeed:
            ds = read_ds_config(cfg.engine.deepspeed)
            plugin = DeepSpeedPlugin(hf_ds_config=_fill_ds_config(ds, cfg, self.dtype))
        elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            plugin = DeepSpeedPlugin()  # from `accelerate launch --config_file` (its deepspeed_config_file)
            plugin.deepspeed_config.update(_fill_ds_config(plugin.deepspeed_config, cfg, self.dtype, strict=False))
        self._set_env: list[str] = []
        if plugin is not None and "RANK" not in os.environ:
            self._set_env = _single_process_env()  # plain `python -m` with DeepSpeed: rank 0 of 1 (not MPI discovery)
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or plugin is not None
        # Without a GPU, accelerate would make every rank "rank 0 of 1" while DeepSpeed sees them all: ask for gloo.
        # A collective that waits longer than the timeout (a hung peer) raises instead of hanging the job.
        timeout = timedelta(seconds=cfg.engine.collective_timeout_s)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        handlers = [InitProcessGroupKwargs(backend=backend, timeout=timeout)] if distributed else []
        # Experiment trackers: Accelerate's, named in train.report_to; its logging folder is the run folder.
        self.trackers = cfg.train.trackers()
        out = Path(cfg.train.output_dir)
        others = [name for name in self.trackers if name != "tensorboard"]
        unseen = [name for name in others if name not in _accelerate_sees()]
        if unseen:  # preflight checked the packages; Accelerate looked when it was imported (and would only warn)
            raise ConfigError(f"train.report_to: Accelerate finds no package for {unseen}; pip install {unseen[0]}")
        self.accelerator = Accelerator(
            kwargs_handlers=handlers,
            deepspeed_plugin=plugin,
            gradient_accumulation_steps=cfg.train.grad_accum,
            log_with=others or None,
            project_config=ProjectConfiguration(project_dir=str(out)) if self.trackers else None,
        )
        if "tensorboard" in self.trackers:  # its events in OUTPUT_DIR/tensorboard, where they always were
            from accelerate.tracking import TensorBoardTracker

            self.accelerator.log_with.append(TensorBoardTracker(TENSORBOARD_FOLDER, str(out)))
        self._undo_mlflow: Callable[[], None] | None = None  # set while MLflow is pointed at this run's store
        self.deepspeed = plugin is not None
        self.zero_stage = plugin.zero_stage if plugin is not None else 0
        # ZeRO-1/2 shard optimizer state and gradients, which a frozen backbone has none of (and DeepSpeed refuses
        # them without an optimizer): under those stages the backbone is replicated, like plain data parallel.
        self.partitioned = self.zero_stage == 3
        # HfDeepSpeedConfig is alive now (made by the plugin): from_pretrained partitions under ZeRO-3.

    # ---- facts -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def describe(self) -> str:
        if self.partitioned:
            mode = "DeepSpeed ZeRO-3: frozen backbone partitioned over ranks"
        elif self.deepspeed:
            mode = f"DeepSpeed ZeRO-{self.zero_stage}: frozen backbone replicated (nothing of it to shard)"
        else:
            mode = "frozen backbone replicated (no DeepSpeed)"
        return f"{self.world_size} process(es) on {self.device.type}, {mode}, compute dtype {self.dtype}"

    # ---- experiment trackers ---------------------------------------------------------------------
    def start_trackers(
        self, project: str, config: dict, init_kwargs: dict[str, dict] | None = None, mlflow_uri: str | None = None
    ) -> None:
        """Start this run's trackers (``train.report_to``) on the main process, ``config`` (flat scalars) logged as
        its hyperparameters; ``init_kwargs``: per tracker name, keyword arguments for that tracker; ``mlflow_uri``:
        the tracking URI MLflow logs to until :meth:`end_trackers` (None: its own, ``MLFLOW_TRACKING_URI``). A
        tracker that cannot start (not logged in, an unreachable or unsupported store, ...) is a one-line
        ConfigError on every rank, before anything heavy loads."""
        if not self.trackers:
            return
        problem = None
        if self.is_main:
            if "mlflow" in self.trackers:
                self._undo_mlflow = _point_mlflow(mlflow_uri)
            try:
                self.accelerator.init_trackers(project, config=config, init_kwargs=init_kwargs or {})
            except Exception as err:  # any tracker's own failure (no login, a store it cannot use): one line
                name = next((t.name for t in self.accelerator.trackers if not _tracker_started(t)), "a tracker")
                detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
                hint = "check its setup"
                if name == "mlflow" and mlflow_uri is None:  # the user's own store
                    hint = "check MLFLOW_TRACKING_URI (unset, MLflow logs to a file store in the run folder, mlruns/)"
                problem = f"train.report_to: {name} could not start ({type(err).__name__}: {detail}); {hint}"
                self.end_trackers()
        if self.any_rank(problem is not None):
            raise ConfigError(problem or "train.report_to: a tracker could not start on the main process")

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        """Log ``values`` (name -> number) at ``step`` to every tracker; only the main process logs."""
        if self.trackers and self.is_main:
            self.accelerator.log(values, step=step)

    def end_trackers(self) -> None:
        """Finish every started tracker (flush and close its run) and put MLflow's settings back as they were; later
        calls do nothing."""
        trackers, self.accelerator.trackers = self.accelerator.trackers, []
        undo, self._undo_mlflow = self._undo_mlflow, None
        try:
            for tracker in trackers:
                if _tracker_started(tracker):
                    tracker.finish()
        finally:
            if undo is not None:
                undo()

    # ---- the backbone ----------------------------------------------------------------------------
    def load_backbone(self, path: str, decoder: bool) -> nn.Module:
        """from_pretrained in the compute dtype; under ZeRO-3 each rank only ever holds its shard. Weights only
        from safetensors (a pickled .bin can run code), the model's own code only with ``trust_remote_code``."""
        from transformers import AutoModel, AutoModelForCausalLM

        cls = AutoModelForCausalLM if decoder else AutoModel
        safe = {"dtype": self.dtype, "use_safetensors": True, "trust_remote_code": self.trust_remote_code}
        kwargs = {} if decoder else {"add_pooling_layer": False}
        try:
            model = cls.from_pretrained(path, **safe, **kwargs)
        except TypeError:  # families without a pooler
            model = cls.from_pretrained(path, **safe)
        model.eval()
        if not self.partitioned:
            model.to(self.device)
        elif not all(hasattr(p, "ds_id") for p in model.parameters()):  # never let a 70B model land whole on a rank
            raise RuntimeError("ZeRO-3 is on but from_pretrained built the backbone whole on this rank")
        return model

    def wrap_backbone(self, backbone: nn.Module) -> nn.Module:
        """Hand the frozen backbone to DeepSpeed (no optimizer: nothing in it trains); returns the module to call.

        ZeRO-3's gather/release hooks live on the module's own submodules, so we call the module, not the
        engine: the engine's forward adds training bookkeeping for an optimizer it does not have (and then
        refuses ``loss.backward()``). The engine is kept alive here, with its hooks.
        """
        if not self.partitioned:
            return backbone
        self.ds_engine = self.accelerator.prepare(backbone)
        return self.ds_engine.module

    # ---- collectives -----------------------------------------------------------------------------
    def all_reduce_mean_grads(self, params: Sequence[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Average the simplex gradients over ranks in one flat all-reduce, ``loss`` (0-d, or one per replica
        ``[R]``) riding along; returns the mean loss over ranks, shaped like ``loss``."""
        if self.world_size == 1:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(-1).to(grads[0].dtype)])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n
        return flat[offset:].view_as(loss).to(loss.dtype)

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (a picklable Python value, e.g. a checkpoint read from its disk) on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (one all-reduce of one number)."""
        if self.world_size == 1:
            return flag
        count = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(count)
        return bool(count.item() > 0)

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Make every rank hold rank 0's ``tensor`` (in place)."""
        if self.world_size > 1:
            dist.broadcast(tensor, src=0)
        return tensor

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (a picklable Python value), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def main_process_first(self):
        return self.accelerator.main_process_first()

    def end(self) -> None:
        """Close the process group and forget this run's Accelerate/DeepSpeed state, so a later run in the
        same process (a notebook, a test) starts clean instead of inheriting this one's plugin or ZeRO-3."""
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        self.end_trackers()
        self.accelerator.end_training()
        if dist.is_initialized():
            dist.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)
        unset_hf_deepspeed_config()
        if self._use_deepspeed_env is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = self._use_deepspeed_env
        for name in self._set_env:
            os.environ.pop(name, None)


def _point_mlflow(uri: str | None) -> Callable[[], None]:
    """Point this process's MLflow at tracking URI ``uri`` (None: leave it at the user's ``MLFLOW_TRACKING_URI``)
    and, where that is a file store and ``MLFLOW_ALLOW_FILE_STORE`` is not set, let MLflow 3 use it (it refuses a
    file store without that opt-in, and mlflow-skinny has no SQLite store); returns what puts both back as they were,
    so that no later process started from this one inherits them."""
    import mlflow

    saved = {name: os.environ.get(name) for name in MLFLOW_SETTINGS}
    if uri is not None:
        mlflow.set_tracking_uri(uri)  # MLflow 3 also exports it as MLFLOW_TRACKING_URI: undone below
    if saved["MLFLOW_ALLOW_FILE_STORE"] is None and urlparse(mlflow.get_tracking_uri()).scheme in ("", "file"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"

    def undo() -> None:
        if uri is not None:
            mlflow.set_tracking_uri(None)  # back to no URI of its own (and no MLFLOW_TRACKING_URI)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    return undo


def _tracker_started(tracker) -> bool:
    """Whether an Accelerate tracker's ``start()`` ran (``tracker`` is then its run or writer, not None)."""
    try:
        return tracker.tracker is not None
    except AttributeError:
        return False


def comms_records() -> dict[str, dict[str, int]]:
    """What DeepSpeed's comms logger (``comms_logger`` in the DeepSpeed config) recorded in this process:
    ``{op: {"calls", "bytes"}}``, message bytes as the logger counts them (for an all-gather, this rank's shard)."""
    from deepspeed.comm.comm import comms_logger

    rows = {}
    for op, sizes in comms_logger.get_raw_data().items():  # {op: {message bytes: [calls, latencies, ...]}}
        rows[op] = {"calls": sum(v[0] for v in sizes.values()), "bytes": sum(s * v[0] for s, v in sizes.items())}
    return rows


def parameter_counts(module: nn.Module) -> tuple[int, int, int]:
    """(trainable, frozen, bytes of frozen parameters held by this rank); ZeRO-3 shards count ``ds_numel``."""
    trainable = frozen = local_bytes = 0
    for p in module.parameters():
        numel = getattr(p, "ds_numel", p.numel())
        if p.requires_grad:
            trainable += numel
        else:
            frozen += numel
            local = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
            local_bytes += local * p.element_size()
    return trainable, frozen, local_bytes
