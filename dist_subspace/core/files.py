"""Run-folder files written atomically: a reader (a resumed run, the study, a crash) sees the old file or the
new one, never a part. Plain Python: every layer may use it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_atomic(path: Path, save: Callable[[Path], None]) -> None:
    """``save(tmp)`` writes the file at ``.tmp-NAME`` beside ``path``; it is flushed to disk, then renamed over
    ``path`` (a failed ``save`` leaves no temporary file; a leftover ``.tmp-*`` from a killed write is removed by
    ``checkpoint.recover_interrupted_saves``)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        save(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`save_atomic`)."""
    save_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, value: Any, indent: int | None = None) -> None:
    """``value`` as one JSON document (and a newline), written atomically."""
    write_atomic(path, json.dumps(value, indent=indent) + "\n")


def read_json(path: Path) -> Any | None:
    """The JSON document at ``path``, or None when it is missing, cut short or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
