"""Training: the body of train.py, its callbacks, resuming, DDP and sweep summaries.

Public API: `train` (fit from a composed config, return the best checkpoint's metrics).
"""

from crack_lightning.training.run import train

__all__ = ["train"]
