"""PyTorch's gloo process group, started from an MPI job: the baseline the benchmarks compare against."""

from __future__ import annotations

import socket
from typing import Any


def init_gloo(world: Any, threads: int) -> bool:
    """Start torch.distributed's gloo process group from an MPI communicator's rank and size (the baseline
    of the benchmarks); False when torch is not importable.

    Rank 0 picks a free TCP port on its host (loopback when every rank is on
    one host) and tells the others over MPI; torch gets ``threads`` threads.
    """
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return False
    from mpi4py import MPI

    torch.set_num_threads(threads)
    hosts = world.allgather(MPI.Get_processor_name())
    address = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(hosts[0])
    port = None
    if world.Get_rank() == 0:
        with socket.socket() as probe:
            probe.bind((address, 0))
            port = probe.getsockname()[1]
    port = world.bcast(port, root=0)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{address}:{port}", rank=world.Get_rank(), world_size=world.Get_size()
    )
    return True
