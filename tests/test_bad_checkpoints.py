"""A bad checkpoint given to train.py or to the model loader (predict, scan, export) is
refused in one line that names it, by the safe loader, and never with torch's advice to
load it with weights_only=False; a checkpoint of an earlier version still predicts."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from crack_lightning.errors import ModelConfigError, PredictionError
from crack_lightning.evaluation.threshold import decision_threshold
from crack_lightning.inference.classifiers import LoadedModel, load_classifier
from crack_lightning.inference.unfamiliar import fit_statistics
from crack_lightning.training.callbacks import ResumeHint
from crack_lightning.training.resume import LAST_CKPT, resolve_ckpt_path, resume_step
from crack_lightning.training.run import build

from .conftest import SMALL, compose_config, run_train_py


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def write_bad(path: Path, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(10_000)}, "epoch": 0}, path)
        path.write_bytes(path.read_bytes()[:20_000])
    elif kind == "old_format":  # legacy serialization, and not a training checkpoint
        torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    elif kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "code":
        torch.save({"state_dict": RunsCode(), "epoch": 0}, path)
    return path


REASONS = {
    "empty": "is empty (0 bytes)",
    "truncated": "corrupt or truncated",
    "old_format": "is not a training checkpoint of this framework",
    "text": "not a PyTorch file",
    "code": "refused for safety",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_a_bad_checkpoint_is_refused_in_one_line_naming_it(kind, tmp_path):
    path = write_bad(tmp_path / f"{kind}.ckpt", kind)
    with pytest.raises(ModelConfigError) as caught:
        resolve_ckpt_path(str(path), tmp_path)
    message = str(caught.value)
    assert message.startswith(f"ckpt_path={path} ") and REASONS[kind] in message
    assert "\n" not in message
    assert "weights_only" not in message and "mmap" not in message
    with pytest.raises(ModelConfigError, match=re.escape(REASONS[kind])):
        resume_step(str(path))


def test_ckpt_path_last_with_a_damaged_last_ckpt_is_refused(tmp_path):
    write_bad(tmp_path / LAST_CKPT, "empty")
    with pytest.raises(
        ModelConfigError, match=re.escape(f"ckpt_path={tmp_path / LAST_CKPT} is empty")
    ):
        resolve_ckpt_path("last", tmp_path)


def test_train_py_names_a_bad_checkpoint_without_a_traceback(tmp_path):
    path = write_bad(tmp_path / "evil.ckpt", "code")
    result = run_train_py(f"ckpt_path={path}", f"paths.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: ckpt_path={path} could not be read")
    assert "refused for safety" in lines[-1]
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    assert "this should never run" not in result.stdout


def test_the_resume_hint_survives_a_damaged_last_ckpt(tmp_path, caplog):
    write_bad(tmp_path / LAST_CKPT, "empty")
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=3)
    with caplog.at_level(logging.WARNING):
        ResumeHint(tmp_path).on_exception(trainer, None, KeyboardInterrupt())
    assert f"{tmp_path / LAST_CKPT} cannot be resumed from" in caplog.text
    assert "is empty (0 bytes)" in caplog.text


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_a_bad_model_file_is_refused_by_the_loader_in_one_line(kind, tmp_path):
    path = write_bad(tmp_path / f"{kind}.ckpt", kind)
    with pytest.raises(PredictionError) as caught:
        load_classifier(path, "cpu")
    message = str(caught.value)
    assert message.startswith(f"ckpt_path={path} ") and REASONS[kind] in message
    assert "\n" not in message
    assert "weights_only" not in message and "mmap" not in message


def test_a_checkpoint_of_an_earlier_version_still_predicts(tmp_path):
    """Earlier versions wrote a `finetune` hyperparameter, no `optimizer`, no decision
    threshold and no feature statistics, in torch's legacy serialisation: such a file
    loads with the threshold and statistics marked absent (and why), and predicts as
    the same weights do."""
    module = build(compose_config("train", SMALL).model)  # random weights: pretrained=false
    hparams = dict(module.hparams)
    old = {k: v for k, v in hparams.items() if k != "optimizer"} | {"finetune": None}
    torch.save(
        {"hyper_parameters": old, "state_dict": module.state_dict(), "epoch": 0},
        tmp_path / "old.ckpt",
        _use_new_zipfile_serialization=False,
    )
    stats = fit_statistics(torch.randn(40, 8))
    current = {
        "hyper_parameters": hparams,
        "state_dict": module.state_dict(),
        "epoch": 0,
        "decision_threshold": {"threshold": 0.3, "rule": "recall"},
        "feature_stats": stats,
    }
    torch.save(current, tmp_path / "current.ckpt")

    loaded = load_classifier(tmp_path / "old.ckpt", "cpu")
    assert loaded.threshold is None and decision_threshold(None, loaded.threshold) == 0.5
    assert loaded.feature_stats is None and "callbacks.feature_stats" in loaded.no_stats_reason
    assert loaded.image_size == 64
    now = load_classifier(tmp_path / "current.ckpt", "cpu")
    assert now.threshold == pytest.approx(0.3) and now.no_stats_reason == ""
    assert torch.equal(now.feature_stats["mean"], stats["mean"])
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    expected = LoadedModel.from_module(module).predict(images)
    assert np.allclose(loaded.predict(images), expected, atol=1e-6)
    assert np.allclose(now.predict(images), expected, atol=1e-6)
