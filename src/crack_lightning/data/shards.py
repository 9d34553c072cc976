"""Work shared out among the processes of a torch.distributed group (DDP ranks, or the
processes torchrun starts): which items each computes, and how they meet afterwards.

The items are dealt out in whole blocks of a batch, in turn (rank 0 the first block,
rank 1 the second, ...), so every batch a process computes is one a single process
would have computed too: the same images side by side, the same numbers out.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist


def group_ranks() -> tuple[int, int]:
    """(rank, number of processes) in the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(count: int, block: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s positions among 0..count-1: blocks of `block`, dealt out in turn."""
    block = max(1, block)
    return [
        i
        for start in range(rank * block, count, world * block)
        for i in range(start, min(start + block, count))
    ]


def cpu_group() -> dist.ProcessGroup | None:
    """A group that exchanges CPU tensors: the default one under gloo, a gloo group
    beside it under NCCL (GPU training). Every rank must call it."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def any_failed(failed: bool, group: dist.ProcessGroup | None) -> bool:
    """A barrier that also tells every rank whether one of them failed, so that the
    others stop too instead of waiting for it in the next collective."""
    flag = torch.tensor([int(failed)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def first_on_host(group: dist.ProcessGroup | None) -> bool:
    """Whether this is the lowest rank on its machine: the one that writes a file every
    rank of the machine holds the same copy of (the folder may or may not be shared
    between machines)."""
    _, world = group_ranks()
    hosts: list[str | None] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return hosts.index(socket.gethostname()) == dist.get_rank()
