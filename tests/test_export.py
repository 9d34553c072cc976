"""Exported models agree with the checkpoint, and predict.py runs the ONNX one."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from crack_lightning.errors import PredictionError
from crack_lightning.export import export_model
from crack_lightning.images import load_rgb
from crack_lightning.inference import load_checkpoint_model
from crack_lightning.prediction import run
from crack_lightning.transforms import eval_transform


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> dict[str, Path]:
    model = load_checkpoint_model(trained_run / "checkpoints" / "best.ckpt")
    folder = tmp_path_factory.mktemp("export")
    return {
        fmt: export_model(model, fmt, folder / f"model.{fmt}") for fmt in ("onnx", "torchscript")
    }


@pytest.fixture(scope="module")
def real_batch(sample_root) -> torch.Tensor:
    """32 real images, half cracked, preprocessed as in training (160 px)."""
    files = [
        p for cls in ("Positive", "Negative") for p in sorted((sample_root / cls).iterdir())[:16]
    ]
    return torch.stack([eval_transform(160)(load_rgb(p)) for p in files])


def test_onnx_probabilities_match_pytorch(trained_run, exported, real_batch):
    model = load_checkpoint_model(trained_run / "checkpoints" / "best.ckpt")
    with torch.inference_mode():
        expected = model(real_batch).softmax(-1).numpy()
    session = onnxruntime.InferenceSession(
        str(exported["onnx"]), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"images": real_batch.numpy()})[0]
    assert got.shape == (32, 2)
    assert np.abs(got - expected).max() < 1e-4
    assert (got[:16, 1] > 0.5).sum() >= 15 and (got[16:, 1] < 0.5).sum() >= 15
    metadata = {p.key: p.value for p in onnx.load(str(exported["onnx"])).metadata_props}
    assert metadata["image_size"] == "160" and metadata["classes"] == "Negative,Positive"


def test_torchscript_probabilities_match_pytorch(trained_run, exported, real_batch):
    model = load_checkpoint_model(trained_run / "checkpoints" / "best.ckpt")
    scripted = torch.jit.load(str(exported["torchscript"]))
    with torch.inference_mode():
        assert torch.allclose(scripted(real_batch), model(real_batch).softmax(-1), atol=1e-5)


def test_predict_runs_the_onnx_model_like_the_checkpoint(
    predict_cfg, exported, sample_root, tmp_path
):
    inputs = f"inputs=[{sample_root / 'Positive'}]"
    run(predict_cfg(inputs, f"output={tmp_path / 'ckpt.csv'}"))
    run(predict_cfg(inputs, f"output={tmp_path / 'onnx.csv'}", f"ckpt_path={exported['onnx']}"))
    with (tmp_path / "ckpt.csv").open() as a, (tmp_path / "onnx.csv").open() as b:
        ours, theirs = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [r["label"] for r in ours] == [r["label"] for r in theirs]
    assert (
        max(
            abs(float(x["prob_crack"]) - float(y["prob_crack"]))
            for x, y in zip(ours, theirs, strict=True)
        )
        < 1e-4
    )


def test_unknown_export_format_is_refused(trained_run, tmp_path):
    model = load_checkpoint_model(trained_run / "checkpoints" / "best.ckpt")
    with pytest.raises(PredictionError, match="format='tflite' is not one of"):
        export_model(model, "tflite", tmp_path / "m.tflite")
