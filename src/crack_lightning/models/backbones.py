"""Backbones cut below their classifier to serve as feature extractors: torchvision's
ImageNet models, and any timm model (model.backbone=timm, named by model.name:
models/timm_backbones.py).

One registry maps our backbone names to torchvision's model and weight enums, so that
building, weight loading and preprocessing constants all come from one place.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse
from torchvision import models

from crack_lightning.errors import ModelConfigError
from crack_lightning.models.weights import (
    download_state_dict,
    load_matching_state,
    load_weights_file,
)

log = logging.getLogger(__name__)

# model.backbone of every timm model; model.name says which (conf/model/timm.yaml)
TIMM = "timm"


@dataclass(frozen=True)
class BackboneSpec:
    """How to cut one torchvision classifier into a feature extractor."""

    name: str  # torchvision's model name, also ours
    weights: str  # torchvision weight enum entry with the ImageNet weights
    head: str  # dotted path of the module that maps pooled features to ImageNet logits


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1", "classifier"),
        BackboneSpec(
            "mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V1", "classifier"
        ),
        BackboneSpec(
            "mobilenet_v3_small", "MobileNet_V3_Small_Weights.IMAGENET1K_V1", "classifier"
        ),
        BackboneSpec("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "fc"),
        BackboneSpec("resnet50", "ResNet50_Weights.IMAGENET1K_V2", "fc"),
        BackboneSpec("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", "classifier"),
        BackboneSpec("convnext_tiny", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", "classifier.2"),
    )
}


def get_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name, failing with the list of valid names."""
    try:
        return BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(BACKBONES))
        raise ModelConfigError(
            f"Unknown backbone model.backbone={name!r}. Choose one of: {known} "
            f"(or a config file from conf/model/, e.g. model=mobilenetv2), or any timm "
            f"model with model=timm model.name=NAME."
        ) from None


def normalization(
    name: str, extractor: nn.Module | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the backbone's ImageNet weights were trained with (a timm model's
    own, read from the built `extractor`)."""
    if name == TIMM:
        return extractor.normalization()
    preset = models.get_weight(get_spec(name).weights).transforms()
    return tuple(preset.mean), tuple(preset.std)


def build_feature_extractor(
    name: str, pretrained: bool, weights_path: str | Path | None, model_name: str | None = None
) -> tuple[nn.Module, int]:
    """Return the backbone without its ImageNet head, and the width of its pooled features.

    Weights come from `weights_path` when given, else from torchvision's (timm's) download
    when `pretrained`, else the backbone keeps its random initialisation. `model_name`
    names the timm model when `name` is TIMM.
    """
    if name == TIMM:
        from crack_lightning.models import timm_backbones

        if not model_name:
            raise ModelConfigError(
                "model.backbone=timm needs model.name, the timm model (model=timm model.name=NAME)."
            )
        return timm_backbones.build(model_name, pretrained, weights_path)
    spec = get_spec(name)
    model = models.get_model(spec.name, weights=None)
    head = model.get_submodule(spec.head)
    feature_dim = next(m.in_features for m in head.modules() if isinstance(m, nn.Linear))
    model.set_submodule(spec.head, nn.Identity())
    if weights_path is not None:
        state = load_weights_file(weights_path)
        load_backbone_state(model, state, spec, source=f"model.weights_path={weights_path}")
    elif pretrained:
        url = models.get_weight(spec.weights).url
        state = download_state_dict(url)
        load_backbone_state(model, state, spec, source=url)
    return model, feature_dim


def fold_batchnorm(extractor: nn.Module) -> nn.Module:
    """A copy of a frozen (eval-mode) extractor with every BatchNorm folded into the
    convolution before it (traced with torch.fx): the same function with a third fewer
    passes over the activations, so faster on CPU (docs/speed.md). A model torch.fx
    cannot trace (some timm models) runs as it is, from a copy."""
    try:
        folded = fuse(extractor.eval(), inplace=False)
    except Exception as err:  # tracing fails in many ways; folding is optional
        log.debug("BatchNorm not folded (%s: %s)", type(err).__name__, err)
        return copy.deepcopy(extractor.eval())
    return fuse_activations(folded)


def fuse_activations(traced: fx.GraphModule) -> fx.GraphModule:
    """Each convolution followed by a ReLU or ReLU6 (hardtanh) only, as one module that on
    a CPU applies the activation while oneDNN writes the convolution's output
    (ConvActivation): one pass fewer over every activation map, the same values
    (clamping is exact). In place; returns `traced`."""
    if not torch.backends.mkldnn.is_available():
        return traced
    modules = dict(traced.named_modules())
    for node in list(traced.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if type(conv) is not nn.Conv2d or isinstance(conv.padding, str) or len(node.users) != 1:
            continue
        if conv.padding_mode != "zeros":
            continue
        (user,) = node.users
        activation = modules.get(user.target) if user.op == "call_module" else None
        post = _exact_post_op(activation)
        if post is None:
            continue
        name = f"{node.target.replace('.', '_')}_with_activation"
        traced.add_submodule(name, ConvActivation(conv, activation, *post))
        with traced.graph.inserting_after(user):
            fused = traced.graph.call_module(name, node.args)
        user.replace_all_uses_with(fused)
        traced.graph.erase_node(user)
        traced.graph.erase_node(node)
    traced.graph.lint()
    traced.recompile()
    return traced


def _exact_post_op(activation: nn.Module | None) -> tuple[str, list[float]] | None:
    """oneDNN's name and scalars for an activation it computes bit for bit as torch does
    (ReLU, hardtanh/ReLU6: clamps); None for any other."""
    if type(activation) is nn.ReLU:
        return "relu", []
    if isinstance(activation, nn.Hardtanh):  # ReLU6 is one
        return "hardtanh", [float(activation.min_val), float(activation.max_val)]
    return None


class ConvActivation(nn.Module):
    """conv then activation; on a CPU in float32 without autograd, one oneDNN call
    (mkldnn._convolution_pointwise, the kernel torch.compile's CPU backend fuses to),
    elsewhere the two modules as they were."""

    def __init__(self, conv: nn.Conv2d, activation: nn.Module, post: str, scalars: list[float]):
        super().__init__()
        self.conv, self.activation = conv, activation
        self.post, self.scalars = post, scalars

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        fusable = x.device.type == "cpu" and x.dtype == conv.weight.dtype == torch.float32
        if not fusable or (torch.is_grad_enabled() and conv.weight.requires_grad):
            return self.activation(conv(x))
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            conv.weight,
            conv.bias,
            conv.padding,
            conv.stride,
            conv.dilation,
            conv.groups,
            self.post,
            self.scalars,
            "",
        )


def load_backbone_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], spec: BackboneSpec, source: str
) -> None:
    """Load a full or backbone-only torchvision state dict, refusing any mismatch by name."""
    head_prefix = spec.head + "."
    load_matching_state(
        model,
        state,
        drop=(head_prefix,),
        source=source,
        hint=f"Use weights saved from torchvision's models.{spec.name}() (full or without "
        f"{head_prefix}*), or pick the matching model.backbone.",
        label=f"backbone {spec.name!r}",
    )
