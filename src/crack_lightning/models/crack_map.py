"""The crack-map network, in plain torch: uint8 RGB photos of any size in, one logit of
P(crack) per pixel out. The encoder is the classifier's ImageNet MobileNetV2 (its weights
from model.weights_path or torchvision's download, as models/backbones.py reads them); the
decoder is segmentation_models_pytorch's U-Net decoder, with skip connections from four
encoder stages. Training wraps it in models/segmenter.py; scanning builds it from a
checkpoint without Lightning (inference/crack_maps.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from crack_lightning.data.transforms import to_unit_float
from crack_lightning.errors import ModelConfigError
from crack_lightning.evaluation.crack_maps import pixels_needed
from crack_lightning.models.backbones import build_feature_extractor, normalization

# the backbones whose torchvision layout smp's encoders share (state dicts load as they are)
SMP_ENCODERS = {"mobilenet_v2": "mobilenet_v2"}
# the encoder halves the resolution five times: inputs are padded to a multiple of this
STRIDE = 32
# hyperparameters only a crack-map checkpoint holds: how a checkpoint says what it is
MAP_HPARAM = "decoder_channels"


class CrackMapNet(nn.Module):
    """RGB images in (uint8, or float [0, 1]), (N, 1, H, W) crack logits out, at the
    input's size: any size, padded inside to a multiple of STRIDE by reflection."""

    def __init__(
        self,
        unet: nn.Module,
        mean: tuple,
        std: tuple,
        frozen: bool,
        channels_last: bool,
        hparams: SimpleNamespace,
    ) -> None:
        super().__init__()
        self.hparams = hparams
        self.unet = unet
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.frozen = frozen
        if frozen:
            unet.encoder.requires_grad_(False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def train(self, mode: bool = True) -> CrackMapNet:
        """A frozen encoder stays in eval mode, so its BatchNorm statistics never change."""
        super().train(mode)
        if self.frozen:
            self.unet.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % STRIDE, -width % STRIDE
        inputs = (to_unit_float(images) - self.mean) / self.std
        if pad_h or pad_w:
            inputs = F.pad(inputs, (0, pad_w, 0, pad_h), mode="reflect")
        logits = self.unet(inputs.contiguous(memory_format=self.memory_format))
        return logits[..., :height, :width]


def build_map_network(
    backbone: str,
    pretrained: bool,
    weights_path: str | None,
    freeze_backbone: bool,
    channels_last: bool,
    decoder_channels: list[int],
    image_size: int,
) -> CrackMapNet:
    """The network the segmenter's settings (conf/model/segmenter.yaml) describe: smp's
    U-Net over the backbone, the backbone's weights read as the classifier reads them."""
    import segmentation_models_pytorch as smp  # only where a crack map is asked for

    if backbone not in SMP_ENCODERS:
        raise ModelConfigError(
            f"model.backbone={backbone} has no crack-map encoder here: model=segmenter "
            f"takes {', '.join(SMP_ENCODERS)}."
        )
    extractor, _ = build_feature_extractor(backbone, pretrained, weights_path)
    unet = smp.Unet(
        SMP_ENCODERS[backbone],
        encoder_weights=None,
        decoder_channels=tuple(decoder_channels),
        classes=1,
    )
    unet.encoder.load_state_dict(extractor.state_dict(), strict=True)
    mean, std = normalization(backbone, extractor)
    hparams = SimpleNamespace(backbone=backbone, image_size=image_size, kind="crack_map")
    return CrackMapNet(unet, mean, std, freeze_backbone, channels_last, hparams)


def tile_scores(probs: torch.Tensor, min_share: float) -> torch.Tensor:
    """Each map's P(crack) as a tile under the tile rule (data/masks.py tile_is_crack): the
    k-th largest pixel probability, k = pixels_needed (evaluation/crack_maps.py's
    tile_probs_from_map, the same rule on a whole photo's map), so that a tile scores
    >= t exactly when at least min_share of its pixels do."""
    flat = probs.flatten(1)
    k = pixels_needed(flat.shape[1], min_share)
    return flat.topk(k, dim=1).values[:, -1]
