"""Run by tests/test_reliability.py under torchrun with 2 CPU processes (gloo), through the real Engine:

1. the non-finite flag is all-reduced: rank 1 alone sees a NaN loss, and both ranks skip the step;
2. in stop mode both ranks raise RunStopped together (no rank is left waiting in a collective);
3. a hung peer: rank 1 stops answering, and rank 0's next collective fails after engine.collective_timeout_s
   instead of waiting forever; it prints how long that took and the one error line.

    torchrun --nproc_per_node 2 -m tests.collective_worker TIMEOUT_S
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from dist_subspace.core.cli import run_stopped
from dist_subspace.core.config import load_config
from dist_subspace.training.engine import Engine
from dist_subspace.training.guards import NonFiniteGuard, RunStopped


def main() -> None:
    timeout = int(sys.argv[1])
    engine = Engine(load_config(None, [f"engine.collective_timeout_s={timeout}"]))
    rank, nowhere = engine.rank, Path("/nonexistent-run")
    loss = torch.tensor([float("nan") if rank == 1 else 0.5])
    take = NonFiniteGuard(skip=True, max_in_row=5).step_is_finite(engine, loss, torch.ones(1), 7, nowhere)
    print(f"rank {rank} takes the step: {take}", flush=True)
    try:
        NonFiniteGuard(skip=False, max_in_row=5).step_is_finite(engine, loss, torch.ones(1), 7, nowhere)
        print(f"rank {rank} did not stop", flush=True)
    except RunStopped as err:
        print(f"rank {rank} stopped: {err}", flush=True)
    engine.barrier()
    if rank == 1:
        time.sleep(300)  # hung: never joins the next collective (torchrun ends it when rank 0 exits)
    start = time.perf_counter()
    try:
        engine.any_rank(False)
        code = 0
    except Exception as err:
        print(f"rank 0 collective failed after {time.perf_counter() - start:.1f} s: {type(err).__name__}", flush=True)
        code = run_stopped(err, True, rank)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 3)


if __name__ == "__main__":
    main()
