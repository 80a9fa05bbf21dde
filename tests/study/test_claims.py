"""A unit's claim outlives the study that took it while the unit's training still runs."""

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from dist_subspace.study.spec import StudySpec, Unit
from dist_subspace.study.state import CLAIM_LOCK

# stands in for `python -m dist_subspace.train ...` (its arguments land in sys.argv): says it runs, then waits
TRAINING = "import os, sys, time; open(os.environ['PIDFILE'], 'w').write(str(os.getpid())); time.sleep(120)"


def _claimed(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s claim (its lock file's exclusive flock)."""
    fd = os.open(folder / CLAIM_LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _wait_for(path: Path, seconds: float = 60) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def test_a_study_killed_alone_leaves_its_running_training_holding_the_unit(tmp_path):
    """Killing the study process (SIGKILL, as a scheduler or `kill -9` does) does not kill the training process it
    started; a rerun must not train the same folder beside it. The claim ends only when the training ends too."""
    spec = StudySpec(
        tasks=["rotten_tomatoes"], models=["minilm-l6"], methods=["k1"], seeds=1, lrs=[0.01],
        output_dir=str(tmp_path / "study"), train_command=["{python}", "-c", TRAINING],
    )  # fmt: skip
    unit = Unit("rotten_tomatoes", "minilm-l6", "k1", 0.01)
    pidfile = tmp_path / "training.pid"
    study = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            from pathlib import Path
            from dist_subspace.study.fanout import train_unit
            from dist_subspace.study.spec import StudySpec, Unit
            spec = StudySpec(**{spec.__dict__!r})
            train_unit(spec, Unit(*{tuple(unit.__dict__.values())!r}), Path({str(tmp_path / "study")!r}))
        """)],
        env={**os.environ, "PIDFILE": str(pidfile)},
    )  # fmt: skip
    training = int(_wait_for(pidfile))
    try:
        study.kill()
        study.wait(timeout=30)
        os.kill(training, 0)  # the training process lives on
        assert _claimed(unit.folder(tmp_path / "study")), "the claim ended with the study while its training runs"
    finally:
        os.kill(training, signal.SIGKILL)
    end = time.monotonic() + 30
    while _claimed(unit.folder(tmp_path / "study")):  # free once the training too has died
        assert time.monotonic() < end, "the claim outlived every process that held it"
        time.sleep(0.1)
