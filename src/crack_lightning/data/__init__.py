"""Data: finding, fetching, checking, splitting and decoding crack images.

Public API: `CrackDataModule` (the LightningDataModule of train.py), `scan_samples`
(the labelled files under a data.root), `load_rgb` and `decode` (data/decode.py: the one
decoder of every image). The class names are `crack_lightning.settings.CLASS_NAMES`.
Each is imported when first asked for, so that prediction, which decodes images, does
not import Lightning with the data module.
"""

from importlib import import_module
from typing import Any

_HOMES = {
    "CrackDataModule": "crack_lightning.data.datamodule",
    "decode": "crack_lightning.data.decode",
    "load_rgb": "crack_lightning.data.decode",
    "scan_samples": "crack_lightning.data.sources",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
