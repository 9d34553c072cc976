"""Fast by default: no repeated validation at the end, progress fit for log files, the
GPU settings resolved at start-up, device JPEG decoding checked on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from crack_lightning.models.classifier import CrackClassifier
from crack_lightning.training.run import build, train


@pytest.mark.parametrize("cache", ["true", "false"])
def test_the_final_report_reuses_the_best_epochs_validation(synthetic_cfg, monkeypatch, cache):
    steps = []
    original = CrackClassifier.validation_step
    monkeypatch.setattr(
        CrackClassifier,
        "validation_step",
        lambda self, batch, i: steps.append(len(batch[1])) or original(self, batch, i),
    )
    cfg = synthetic_cfg("trainer.max_epochs=3", f"data.cache_features={cache}")
    metrics = train(cfg)
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    batches = math.ceil(len(datamodule.split["val"]) / cfg.data.batch_size)
    sanity = min(2, batches)
    assert len(steps) == sanity + 3 * batches  # no second validation pass of the best checkpoint
    # metrics.json holds the best checkpoint's figures: validate it again by hand
    model = build(cfg.model)
    state = torch.load(metrics["best_checkpoint"], weights_only=True)
    model.load_state_dict(state["state_dict"])
    model.eval()
    logits, labels = [], []
    with torch.inference_mode():
        for images, label in datamodule.val_dataloader():
            logits.append(model(images))
            labels.append(label)
    logits, labels = torch.cat(logits), torch.cat(labels)
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    assert metrics["val/loss"] == pytest.approx(loss, abs=2e-3)
    assert metrics["val/acc"] == pytest.approx(accuracy)
    assert {"val/auroc", "val/f1", "val/precision", "val/recall"} <= set(metrics)
    stored = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert stored == metrics


def test_a_log_file_gets_a_few_progress_lines_not_one_per_batch(synthetic_root, tmp_path):
    from .conftest import run_train_py

    result = run_train_py(  # output captured: not a terminal
        f"data.root={synthetic_root}",
        "data.image_size=32",
        "data.batch_size=1",
        "data.num_workers=0",
        "model=mobilenetv3_small",
        "model.pretrained=false",
        "trainer.max_epochs=3",
        "logger=none",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.strip()]
    batches = 3 * (34 + 14)  # 3 epochs of 34 training and 14 validation images, 1 a batch
    assert len(lines) < batches / 4, output[-3000:]  # not a line per batch
    assert "Caching backbone features: 48/48 img" in output  # the fill's one line
    assert output.count("epoch 2: val/acc=") == 1  # one line per epoch with its metrics


@pytest.mark.parametrize(
    ("cuda", "bf16", "expected"),
    [(True, True, "bf16-mixed"), (True, False, "16-mixed"), (False, False, "32-true")],
)
def test_auto_mixed_precision_is_resolved_for_the_gpu_at_hand(monkeypatch, cuda, bf16, expected):
    from crack_lightning.training.check import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "a GPU")
    assert resolve_precision("auto-mixed") == expected
    assert resolve_precision("16-mixed") == "16-mixed"  # an explicit choice stays


def test_gpu_trainer_config_asks_for_auto_mixed_precision():
    from .conftest import compose_config

    cfg = compose_config("train", ["trainer=gpu"])
    assert cfg.trainer.precision == "auto-mixed"


def test_batched_device_decoding_matches_the_worker_path(sample_root, tmp_path):
    from PIL import Image

    from crack_lightning.data.decode import EncodedImages, collate_encoded, decode, decode_batch

    files = sorted((sample_root / "Positive").glob("*.jpg"))[:3]
    png = tmp_path / "image.png"
    Image.open(files[0]).save(png)  # not a JPEG: decoded on the CPU
    samples = [(str(path), 1) for path in [*files, png]]
    encoded, labels = collate_encoded([EncodedImages(samples, 64)[i] for i in range(4)])
    images = decode_batch(encoded, 64, "cpu")
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.uint8
    assert labels.tolist() == [1, 1, 1, 1]
    expected = torch.stack([decode(path, 64) for path, _ in samples])
    assert (images.float() - expected.float()).abs().mean() < 1.0  # same pixels within rounding


def test_training_with_decoding_on_the_device_runs_on_cpu(
    synthetic_cfg, backbone_weights, tmp_path
):
    """One step on real ImageNet features: the run's validation figures are those of its
    weights on the images decoded on the CPU, and well above chance."""
    from .probes import validate_by_hand

    weights = tmp_path / "weights.pt"
    real = ["model=mobilenetv2", f"model.weights_path={backbone_weights}"]
    decoded_on_cpu = synthetic_cfg(*real, "data.cache_features=false")
    metrics = train(
        synthetic_cfg(
            *real,
            "data.decode_on_device=true",
            "data.cache_features=false",
            "+trainer.fast_dev_run=true",
            "+callbacks.weights._target_=tests.probes.SaveWeights",
            f"+callbacks.weights.path={weights}",
        )
    )
    expected = validate_by_hand(decoded_on_cpu, torch.load(weights, weights_only=True))
    assert metrics["val/loss"] == pytest.approx(expected["loss"], abs=1e-4)
    assert metrics["val/auroc"] == pytest.approx(expected["auroc"])
    assert metrics["val/auroc"] > 0.85  # a chance ranking scores 0.5


def test_device_throughput_reports_every_figure_on_cpu(synthetic_cfg):
    from .conftest import load_bench

    device_throughput = load_bench().device_throughput

    cfg = synthetic_cfg("data.image_size=32")
    figures = device_throughput(cfg, torch.device("cpu"), [2, 4], batches=1)
    names = {
        f"{kind}_bs{b}" for kind in ("train_uncached", "train_cached", "predict") for b in (2, 4)
    }
    assert set(figures) == names and all(value > 0 for value in figures.values())


def test_default_command_row_reports_time_to_accuracy_beside_keras(
    synthetic_root, backbone_weights, tmp_path
):
    from .conftest import load_bench

    default_command_row = load_bench().default_command_row

    keras_rates = {"train": 70.0, "predict": 87.0}
    row = default_command_row(synthetic_root, backbone_weights, tmp_path, 1, keras_rates)
    assert row["images"] == 48 and row["epochs"] == 1
    # one epoch of the head on real ImageNet features tells the synthetic cracks apart
    assert row["default_command_val_acc"] >= 0.75
    assert row["default_command_vs_one_pass"] == pytest.approx(
        row["default_command_s"] / row["one_backbone_pass_s"]
    )
    keras = 1 * (48 * 0.7 / 70.0 + 48 * 0.3 / 87.0)
    assert row["keras_estimated_s"] == pytest.approx(keras)
    assert row["speedup_vs_keras"] == pytest.approx(keras / row["default_command_s"])
    assert list((tmp_path / "default_command_cache").rglob("features_*.pt"))  # cached by default


@pytest.mark.parametrize(
    ("stdout", "stderr", "expected"), [(1, 1, "tqdm"), (0, 1, "lines"), (1, 0, "lines")]
)
def test_bars_only_when_both_outputs_are_terminals(monkeypatch, stdout, stderr, expected):
    import sys

    from lightning.pytorch.callbacks import TQDMProgressBar

    from crack_lightning.training.callbacks import LogProgress, progress_bar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: bool(stdout), raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: bool(stderr), raising=False)
    bar = progress_bar(refresh_rate=1, line_every_s=30)
    assert isinstance(bar, TQDMProgressBar if expected == "tqdm" else LogProgress)
    assert not progress_bar(refresh_rate=0, line_every_s=30).is_enabled


def test_device_decoding_names_a_broken_jpeg_and_keeps_decode_py_pixels_for_others(tmp_path):
    from PIL import Image

    from crack_lightning.data.decode import EncodedImages, collate_encoded, decode, decode_batch
    from crack_lightning.errors import DamagedImage

    rgba = tmp_path / "half_transparent.png"
    Image.new("RGBA", (40, 30), (200, 10, 10, 128)).save(rgba)  # over white, as decode.py does
    encoded, _ = collate_encoded([EncodedImages([(str(rgba), 0)], 32)[0]])
    assert torch.equal(decode_batch(encoded, 32, "cpu")[0], decode(rgba, 32))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8" + b"not a jpeg" * 20)
    encoded, _ = collate_encoded([EncodedImages([(str(broken), 0)], 32)[0]])
    with pytest.raises(DamagedImage, match="data.decode_on_device=false"):
        decode_batch(encoded, 32, "cpu")


@pytest.mark.parametrize(("name", "fused"), [("mobilenet_v2", 35), ("resnet18", 9)])
def test_the_folded_backbone_clamps_inside_its_convolutions_with_the_same_values(name, fused):
    from torch.fx.experimental.optimization import fuse

    from crack_lightning.models.backbones import (
        ConvActivation,
        build_feature_extractor,
        fold_batchnorm,
    )

    torch.manual_seed(0)
    extractor, _ = build_feature_extractor(name, pretrained=False, weights_path=None)
    folded = fold_batchnorm(extractor)
    assert sum(isinstance(m, ConvActivation) for m in folded.modules()) == fused
    plain = fuse(extractor.eval(), inplace=False)  # BatchNorm folded, activations apart
    images = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        for layout in (torch.contiguous_format, torch.channels_last):
            inputs = images.contiguous(memory_format=layout)
            expected = plain(inputs)
            assert torch.allclose(folded(inputs), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # float64, or autograd: the plain modules run
        assert torch.allclose(
            folded.double()(images.double()), plain.double()(images.double()), atol=1e-10
        )


def test_progress_lines_estimate_the_time_left(monkeypatch, caplog):
    """After 10 of 40 batches in 20 s: about 60 s left in the epoch; an epoch of 100 s with
    3 of max_epochs=5 left: about 5 min more at most."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from crack_lightning.training import callbacks

    clock = iter([0.0, 20.0, 100.0])
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    bar = callbacks.LogProgress(every_s=1)
    trainer = SimpleNamespace(
        current_epoch=1,
        max_epochs=5,
        sanity_checking=False,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        callback_metrics={"val/loss": 0.5},
        num_training_batches=40,
    )
    monkeypatch.setattr(callbacks.LogProgress, "total_train_batches", 40)
    with caplog.at_level("INFO"):
        bar.on_train_epoch_start(trainer, None)
        bar.on_train_batch_end(trainer, None, None, None, 9)
        bar.on_validation_end(trainer, None)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "epoch 1: batch 10/40, 20 s, about 60 s left in the epoch"
    expected = (
        "epoch 1: val/loss=0.5000, 100 s; 3 more epoch(s) at most (trainer.max_epochs), about 5 min"
    )
    assert lines[1] == expected
