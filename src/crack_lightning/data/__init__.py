"""Data: finding, fetching, checking, splitting and decoding crack images.

Public API: `CrackDataModule` (the LightningDataModule of train.py), `scan_samples`
(the labelled files under a data.root), `load_rgb` and `decode` (data/decode.py: the one
decoder of every image). The class names are `crack_lightning.settings.CLASS_NAMES`.
"""

from crack_lightning.data.datamodule import CrackDataModule
from crack_lightning.data.decode import decode, load_rgb
from crack_lightning.data.sources import scan_samples

__all__ = ["CrackDataModule", "decode", "load_rgb", "scan_samples"]
