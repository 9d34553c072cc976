"""timm backbones (`model=timm model.name=NAME`): any timm model as a feature extractor.

timm is an optional extra (`pip install -e .[timm]`), imported only when a timm model is
asked for. The model is built with `num_classes=0`, so its own forward returns pooled
features. Weights come from `model.weights_path` (a state dict saved from the timm model,
`.pth`/`.pt` or `.safetensors`), else from the Hugging Face hub through timm when
`model.pretrained`, else the model keeps its random initialisation.

Stages: the feature cache of frozen stages and fine-tuning by stages
(models/finetuning.py) need the backbone as `features` (a Sequential of stem and stages)
followed by the rest of its forward, like torchvision's MobileNets. A timm model is cut
that way when it is built as a stem followed by `stages`, `blocks` or `layers` (a
Sequential), or by numbered children `layer1..`, `s1..`, `stage1..`, each stage giving a
4-d NCHW map (ResNets, ConvNeXt, EfficientNet, MobileNetV3, RegNet, ...); the cut is
used only if it computes exactly what the whole model does. Other models (vision
transformers, NHWC Swin, ...) are used whole: frozen with cached pooled features, or
trained whole; fine-tuning by stages refuses them with a one-line error.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from crack_lightning.errors import ModelConfigError, WeightsError
from crack_lightning.models.weights import load_matching_state, load_weights_file

log = logging.getLogger(__name__)

TIMM_INSTALL = "model=timm needs the timm package: pip install -e '.[timm]' (or pip install timm)."
TIMM_FIND_NAMES = (
    "List the names timm knows with "
    "`python -c \"import timm; print(timm.list_models('convnext*'))\"`."
)


def check_timm_name(name: str, image_size: int | None = None) -> None:
    """Refuse a model name timm does not know, saying how to find the names, and an
    image size a model with a fixed input size (vision transformers) cannot take."""
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return  # a hub repository or a local folder: timm resolves it when building
    try:
        import timm
    except ImportError:
        raise ModelConfigError(TIMM_INSTALL) from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        guess = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelConfigError(f"model.name={name!r} is not a timm model.{guess} {TIMM_FIND_NAMES}")
    config = timm.get_pretrained_cfg(name)
    if image_size is not None and config is not None and config.fixed_input_size:
        size = config.input_size[-1]
        if image_size != size:
            raise ModelConfigError(
                f"timm model {name!r} takes {size}x{size} images only, but "
                f"data.image_size={image_size}; set data.image_size={size}."
            )


STAGE_CONTAINERS = ("stages", "blocks", "layers")
NUMBERED_STAGE = re.compile(r"(layer|s|stage)\d+")


def import_timm():
    """timm, or a one-line error saying how to install it."""
    try:
        import timm
    except ImportError:
        raise ModelConfigError(TIMM_INSTALL) from None
    return timm


class TimmBackbone(nn.Module):
    """A timm model as a feature extractor: `features` (stem, then each stage) followed by
    the rest of the model's own forward (its final norm or head convolution and pooling),
    or, for a model that cannot be cut into stages, the whole model (`features` absent).

    The cut replaces the stem and stage modules inside `model` by nn.Identity, so
    `model(hidden)` runs only what follows the last stage.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.name = name
        self.no_stages_reason: str | None = None
        cut = _find_cut(model)
        if isinstance(cut, str):
            self.no_stages_reason = cut
            self.model = model
            return
        stem, stages = cut
        reason = _cut_checked(model, stem, stages)
        if reason is not None:
            self.no_stages_reason = reason
            self.model = model
            return
        # registered first: named_children lists the stages before the rest (finetuning)
        self.features = nn.Sequential(
            nn.Sequential(OrderedDict((n, getattr(model, n)) for n in stem)),
            *(module for _, module in stages),
        )
        _hollow(model, stem, stages)
        self.model = model

    def after_stages(self, hidden: torch.Tensor) -> torch.Tensor:
        """The rest of the model's own forward after its last stage."""
        return self.model(hidden)

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std of the model's pretrained weights (ImageNet's for most)."""
        config = self.model.pretrained_cfg
        return tuple(config["mean"]), tuple(config["std"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.no_stages_reason is not None:
            return self.model(images)
        return self.model(self.features(images))


def _find_cut(model: nn.Module) -> tuple[list[str], list[tuple[str, nn.Module]]] | str:
    """(names of the stem's children, [(name, stage)]) or why the model has no stages."""
    children = list(model.named_children())
    names = [n for n, _ in children]
    for container in STAGE_CONTAINERS:
        module = getattr(model, container, None)
        if isinstance(module, nn.Sequential) and container in names:
            stem = names[: names.index(container)]
            stages = [(f"{container}.{n}", m) for n, m in module.named_children()]
            return stem, stages
    numbered = [i for i, n in enumerate(names) if NUMBERED_STAGE.fullmatch(n)]
    if numbered and numbered == list(range(numbered[0], numbered[-1] + 1)):
        return names[: numbered[0]], [children[i] for i in numbered]
    return (
        f"it has no {'/'.join(STAGE_CONTAINERS)} Sequential or numbered stages "
        f"(layer1.., s1.., stage1..)"
    )


def _hollow(model: nn.Module, stem: list[str], stages: list[tuple[str, nn.Module]]) -> None:
    """Put nn.Identity where the stem and the stages were."""
    for name in stem:
        setattr(model, name, nn.Identity())
    containers = {n.split(".")[0] for n, _ in stages if "." in n}
    for name in containers or [n for n, _ in stages]:
        setattr(model, name, nn.Identity())


def _cut_checked(
    model: nn.Module, stem: list[str], stages: list[tuple[str, nn.Module]]
) -> str | None:
    """None when stem + stages + the hollowed model compute what the model does, with
    4-d NCHW stage outputs; else why not. The model is left as it was."""
    if getattr(model, "output_fmt", "NCHW") != "NCHW":
        return f"its stages give {model.output_fmt} maps, not NCHW"
    was_training = model.training
    model.eval()
    saved = {name: module for name, module in model.named_children()}
    try:
        with torch.no_grad():
            config = model.pretrained_cfg
            size = config["input_size"][1:] if config.get("fixed_input_size") else (64, 64)
            images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
            expected = model(images)
            hidden = images
            for name in stem:
                hidden = getattr(model, name)(hidden)
            if hidden.ndim != 4:
                return f"its stem gives a {hidden.ndim}-d output, not an NCHW map"
            for name, stage in stages:
                hidden = stage(hidden)
                if hidden.ndim != 4:
                    return f"its stage {name} gives a {hidden.ndim}-d output, not an NCHW map"
            _hollow(model, stem, stages)
            got = model(hidden)
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
            return "its forward does more between the stem and the stages than running them in turn"
        return None
    except Exception as err:  # any failure means: use it whole
        return f"running its stem and stages in turn fails ({type(err).__name__}: {err})"
    finally:
        for name, module in saved.items():
            setattr(model, name, module)
        model.train(was_training)


def build(name: str, pretrained: bool, weights_path: str | Path | None) -> tuple[nn.Module, int]:
    """The timm model `name` as a TimmBackbone, and the width of its pooled features."""
    timm = import_timm()
    check_timm_name(name)
    download = pretrained and weights_path is None
    if download:
        check_has_weights(timm, name)
    try:
        model = timm.create_model(name, pretrained=download, num_classes=0)
    except (OSError, RuntimeError) as err:
        if not download:
            raise
        raise WeightsError(_download_failed(name, err)) from None
    except Exception as err:
        if download and type(err).__module__.startswith(("huggingface_hub", "httpx", "httpcore")):
            raise WeightsError(_download_failed(name, err)) from None
        raise
    if weights_path is not None:
        load_state(model, _read(weights_path), name, f"model.weights_path={weights_path}")
    backbone = TimmBackbone(model, name)
    if backbone.no_stages_reason is not None:
        log.info("timm model %s is used whole: %s", name, backbone.no_stages_reason)
    else:
        log.info("timm model %s: a stem and %d stages", name, len(backbone.features) - 1)
    # the pooled width: after the head convolution of MobileNetV3 and the like
    return backbone, int(getattr(model, "head_hidden_size", None) or model.num_features)


def check_has_weights(timm, name: str) -> None:
    """Refuse model.pretrained=true for a model timm has no pretrained weights for."""
    config = timm.get_pretrained_cfg(name)
    if config is not None and not (config.hf_hub_id or config.url or config.file):
        raise WeightsError(
            f"timm has no pretrained weights for model.name={name!r}: set "
            f"model.pretrained=false (random initialisation) or model.weights_path=FILE, "
            f"or pick a model with weights (timm.list_models(pretrained=True))."
        )


def _download_failed(name: str, err: Exception) -> str:
    """One line: why the hub download failed and how to use model.weights_path instead."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    config = import_timm().get_pretrained_cfg(name)
    repo = (config.hf_hub_id if config is not None else None) or name.split(":", 1)[-1]
    return (
        f"Could not download pretrained weights for timm model {name!r} from the Hugging "
        f"Face hub ({reason}). If this machine is offline, download model.safetensors from "
        f"https://huggingface.co/{repo} on one with internet access and pass "
        f"model.weights_path=/path/to/model.safetensors (or a state dict saved with "
        f"torch.save(timm.create_model({name!r}).state_dict(), path)); "
        f"model.pretrained=false trains on random features instead (far less accurate)."
    )


def _read(path: str | Path) -> Mapping[str, torch.Tensor]:
    """A state dict from a .safetensors file, or a torch file read safely."""
    if Path(path).suffix.lower() != ".safetensors":
        return load_weights_file(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise WeightsError(f"model.weights_path={path} does not exist.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise WeightsError(
            f"model.weights_path={path} is not a readable safetensors file ({err})."
        ) from None


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], name: str, source: str) -> None:
    """Load a state dict saved from the timm model (with or without its classifier)."""
    head = model.pretrained_cfg.get("classifier") or "classifier"
    heads = (head,) if isinstance(head, str) else tuple(head)
    load_matching_state(
        model,
        state,
        drop=tuple(h + "." for h in heads),
        source=source,
        hint=f"Use weights saved from timm.create_model({name!r}) (full or without "
        f"its classifier), or pick the matching model.name.",
        label=f"timm model {name!r}",
    )
