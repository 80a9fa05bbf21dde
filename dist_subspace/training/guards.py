"""What stops a run cleanly: a non-finite step or a failed write. Every rank decides together (one all-reduced
flag), so no rank is left waiting in a collective, and the user reads one line that names the step and what
was kept. The last good checkpoint is never touched: a bad step is stopped before the optimizer runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from dist_subspace.training.checkpoint import discard_partial, latest_checkpoint

# What a failed write raises: OSError from Python's own writes, SafetensorError from safetensors' (its I/O errors,
# a full disk included, are not OSErrors).
WRITE_ERRORS = (OSError, SafetensorError)


class RunStopped(RuntimeError):
    """The run stopped on a fault (not a bad input); the message is one line: what, where, what is kept."""


def last_good(output_dir: Path, state: str) -> str:
    """The newest complete checkpoint and its ``state`` (``intact``, ``kept``), for a stop message."""
    folder = latest_checkpoint(output_dir)
    return f"the last good checkpoint {folder} is {state}" if folder is not None else "no checkpoint was saved yet"


def _numbers(values: torch.Tensor) -> str:
    return ", ".join(f"{v:g}" for v in values.detach().float().reshape(-1).tolist())


class NonFiniteGuard:
    """Checked before every optimizer step: the step's loss and gradient norm are finite on every rank.

    ``skip=False`` stops the run at the first non-finite step; ``skip=True`` skips it (no optimizer update;
    the step counter and learning-rate schedule move on, so the next step sees new examples) and stops after
    ``max_in_row`` non-finite steps in a row. Seed replicas share the optimizer step: a non-finite value in
    any replica skips the step for all of them.
    """

    def __init__(self, skip: bool, max_in_row: int) -> None:
        self.skip, self.max_in_row = skip, max_in_row
        self.in_row = 0  # non-finite steps in a row, up to now
        self.unlogged = 0  # skipped steps not yet written to metrics.jsonl

    def step_is_finite(self, engine, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, output_dir: Path) -> bool:
        """True: take the optimizer step. False: skip it. Raises :class:`RunStopped` to stop.

        ``step`` is the number of the step being taken (1-based, as metrics.jsonl counts); ``loss`` and
        ``grad_norm`` are 0-d or one per replica ``[R]``, after the gradients' all-reduce. One host sync and one
        all-reduce of one number per step.
        """
        local_bad = not bool(torch.isfinite(loss).all() & torch.isfinite(grad_norm).all())
        if not engine.any_rank(local_bad):
            self.in_row = 0
            return True
        self.in_row += 1
        what = f"non-finite loss or gradient (loss {_numbers(loss)}; gradient norm {_numbers(grad_norm)})"
        if not self.skip:
            raise RunStopped(
                f"{what} at step {step}; stopped before the optimizer step, {last_good(output_dir, 'intact')}; "
                "lower train.lr or set train.skip_nonfinite=true, then resume with train.resume=auto"
            )
        if self.in_row >= self.max_in_row:
            raise RunStopped(
                f"{self.in_row} non-finite steps in a row (steps {step - self.in_row + 1}..{step}, "
                f"train.max_nonfinite_in_row={self.max_in_row}); {last_good(output_dir, 'intact')}; lower train.lr"
            )
        self.unlogged += 1
        return False

    def log_fields(self) -> dict[str, int]:
        """``{"skipped": N}``: steps skipped since the last call (only with ``skip``), for a train row."""
        if not self.skip:
            return {}
        fields, self.unlogged = {"skipped": self.unlogged}, 0
        return fields


@contextmanager
def stop_if_write_fails(engine, targets: Sequence[Path], output_dir: Path) -> Iterator[None]:
    """Around a write done on the main process (a checkpoint, ``final/``): a write error there (a full disk, a
    folder gone read-only) removes the partial folders and stops every rank with one line; the previous
    checkpoint is kept. Replaces the barrier that followed such a write (the flag's all-reduce syncs)."""
    error: Exception | None = None
    try:
        yield
    except WRITE_ERRORS as err:
        error = err
        for target in targets:
            discard_partial(target)
    if engine.any_rank(error is not None):
        if isinstance(error, OSError) and error.strerror:
            reason = error.strerror
        else:
            reason = str(error).strip().splitlines()[0] if error is not None else "it failed on the main process"
        where = targets[0] if len(targets) == 1 else f"{targets[0]} (and {len(targets) - 1} more)"
        raise RunStopped(
            f"writing {where} failed: {reason}; {last_good(output_dir, 'kept')}; free space or fix the folder, "
            "then resume with train.resume=auto"
        )
