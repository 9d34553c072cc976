"""Checkpoints that a kill never corrupts, wherever $TMPDIR is.

Lightning's own save goes through an fsspec transaction that writes to a temp file in
$TMPDIR and moves it into place; with $TMPDIR on another filesystem (tmpfs, as on many
clusters) that move is a copy, and a SIGKILL during it leaves a truncated last.ckpt.
Here the file is written beside its final name, synced to disk and renamed over the old
one: the previous checkpoint stays whole until the new one is complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

TEMP_SUFFIX = ".partial"


def temp_path(path: Path) -> Path:
    """Where path is written before it is renamed into place: same folder, hidden."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write path via a synced temp file in its folder and an atomic rename; leftover
    temp files of the same target (from killed runs) are removed afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = temp_path(path)
    try:
        with open(partial, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    for leftover in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic in place (write_atomically); remote
    paths (s3://, ...) keep Lightning's own save."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options "
                f"(got {storage_options!r})."
            )
        write_atomically(Path(path), lambda handle: torch.save(checkpoint, handle))
