"""What the two command-line entry points (train, evaluate) share: one-line errors and a clean exit."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from dist_subspace.config import ConfigError

# Mistakes a user can make (a bad key, a missing file or model, a task that does not fit): a message, no traceback.
USER_ERRORS = (ConfigError, ValueError, OSError)


def user_error(err: BaseException) -> int:
    """Print ``error: <first line of the message>`` to stderr; returns the exit status 2."""
    print(f"error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
    return 2


def exit_now(code: int) -> NoReturn:
    """Flush and leave at once: gloo threads alive at interpreter exit occasionally abort a finished rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
