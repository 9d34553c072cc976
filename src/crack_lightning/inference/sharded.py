"""predict.py over many files in several processes:

    torchrun --nproc_per_node=4 predict.py ckpt_path=... inputs=[big_dir] paths.output_dir=OUT

Each process started by torchrun (on one machine or several) classifies its share of the
files: whole batches dealt in turn (data/workers.py), so every batch holds the same
images as in one process and gives the same numbers. Rank 0 gathers the shares and writes
the one table, in input order, and the report (mode=eval); the others write nothing but
their log. Without torchrun (or with one process) this is classify_files itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch.distributed as dist

from crack_lightning.data.workers import group_ranks, share
from crack_lightning.errors import ConfigError
from crack_lightning.inference.classifiers import LoadedModel, classify_files

log = logging.getLogger(__name__)


def started_processes() -> int:
    """How many processes torchrun started for this command (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "LOCAL_RANK" in os.environ else 1


def require_one_process(mode: str) -> None:
    """Only classification is shared out; refuse the rest under torchrun before work."""
    if started_processes() > 1:
        raise ConfigError(
            f"mode={mode} runs in one process; start it without torchrun (only mode=predict "
            f"and mode=eval are shared out among processes)."
        )


@contextmanager
def process_group() -> Iterator[None]:
    """The gloo group of torchrun's processes (its variables name the meeting point),
    joined for the classification and left afterwards; nothing without torchrun."""
    if started_processes() <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def classify_in_shares(
    classifier: LoadedModel,
    paths: Sequence[Path],
    batch_size: int,
    num_workers: int,
    progress: bool = True,
) -> tuple[np.ndarray, list[tuple[Path, str]]] | None:
    """classify_files over all `paths`, shared out among torchrun's processes: rank 0
    gets every file's P(crack) (NaN where unreadable) and the skipped files, in input
    order; the other ranks get None once they have sent their share."""
    with process_group():
        rank, world = group_ranks()
        if world <= 1:
            return classify_files(classifier, paths, batch_size, num_workers, progress)
        mine = share(len(paths), batch_size, rank, world)
        log.info("Process %d of %d classifies %d of %d files", rank, world, len(mine), len(paths))
        probs, skipped = classify_files(
            classifier, [paths[i] for i in mine], batch_size, num_workers, progress and rank == 0
        )
        position = {path: i for i, path in zip(mine, (paths[i] for i in mine), strict=True)}
        part = (mine, probs, [(position[path], reason) for path, reason in skipped])
        parts: list | None = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
    if parts is None:
        return None
    every = np.full(len(paths), np.nan, dtype=np.float32)
    failed: list[tuple[int, str]] = []
    for indices, part_probs, part_failed in parts:
        every[indices] = part_probs
        failed += part_failed
    return every, [(paths[i], reason) for i, reason in sorted(failed)]
