"""Models: torchvision or timm backbones with a new two-class head, and their fine-tuning schedule.

Public API: `classifier.CrackClassifier` (the LightningModule), `network.CrackNet` (the
deployable network, plain torch), `finetuning.BackboneUnfreeze` (the fine-tuning
callback). Nothing is imported here, so that a command loads only the modules it uses.
"""
