"""Checkpoints are written beside their final name and renamed into place, so a kill
mid-save never corrupts last.ckpt, even with $TMPDIR on another filesystem."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from crack_lightning.errors import WriteError
from crack_lightning.io import write_atomically, write_text
from crack_lightning.training.callbacks import AtomicCheckpointIO
from crack_lightning.training.run import train


def test_training_writes_checkpoints_in_place_whatever_tmpdir_is(
    synthetic_cfg, tmp_path, monkeypatch
):
    elsewhere = tmp_path / "tmpfs"  # stands for $TMPDIR on another filesystem
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR
    moves, renames = [], []
    monkeypatch.setattr(shutil, "move", lambda src, dst, *a, **k: moves.append((src, dst)))
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        renames.append((Path(src), Path(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    train(synthetic_cfg("trainer.max_epochs=2", "logger=none"))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert moves == []  # Lightning's save moved a temp file from $TMPDIR into place
    assert list(elsewhere.iterdir()) == []
    saved = [(src, dst) for src, dst in renames if dst.suffix == ".ckpt"]
    assert {dst.name for _, dst in saved} == {"best.ckpt", "last.ckpt"}
    assert all(src.parent == dst.parent == checkpoints for src, dst in saved)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 1


def test_a_failure_mid_write_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1, "weights": torch.ones(1000)}, target)

    class Killed(BaseException):
        pass

    def half_then_die(handle):
        handle.write(b"PK\x03\x04 half of a checkpoint")
        raise Killed

    with pytest.raises(Killed):
        write_atomically(target, half_then_die)
    assert torch.load(target, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temp file is gone


def test_temp_files_left_by_a_killed_run_are_cleaned_up(tmp_path):
    target = tmp_path / "last.ckpt"
    leftover = tmp_path / ".last.ckpt.12345.partial"  # SIGKILL between write and rename
    leftover.write_bytes(b"half")
    AtomicCheckpointIO().save_checkpoint({"epoch": 2}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(target, weights_only=True)["epoch"] == 2


def test_a_write_the_disk_refuses_is_a_write_error_naming_the_file(tmp_path):
    """A full disk (as torch.save reports it: a RuntimeError raised while handling the
    OSError) becomes one line naming the file; the previous file stays whole."""
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")

    def disk_full(handle) -> None:
        handle.write(b"half")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("unexpected pos 1854848 vs 1854736") from None

    with pytest.raises(WriteError) as refused:
        write_atomically(target, disk_full)
    assert str(refused.value).startswith(f"cannot write {target}: No space left on device")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(WriteError, match=f"{blocker} is a file, not a folder"):
        write_text(blocker / "sub" / "x.txt", "text")


def test_other_failures_while_writing_keep_their_type(tmp_path):
    """Only causes in the disk or the place become user errors: a bug keeps its traceback."""

    def bug(handle) -> None:
        raise ValueError("a bug")

    def bad_descriptor(handle) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(ValueError, match="a bug"):
        write_atomically(tmp_path / "x", bug)
    with pytest.raises(OSError, match="Bad file descriptor") as raised:
        write_atomically(tmp_path / "x", bad_descriptor)
    assert not isinstance(raised.value, WriteError)
    assert not list(tmp_path.iterdir())
