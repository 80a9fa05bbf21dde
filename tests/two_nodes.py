"""Two "nodes" of one process each on this machine, through the multi-node launch paths a cluster uses: one
launcher per node, started together, meeting at a rendezvous on 127.0.0.1 (what another node's address would be).

- Accelerate: ``launch/accelerate/multinode_zero3.yaml`` with ``--num_machines 2 --machine_rank R
  --main_process_ip``, as ``launch/slurm.sh``-style scripts run it on every node.
- DeepSpeed: a hostfile of two one-slot nodes, each node started by hand with ``--no_ssh --node_rank R`` (what the
  launcher's pdsh/ssh fan-out would run on each node; this machine has no ssh server to fan out to).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from dist_subspace.core.paths import CHECKOUT as ROOT

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_nodes(commands: list[list[str]], env: dict[str, str], timeout: int) -> None:
    """Start one launcher per node at once; fail with both nodes' output tails if either fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    nodes = [
        subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    try:
        outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    failed = [
        f"node {i} exited {n.returncode}:\n{o[-4000:]}"
        for i, (n, o) in enumerate(zip(nodes, outputs, strict=True))
        if n.returncode
    ]
    assert not failed, "\n".join(failed)


def accelerate_two_nodes(module: str, args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> None:
    """``accelerate launch`` with the multi-node YAML, once per node (machine_rank 0 and 1), 1 process each."""
    port = str(free_port())
    config = str(ROOT / "launch/accelerate/multinode_zero3.yaml")
    commands = [
        [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            config,
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "-m",
            module,
            *args,
        ]
        for rank in (0, 1)
    ]
    _run_nodes(commands, env or {}, timeout)


def deepspeed_two_nodes(
    module: str, args: list[str], hostfile: Path, env: dict[str, str] | None = None, timeout: int = 600
) -> None:
    """``deepspeed --hostfile`` over two one-slot nodes, each node's launcher started here (``--no_ssh``)."""
    hostfile.write_text("node-001 slots=1\nnode-002 slots=1\n")  # launch/hostfile.example, one process a node
    port = str(free_port())
    commands = [
        [
            str(BIN / "deepspeed"),
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            "--module",
            module,
            *args,
        ]
        for rank in (0, 1)
    ]
    _run_nodes(commands, env or {}, timeout)
