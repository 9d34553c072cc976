"""Data: finding, fetching, checking, splitting and decoding crack images.

Public API: `CrackDataModule` (the LightningDataModule of train.py), `scan_samples`
(the labelled files under a root), `load_rgb` and `decode` (data/decode.py: the one
decoder of every image).
"""

from crack_lightning.data.datamodule import CrackDataModule
from crack_lightning.data.decode import decode, load_rgb
from crack_lightning.data.layout import CLASS_NAMES, scan_samples

__all__ = ["CLASS_NAMES", "CrackDataModule", "decode", "load_rgb", "scan_samples"]
