"""Where the work on each batch of decoded images runs: in the DataLoader's worker
processes, or in the main process; and which batches each process of a torch.distributed
group computes.

On a CPU, the fastest way through a frozen backbone is not one process whose torch
threads share every core while decoding workers compete with them for the same cores:
the threads wait for each other at every operation, and spin while a decoder holds a
core (docs/speed.md: 8.2 ms of CPU per MobileNetV2 image with 2 threads, 6.0 ms with 1).
So on a CPU each worker decodes a whole batch and runs the model on it itself, with its
share of the cores (`torch.get_num_threads() // num_workers` threads, at least one), and
hands back only the small result (pooled features, probabilities). The main process
only collects. On a GPU, or with `num_workers=0`, the workers (if any) decode and the
main process runs the model, as before.

Results are the same either way: the same batches through the same operations (oneDNN's
convolutions gave the same values with 1 and 2 threads: tests/test_feature_cache.py and
tests/test_predict.py compare the two paths).

Among the processes of a torch.distributed group (DDP ranks, or the processes torchrun
starts) the items are dealt out in whole blocks of a batch, in turn (rank 0 the first
block, rank 1 the second, ...), so every batch a process computes is one a single process
would have computed too: the same images side by side, the same numbers out.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, default_collate


class ComputedBatches(Dataset):
    """Item b: the items of batch b of `dataset` collated and passed through `compute`,
    with the seconds `compute` took (in the worker process that loads it)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        collate: Callable[[list], Any],
        compute: Callable[[Any], Any],
    ) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.collate, self.compute = collate, compute

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __getitem__(self, batch: int) -> tuple[Any, float]:
        start = batch * self.batch_size
        stop = min(start + self.batch_size, len(self.dataset))
        items = self.collate([self.dataset[i] for i in range(start, stop)])
        began = time.perf_counter()
        with torch.inference_mode():
            result = self.compute(items)
        return result, time.perf_counter() - began


def compute_in_workers(device: torch.device | str, num_workers: int) -> bool:
    """Whether run_batches runs the model in the workers: on a CPU, with workers."""
    return torch.device(device).type == "cpu" and num_workers > 0


def run_batches(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    compute: Callable[[Any], Any],
    in_workers: bool,
    collate: Callable[[list], Any] = default_collate,
) -> Iterator[tuple[Any, float]]:
    """(compute(collated batch), seconds compute took) for the consecutive batches of
    `dataset`, in order. With `in_workers` (compute_in_workers), each worker process
    decodes and computes whole batches with its share of the cores; else the workers
    (if any) decode and compute runs here. `compute` runs in inference mode and must
    leave its result on the CPU when it runs in workers (they hand results back through
    shared memory); anything it needs must exist before this is called (the workers are
    forked), e.g. a folded backbone built by one call on a small batch."""
    if not in_workers:
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate
        )
        for items in _shut_down_on_error(loader):
            began = time.perf_counter()
            with torch.inference_mode():
                result = compute(items)
            yield result, time.perf_counter() - began
        return
    threads = max(1, torch.get_num_threads() // num_workers)
    loader = DataLoader(
        ComputedBatches(dataset, batch_size, collate, compute),
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_unchanged,  # not default_convert: numpy results stay numpy
        worker_init_fn=partial(_set_threads, threads),
    )
    yield from _shut_down_on_error(loader)


def _shut_down_on_error(loader: DataLoader) -> Iterator[Any]:
    """The loader's items; on an error from a worker (a damaged image; the worker's
    traceback is in the message) its workers are shut down at once, not when the
    loader's frames, which the traceback keeps, are collected in a process forked later
    (a warning from each)."""
    batches = iter(loader)
    try:
        yield from batches
    except Exception as err:
        err = err.with_traceback(None)
        del batches
        raise err from None


def _set_threads(threads: int, worker_id: int) -> None:
    torch.set_num_threads(threads)


def _unchanged(item: Any) -> Any:
    return item


def forward_rate(images: int, seconds: Sequence[float], in_workers: bool, workers: int) -> float:
    """Images per second the model alone reached: its seconds per batch summed, shared
    by the workers that ran side by side."""
    busy = sum(seconds) / (workers if in_workers else 1)
    return images / busy if busy > 0 else float("nan")


# --- work shared among the processes of a distributed group ------------------------


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
