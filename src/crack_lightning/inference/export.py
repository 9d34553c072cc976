"""Self-contained model files for deployment: ONNX (for onnxruntime) or TorchScript.

The command is `crack-export ckpt_path=RUN/checkpoints/best.ckpt format=onnx`
(commands/export.py).

The exported model takes uint8 RGB images (N, 3, S, S), already resized to S = the
training image size (stored as metadata), and returns class probabilities (N, 2):
[P(Negative), P(crack)]. Scaling to [0, 1] and the backbone's normalisation are inside.
Both formats carry the same metadata (ONNX metadata_props, TorchScript extra files),
the decision threshold chosen on validation included; predict and scan load either
(inference/classifiers.py).

`quantize=int8 calibration.inputs=[TRAINING_IMAGES]` writes an int8 ONNX model instead
(static, per-channel, calibrated on training images): faster on CPU and smaller, with
the same predictions on the real sample (figures: docs/prediction.md "Export").
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from torch import nn

from crack_lightning.data.decode import collect_inputs, decode
from crack_lightning.errors import PredictionError, UnreadableImage
from crack_lightning.evaluation.threshold import METADATA_KEY
from crack_lightning.inference.classifiers import LoadedModel
from crack_lightning.progress import progress
from crack_lightning.settings import CLASS_NAMES, at_least

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


@dataclass(frozen=True)
class CalibrationSettings:
    """calibration.* of conf/export.yaml: the images an int8 export is calibrated on."""

    settings_error = PredictionError
    inputs: list[str] | None
    images: Annotated[int, at_least(1)]
    batch_size: Annotated[int, at_least(1)]
    float_convs: Annotated[int, at_least(0)]


class ProbabilityModel(nn.Module):
    """uint8 RGB batch -> class probabilities; everything after resizing is inside."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).softmax(dim=-1)


def export_model(model: LoadedModel, fmt: Literal["onnx", "torchscript"], output: Path) -> Path:
    """Write the model in `fmt` to `output`, creating its folder."""
    size = model.image_size
    wrapper = ProbabilityModel(model.checkpoint_module).cpu().eval()
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        _export_onnx(wrapper, example, output, export_metadata(model))
    else:
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example)
        torch.jit.save(traced, str(output), _extra_files=export_metadata(model))
    return output


def export_metadata(model: LoadedModel) -> dict[str, str]:
    """What an exported file says about itself; the loader reads back image_size and
    decision_threshold."""
    built = model.checkpoint_module.hparams
    metadata = {
        "image_size": str(model.image_size),
        "classes": ",".join(CLASS_NAMES),
        # a timm model with its name: timm:convnext_tiny
        "backbone": ":".join(filter(None, (built.backbone, built.name))),
        "input": "uint8 RGB, shape (N, 3, image_size, image_size), resized with antialiasing",
        "output": "probabilities (N, 2): P(Negative), P(Positive = crack)",
    }
    if model.threshold is not None:  # chosen on validation
        metadata[METADATA_KEY] = str(model.threshold)
    return metadata


