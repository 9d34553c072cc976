"""Data: finding, fetching, checking, splitting and decoding crack images.

Public API: `CrackDataModule` (the LightningDataModule of train.py), `scan_samples`
(the labelled files under a root), `load_rgb` (the one decoder of every image).
"""

from crack_lightning.data.datamodule import CrackDataModule
from crack_lightning.data.images import load_rgb
from crack_lightning.data.layout import CLASS_NAMES, scan_samples

__all__ = ["CLASS_NAMES", "CrackDataModule", "load_rgb", "scan_samples"]
