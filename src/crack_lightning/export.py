"""Self-contained model files for deployment: ONNX (for onnxruntime) or TorchScript.

`python -m crack_lightning.export ckpt_path=RUN/checkpoints/best.ckpt format=onnx`

The exported model takes uint8 RGB images (N, 3, S, S), already resized to S = the
training image size (stored as metadata), and returns class probabilities (N, 2):
[P(Negative), P(crack)]. Scaling to [0, 1] and the backbone's normalisation are inside.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from crack_lightning.errors import CrackLightningError, PredictionError
from crack_lightning.inference import load_checkpoint_model
from crack_lightning.layout import CLASS_NAMES
from crack_lightning.model import CrackClassifier
from crack_lightning.runtime import quiet_logs

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


class ProbabilityModel(nn.Module):
    """uint8 RGB batch -> class probabilities; everything after resizing is inside."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).softmax(dim=-1)


def export_model(model: CrackClassifier, fmt: str, output: Path) -> Path:
    """Write the model in `fmt` to `output`, creating its folder."""
    if fmt not in FORMATS:
        raise PredictionError(f"format={fmt!r} is not one of {sorted(FORMATS)}.")
    size = int(model.hparams.image_size)
    wrapper = ProbabilityModel(model.net).cpu().eval()
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        _export_onnx(wrapper, example, output, model)
    else:
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example)
        torch.jit.save(traced, str(output), _extra_files={"image_size": str(size)})
    return output


def _export_onnx(
    wrapper: nn.Module, example: torch.Tensor, output: Path, model: CrackClassifier
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
    metadata = {
        "image_size": str(model.hparams.image_size),
        "classes": ",".join(CLASS_NAMES),
        "backbone": model.hparams.backbone,
        "input": "uint8 RGB, shape (N, 3, image_size, image_size), resized with antialiasing",
        "output": "probabilities (N, 2): P(Negative), P(Positive = crack)",
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(output))


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    quiet_logs()
    try:
        model = load_checkpoint_model(cfg.ckpt_path)
        output = Path(cfg.output or Path(cfg.ckpt_path).with_suffix(FORMATS.get(cfg.format, "")))
        path = export_model(model, cfg.format, output)
    except CrackLightningError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"Exported {cfg.ckpt_path} as {cfg.format} to {path} "
        f"(input uint8 RGB {model.hparams.image_size}x{model.hparams.image_size})"
    )


if __name__ == "__main__":
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[2]))
    main()
