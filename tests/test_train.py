"""train.py end to end: fast runs on synthetic data, the real sample, multirun, resume, errors."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from crack_lightning.errors import ConfigError, DataError, ModelConfigError, WeightsError
from crack_lightning.training.run import build, train

from .conftest import run_train_py
from .probes import validate_by_hand


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_fast_dev_run_on_synthetic_data(synthetic_cfg, tmp_path):
    weights = tmp_path / "weights.pt"
    cfg = synthetic_cfg(
        "+trainer.fast_dev_run=true",
        "+callbacks.weights._target_=tests.probes.SaveWeights",
        f"+callbacks.weights.path={weights}",
    )
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    # the last weights' figures over the whole validation split, as validated by hand
    expected = validate_by_hand(cfg, torch.load(weights, weights_only=True))
    assert metrics["val/loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert metrics["val/acc"] == pytest.approx(expected["acc"])
    assert metrics["val/auroc"] == pytest.approx(expected["auroc"])
    assert metrics["best_checkpoint"] is None  # fast_dev_run saves no checkpoint
    assert (run_dir / "split_manifest.csv").is_file()
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_default_recipe_learns_the_real_sample_with_a_bit_identical_backbone(
    make_cfg, sample_root, backbone_weights
):
    """The acceptance run: defaults, real images, real ImageNet features, 10 epochs."""
    cfg = make_cfg(
        f"data.root={sample_root}",
        f"model.weights_path={backbone_weights}",
        "trainer.max_epochs=10",
        "data.num_workers=2",
        "data.test_fraction=0.1",
    )
    L.seed_everything(cfg.seed)
    initial_head = {k: v.clone() for k, v in build(cfg.model).net.head.state_dict().items()}
    metrics = train(cfg)

    run_dir = Path(cfg.paths.output_dir)
    print(json.dumps(metrics, indent=1))
    assert metrics["val/acc"] >= 0.95
    assert metrics["test/acc"] >= 0.95
    assert json.loads((run_dir / "metrics.json").read_text())["val/acc"] == metrics["val/acc"]
    assert metrics["best_checkpoint"] == str(run_dir / "checkpoints" / "best.ckpt")
    assert (run_dir / "split_manifest.csv").is_file()
    assert scalar_steps(run_dir, "val/acc")  # curves in TensorBoard

    original = torch.load(backbone_weights, weights_only=True)
    for name in ("best.ckpt", "last.ckpt"):
        state = torch.load(run_dir / "checkpoints" / name, weights_only=True)["state_dict"]
        backbone = {
            k.removeprefix("net.backbone."): v
            for k, v in state.items()
            if k.startswith("net.backbone.")
        }
        # weights and BatchNorm running statistics, bit for bit
        assert backbone.keys() == original.keys()
        assert all(torch.equal(backbone[k], original[k]) for k in original), name
        assert not torch.equal(state["net.head.1.weight"], initial_head["1.weight"])


def test_resume_from_last_checkpoint_continues_training(synthetic_cfg, tmp_path):
    first = synthetic_cfg("trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'first'}")
    train(first)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    steps_per_epoch = torch.load(last, weights_only=True)["global_step"]

    second = synthetic_cfg(
        "trainer.max_epochs=2", f"ckpt_path={last}", f"paths.output_dir={tmp_path / 'second'}"
    )
    train(second)
    resumed = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2 * steps_per_epoch
    # only the second epoch ran: its curve starts after the first epoch's steps
    assert min(scalar_steps(tmp_path / "second", "train/loss_step")) >= steps_per_epoch


def test_multirun_gives_one_run_dir_per_job_with_events_and_metrics(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train_py(
        "-m",
        "model.lr=1e-3,1e-4",
        f"data.root={synthetic_root}",
        "data.image_size=64",
        "data.num_workers=0",
        "model=mobilenetv3_small",
        "model.pretrained=false",
        "trainer.max_epochs=1",
        "callbacks.progress_bar.refresh_rate=0",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job, lr in (("0", "0.001"), ("1", "0.0001")):
        (run_dir,) = sweep.glob(f"{job}_*model.lr={lr}*")  # folders named by overrides
        assert f"model.lr={lr}" in (run_dir / ".hydra" / "overrides.yaml").read_text().replace(
            "1e-3", "0.001"
        ).replace("1e-4", "0.0001")
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert "val/acc" in json.loads((run_dir / "metrics.json").read_text())
        assert (run_dir / "checkpoints" / "best.ckpt").is_file()
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()


# --- bad input: a clear error naming the setting -------------------------------------------


def test_cli_reports_a_missing_data_set_without_a_traceback(tmp_path):
    result = run_train_py(
        f"data.root={tmp_path / 'concrete_crack'}",
        f"paths.output_dir={tmp_path / 'run'}",
        "data.download=false",  # the default (auto) would download it: tests/test_download.py
    )
    assert result.returncode == 2
    assert f"error: data.root={tmp_path / 'concrete_crack'} does not exist" in result.stderr
    assert "data=synthetic" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("data.root={tmp}/missing", DataError, "does not exist"),
        (
            "data.root={tmp}/wrong_layout",
            DataError,
            "must hold the class folders Negative/ and Positive/",
        ),
        ("data.root={tmp}/empty_class", DataError, "empty_class/Positive holds no images"),
        ("model.backbone=alexnet", ModelConfigError, "Unknown backbone model.backbone='alexnet'"),
        (
            "model.weights_path={tmp}/resnet.pth",
            WeightsError,
            "do not fit backbone 'mobilenet_v3_small'",
        ),
        ("ckpt_path={tmp}/gone.ckpt", ModelConfigError, "ckpt_path=.*gone.ckpt does not exist"),
        ("data.val_fraction=1.5", DataError, "data.val_fraction=1.5 must lie strictly between"),
    ],
)
def test_bad_settings_stop_before_training(synthetic_cfg, tmp_path, override, error, message):
    (tmp_path / "wrong_layout" / "cracks").mkdir(parents=True)
    (tmp_path / "empty_class" / "Negative").mkdir(parents=True)
    (tmp_path / "empty_class" / "Positive").mkdir()
    from PIL import Image
    from torchvision.models import resnet18

    Image.new("RGB", (8, 8)).save(tmp_path / "empty_class" / "Negative" / "a.png")
    torch.save(resnet18().state_dict(), tmp_path / "resnet.pth")
    # data.download=false: a missing root is an error here, not a first run's download
    cfg = synthetic_cfg("data.download=false", override.format(tmp=tmp_path))
    with pytest.raises(error, match=message):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("model.lr=abc", ModelConfigError, r"model.lr=abc must be a number\."),
        ("model.lr=-1", ModelConfigError, r"model.lr=-1.0 must be a learning rate > 0"),
        ("trainer.max_epochs=-1", ConfigError, r"trainer.max_epochs=-1 must be an integer >= 1"),
        ("data.val_fraction=abc", DataError, r"data.val_fraction=abc must be a number\."),
        ("data.batch_size=abc", DataError, r"data.batch_size=abc must be an integer\."),
        ("data.batch_size=0", DataError, r"data.batch_size=0 must be an integer >= 1"),
    ],
)
def test_wrong_setting_types_and_ranges_stop_before_any_data_is_read(
    synthetic_cfg, tmp_path, override, error, message
):
    """Named at once, before the data root (missing here) is even looked at."""
    cfg = synthetic_cfg(f"data.root={tmp_path / 'missing'}", override)
    with pytest.raises(error, match=message):
        train(cfg)


def test_sgd_with_momentum_trains_from_settings_alone(synthetic_cfg):
    """model.optimizer is a config: another optimizer needs no code, and its state is in
    the checkpoint, whose hyper-parameters still rebuild the model for prediction."""
    from crack_lightning.inference.classifiers import load_classifier

    cfg = synthetic_cfg("model.optimizer._target_=torch.optim.SGD", "+model.optimizer.momentum=0.9")
    metrics = train(cfg)
    ckpt = torch.load(metrics["best_checkpoint"], weights_only=True)
    [group] = ckpt["optimizer_states"][0]["param_groups"]
    assert group["momentum"] == 0.9 and group["lr"] == cfg.model.lr
    assert all("momentum_buffer" in s for s in ckpt["optimizer_states"][0]["state"].values())
    assert ckpt["hyper_parameters"]["optimizer"]["_target_"] == "torch.optim.SGD"
    loaded = load_classifier(metrics["best_checkpoint"], "cpu")
    assert loaded.checkpoint_module.hparams.backbone == "mobilenet_v3_small"


def test_offline_pretrained_download_says_to_use_weights_path(synthetic_cfg, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    cfg = synthetic_cfg("model=mobilenetv2", "model.pretrained=true")
    with pytest.raises(
        WeightsError, match=r"model.weights_path=/path/to/mobilenet_v2-b0353104.pth"
    ):
        train(cfg)


def test_validation_figures_reach_tensorboard(synthetic_cfg):
    """Random frozen features misclassify plenty: the confusion matrix and the worst images
    of the one source are logged each epoch."""
    cfg = synthetic_cfg("trainer.max_epochs=2")
    train(cfg)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"))
    events.Reload()
    tags = events.Tags()["images"]
    assert {"val/confusion_matrix", "val/worst"} <= set(tags), tags  # one source: no suffix
    assert len(events.Images("val/confusion_matrix")) == 2  # one per epoch, none for sanity check


def test_the_confusion_matrix_is_drawn_every_n_epochs(synthetic_cfg):
    cfg = synthetic_cfg("trainer.max_epochs=3", "callbacks.validation_figures.every_n_epochs=2")
    train(cfg)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"))
    events.Reload()
    steps = [image.step for image in events.Images("val/confusion_matrix")]
    assert len(steps) == 2 and steps[0] < steps[1]  # epochs 0 and 2, not 1
    worst = events.Images("val/worst")
    assert steps == [worst[0].step, worst[2].step]  # the worst images: every epoch
