"""`crack-export ckpt_path=RUN/checkpoints/best.ckpt [format=onnx] [quantize=int8 ...]`:
a self-contained model file for deployment (settings: conf/export.yaml; the export
itself: inference/export.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from omegaconf import DictConfig

from crack_lightning.cli import run_tool
from crack_lightning.errors import PredictionError
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.export import FORMATS, CalibrationSettings, export_int8, export_model
from crack_lightning.io import check_writable, write_errors
from crack_lightning.settings import settings_of


@dataclass(frozen=True)
class ExportSettings:
    """conf/export.yaml (its calibration.* are CalibrationSettings)."""

    settings_error = PredictionError
    ckpt_path: str
    format: Literal["onnx", "torchscript"]
    output: str | None  # null: beside the checkpoint
    quantize: Literal["int8"] | None  # null: float32
    progress: bool

    @staticmethod
    def check_together(settings: dict, section: str) -> None:
        quantize, fmt = settings["quantize"], settings["format"]
        if quantize is not None and fmt != "onnx":
            raise PredictionError(f"quantize={quantize} needs format=onnx (got format={fmt}).")


def check_export_settings(cfg: DictConfig) -> tuple[ExportSettings, CalibrationSettings | None]:
    """The export settings; the calibration ones (and their images) only for int8."""
    settings = settings_of(cfg, ExportSettings, "", others=("paths", "calibration", "task_name"))
    if settings.quantize is None:
        return settings, None
    calibration = settings_of(cfg.calibration, CalibrationSettings, "calibration")
    if not calibration.inputs:
        raise PredictionError(
            "quantize=int8 needs calibration.inputs: training images (a folder with "
            "Positive/ and Negative/, files or glob patterns), e.g. "
            "calibration.inputs=[data/concrete_crack]. Use images the model was trained on, "
            "not those you evaluate it on."
        )
    return settings, calibration


def export(cfg: DictConfig) -> None:
    """Settings checked, then the checkpoint exported (and quantised)."""
    settings, calibration = check_export_settings(cfg)
    fmt, quantize = settings.format, settings.quantize
    suffix = (".int8" if quantize else "") + FORMATS[fmt]
    output = Path(settings.output or Path(settings.ckpt_path).with_suffix(suffix))
    check_writable(output, "output")
    model = load_classifier(settings.ckpt_path, "cpu")
    with write_errors(output, "output"):  # a disk that fills up while exporting
        if calibration is not None:
            path = export_int8(model, output, calibration, settings.progress)
        else:
            path = export_model(model, fmt, output)
    kind = f"{fmt}, {quantize}" if quantize else fmt
    print(
        f"Exported {settings.ckpt_path} as {kind} to {path} "
        f"(input uint8 RGB {model.image_size}x{model.image_size})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: settings from conf/export.yaml."""
    return run_tool("export", export, argv)


if __name__ == "__main__":
    raise SystemExit(main())
