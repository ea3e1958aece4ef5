"""``csseg train --workers N``: N local DDP processes (gloo on CPU, NCCL on GPU).

Each process joins one process group and runs the same steps; the engine shards the data,
averages gradients through DDP, all-reduces the confusion matrix and the prototypes, and only
rank 0 writes checkpoints, TensorBoard events and Parquet rows.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn, *args) -> None:
    """Run ``fn(*args)`` in ``world`` processes sharing one process group."""
    mp.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _run(cfg, out, steps, start_state, progress) -> None:
    from .scenario_run import run_scenario

    run_scenario(cfg, out, steps=steps, start_state=start_state, progress=progress and dist.get_rank() == 0,
                 echo=print if dist.get_rank() == 0 else (lambda s: None))


def launch(world: int, cfg, out, steps, start_state, progress: bool = True) -> None:
    """``run_scenario`` on ``world`` local DDP processes."""
    spawn(world, _run, cfg, out, steps, start_state, progress)
