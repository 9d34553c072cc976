"""trainer.precision=auto-mixed: the best mixed precision of the GPU found at start-up."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
AUTO_MIXED = "auto-mixed"


def resolve_precision(precision: str | int) -> str | int:
    """bf16-mixed on GPUs that support bfloat16 (Ampere and later: no loss scaling, fp32's
    range), 16-mixed on older GPUs, 32-true without a GPU; other values pass unchanged."""
    if precision != AUTO_MIXED:
        return precision
    if not torch.cuda.is_available():
        log.info("trainer.precision=%s: no GPU, so 32-true", AUTO_MIXED)
        return "32-true"
    chosen = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    log.info("trainer.precision=%s: %s on %s", AUTO_MIXED, chosen, torch.cuda.get_device_name())
    return chosen
