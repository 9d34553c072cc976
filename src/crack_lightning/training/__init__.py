"""Training: the body of train.py, its callbacks, resuming, DDP and sweep summaries.

Public API: `train` (fit from a composed config, return the best checkpoint's metrics),
imported when first asked for, so that prediction, which uses training/distributed.py's
launcher, does not import Lightning.
"""

from typing import Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
    if name != "train":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from crack_lightning.training.run import train

    return train
