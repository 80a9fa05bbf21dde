"""What the command-line entry points share: one-line errors, an argument parser that says them, a clean exit."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from dist_subspace.core.config import ConfigError

# Mistakes a user can make (a bad key, a missing file or model, a task that does not fit): a message, no traceback.
USER_ERRORS = (ConfigError, ValueError, OSError)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line, ``error: ...``, and exit status 2 (not a usage block)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def user_error(err: BaseException) -> int:
    """Print ``error: <first line of the message>`` to stderr; returns the exit status 2."""
    print(f"error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
    return 2


def collective_failure(err: BaseException) -> bool:
    """An error raised by a collective whose peer died or hung: torch's DistError (NCCL), or gloo's plain
    RuntimeError, which names its transport ("Timed out waiting ...", "Connection closed by peer")."""
    import torch.distributed as dist

    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo" in str(err))


def run_stopped(err: BaseException, is_main: bool, rank: int) -> int:
    """A run that stopped on a fault (a non-finite step, a failed write, a failed collective): one line
    (``error: ...``, from the main process, or from any rank whose collective failed); exit status 1."""
    if collective_failure(err):
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(
            f"error: rank {rank}: a collective failed (a peer process died, or hung past engine.collective_timeout_s): "
            f"{line}; resume with train.resume=auto",
            file=sys.stderr,
        )
    elif is_main:
        print(f"error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
    return 1


def exit_now(code: int) -> NoReturn:
    """Flush and leave at once: gloo threads alive at interpreter exit occasionally abort a finished rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
