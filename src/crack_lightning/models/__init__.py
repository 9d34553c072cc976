"""Models: torchvision or timm backbones with a new two-class head, and their fine-tuning schedule.

Public API: `CrackClassifier` (the LightningModule), `CrackNet` (the deployable network),
`BackboneUnfreeze` (the fine-tuning callback).
"""

from crack_lightning.models.classifier import CrackClassifier, CrackNet
from crack_lightning.models.finetuning import BackboneUnfreeze

__all__ = ["BackboneUnfreeze", "CrackClassifier", "CrackNet"]
