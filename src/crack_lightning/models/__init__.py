"""Models: torchvision or timm backbones with a new two-class head, and their fine-tuning schedule.

Public API: `CrackNet` (the deployable network, plain torch), `CrackClassifier` (the
LightningModule that trains it), `BackboneUnfreeze` (the fine-tuning callback). Each is
imported when first asked for, so that prediction builds a CrackNet without Lightning.
"""

from importlib import import_module
from typing import Any

_HOMES = {
    "BackboneUnfreeze": "crack_lightning.models.finetuning",
    "CrackClassifier": "crack_lightning.models.classifier",
    "CrackNet": "crack_lightning.models.network",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