def _export_onnx(
    wrapper: nn.Module, example: torch.Tensor, output: Path, metadata: dict[str, str]
) -> None:
    import onnx

    torch.onnx.export(
        wrapper,
        (example,),
        str(output),
        input_names=["images"],
        output_names=["probs"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
        external_data=False,  # one file, weights included
        dynamo=True,
    )
    proto = onnx.load(str(output))
    _add_metadata(proto, metadata)
    onnx.save(proto, str(output))


def _add_metadata(proto, metadata: dict[str, str]) -> None:
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def calibration_files(inputs: Sequence[str], count: int) -> list[Path]:
    """`count` image files spread evenly over the sorted inputs (files, folders, globs).

    Evenly spaced rather than the first ones, so that both class folders (and every part
    of a large set) are represented; deterministic, so an export can be repeated.
    """
    files, problems = collect_inputs([str(item) for item in inputs])
    if not files:
        reasons = "; ".join(f"{item}: {reason}" for item, reason in problems)
        raise PredictionError(f"calibration.inputs holds no images ({reasons}).")
    picks = np.linspace(0, len(files) - 1, num=min(int(count), len(files))).round()
    return [files[int(i)] for i in dict.fromkeys(picks)]


class CalibrationImages:
    """Feeds calibration batches to onnxruntime's calibrator, decoded and resized exactly
    as predict.py does (so the ranges are those seen at prediction), with a progress bar.
    Unreadable files are skipped and counted."""

    def __init__(
        self, files: Sequence[Path], image_size: int, batch_size: int, progress: bool
    ) -> None:
        self.files, self.batch_size = list(files), int(batch_size)
        self.image_size = image_size
        self.skipped: list[Path] = []
        self.position = 0
        self.progress = progress
        self.bar: Any = None  # opened at the first batch, not during the export

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.bar is None:
            self.bar = progress(len(self.files), "Calibrating", "img", self.progress)
        images = []
        while not images and self.position < len(self.files):
            for path in self.files[self.position : self.position + self.batch_size]:
                try:
                    images.append(decode(path, self.image_size).numpy())
                except UnreadableImage:
                    self.skipped.append(path)
            self.bar.update(min(self.batch_size, len(self.files) - self.position))
            self.position += self.batch_size
        if not images:
            self.bar.close()
            if len(self.skipped) == len(self.files):  # onnxruntime would fail obscurely
                raise PredictionError(
                    f"calibration.inputs: none of the {len(self.files)} calibration images "
                    f"could be read (e.g. {self.skipped[0]})."
                )
            return None
        return {"images": np.stack(images)}

    def rewind(self) -> None:
        self.position = 0


def leading_nodes(model, count: int) -> list[str]:
    """The first `count` Conv nodes and the activations (Clip, Relu) right after them.

    They stay in float32: in MobileNetV2's first blocks, per-channel activation ranges
    differ by orders of magnitude, and the one int8 range per tensor that onnxruntime uses
    for activations wipes out the small channels. Quantised, they alone moved P(crack) by
    0.04 on average and flipped 3-4 of the 481 sample images; kept in float, 0.007 and none,
    for about a tenth of the int8 speed-up.
    """
    convs = [node for node in model.graph.node if node.op_type == "Conv"][: int(count)]
    outputs = {node.output[0] for node in convs}
    activations = [
        node.name
        for node in model.graph.node
        if node.op_type in ("Clip", "Relu") and node.input[0] in outputs
    ]
    return [node.name for node in convs] + activations


def quantize_onnx(
    fp32_path: Path,
    output: Path,
    calibration: CalibrationImages,
    float_convs: int,
) -> Path:
    """Static int8 quantisation of an exported ONNX model for CPUs (QDQ format).

    The settings are those that kept accuracy on the real sample (docs/prediction.md): the
    graph pre-processed (shape inference, constant folding) first; weights int8 per output
    channel, activations uint8 (the u8 x s8 products of VNNI/AVX2 kernels) with MinMax
    ranges; the leading `float_convs` convolutions left in float32. Percentile and Entropy
    calibration were no more accurate and much slower to calibrate.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(output),
            calibration,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=leading_nodes(onnx.load(str(prepared)), float_convs),
            calibrate_method=CalibrationMethod.MinMax,
        )
    source = {p.key: p.value for p in onnx.load(str(fp32_path)).metadata_props}
    proto = onnx.load(str(output))
    proto.ClearField("metadata_props")
    _add_metadata(
        proto,
        {
            **source,
            "quantization": f"int8 static QDQ, per-channel, MinMax on "
            f"{len(calibration.files) - len(calibration.skipped)} images, "
            f"first {float_convs} convolutions in float32",
        },
    )
    onnx.save(proto, str(output))
    return output


def export_int8(
    model: LoadedModel, output: Path, calibration: CalibrationSettings, progress: bool
) -> Path:
    """Export to ONNX, then quantise to int8 with images named in `calibration` (checked
    at start-up: settings.check_export_settings)."""
    files = calibration_files(calibration.inputs, calibration.images)
    images = CalibrationImages(files, model.image_size, calibration.batch_size, progress)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_model(model, "onnx", Path(tmp) / "fp32.onnx")
        return quantize_onnx(fp32, output, images, calibration.float_convs)
