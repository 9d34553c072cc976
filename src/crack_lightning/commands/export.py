"""`crack-export ckpt_path=RUN/checkpoints/best.ckpt [format=onnx] [quantize=int8 ...]`:
a self-contained model file for deployment (settings: conf/export.yaml; the export
itself: inference/export.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from crack_lightning.cli import run_tool
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.export import FORMATS, export_int8, export_model
from crack_lightning.io import check_writable, write_errors
from crack_lightning.settings import check_export_settings


def export(cfg: DictConfig) -> None:
    """Settings checked, then the checkpoint exported (and quantised)."""
    settings, calibration = check_export_settings(cfg)
    fmt = settings.format.value
    quantize = settings.quantize.value if settings.quantize else None
    suffix = (".int8" if quantize else "") + FORMATS[fmt]
    output = Path(settings.output or Path(settings.ckpt_path).with_suffix(suffix))
    model = load_classifier(settings.ckpt_path, "cpu")
    check_writable(output, "output")
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
