"""Process-wide settings that make PyTorch on CPU fast."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import warnings

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4


def tune_malloc() -> bool:
    """Stop glibc from handing activation buffers back to the kernel after every step.

    By default glibc serves large blocks with mmap and unmaps them on free, so each
    forward pass page-faults its activations back in (docs/speed.md). Keeping
    freed memory in the heap avoids that. Called before DataLoader workers fork, so
    they inherit it. Returns whether the setting was applied (glibc only);
    CRACK_LIGHTNING_MALLOC=default leaves the allocator alone.
    """
    if os.environ.get("CRACK_LIGHTNING_MALLOC") == "default" or not sys.platform.startswith(
        "linux"
    ):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1  # an int: the largest we can pass
    ok &= mallopt(_M_TOP_PAD, 1 << 30) == 1
    return bool(ok)


# Warnings that are expected with a frozen backbone or this library stack and that
# would otherwise bury the messages users need to read.
_EXPECTED_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",  # the frozen backbone
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning 2.6 on torch 2.14
    r".*callbacks used to create the checkpoint need to be provided.*",  # final evaluation
    # conf/hydra/launcher/submitit_*.yaml replace the plugin's configs of the same names
    r"\s*'hydra/launcher/submitit_(local|slurm)' is validated against ConfigStore schema",
)


def _not_an_advert(record: logging.LogRecord) -> bool:
    """Lightning's tips to install its cloud-logging products are not messages of a run."""
    return not str(record.msg).startswith(_ADVERT)


# how Lightning's adverts begin ("💡 Tip: For seamless cloud logging ... litlogger")
_ADVERT = "\N{ELECTRIC LIGHT BULB} Tip:"


def quiet_logs() -> None:
    """Show each log line once and hide warnings and adverts that need no action."""
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_an_advert not in rank_zero.filters:
        rank_zero.addFilter(_not_an_advert)
    if logging.getLogger().hasHandlers():  # Hydra's handlers print and write train.log
        logging.getLogger("lightning").handlers.clear()
    for chatty in ("onnx_ir", "onnxscript"):  # ONNX export logs every graph rewrite
        logging.getLogger(chatty).setLevel(logging.WARNING)
