"""`bigmodel train --nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P]`: start the job
through torchrun's elastic launcher (`python -m torch.distributed.run ... -m bigmodel train ...`), which is what a
user running `torchrun -m bigmodel train` gets too.

Each worker gets an equal share of this machine's cores (OMP_NUM_THREADS, unless set). The rendezvous store is not
shared with the agent (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): with it shared, restarted workers on CPU/gloo fail with
"Connection refused" (pytorch#167288).
"""

from __future__ import annotations

import os
import subprocess
import sys

from bigmodel.errors import UserError


def launch(
    args: list[str],
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int = 29500,
    max_restarts: int = 0,
) -> int:
    """Run `bigmodel train ARGS` as a torchrun job; returns its exit status."""
    if nproc_per_node < 1 or nnodes < 1:
        raise UserError(f"--nproc-per-node {nproc_per_node} / --nnodes {nnodes}: expected at least 1")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank {node_rank}: expected 0..{nnodes - 1} for --nnodes {nnodes}")
    if nnodes > 1 and not master_addr:
        raise UserError("--nnodes > 1 needs --master-addr (the address of the --node-rank 0 machine)")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    cmd += [f"--nnodes={nnodes}", f"--max-restarts={max_restarts}"]
    if nnodes == 1 and not master_addr:
        cmd += ["--standalone"]
    else:
        cmd += [f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}"]
    cmd += ["-m", "bigmodel", "train", *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:
        return 130
