"""Shared fixtures: configs composed through Hydra's compose API, real and synthetic data."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from omegaconf import DictConfig

from crack_lightning.cli import compose_command, quiet_logs, tune_malloc
from crack_lightning.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED = ROOT.parent / "shared"
SAMPLE_ROOT = SHARED / "data" / "concrete-crack-sample"
BACKBONE_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_backbone.pth"
MODEL_OPTIONS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem[0] != "_")

# settings that keep a test run small: no worker processes, no progress bar
QUIET = ["data.num_workers=0", "callbacks.progress_bar.refresh_rate=0"]
# settings that keep a training run small: tiny images, a small random-init backbone, 1 epoch
SMALL = [
    "data.image_size=64",
    "data.batch_size=8",
    "model=mobilenetv3_small",
    "model.pretrained=false",
    "trainer.max_epochs=1",
]

tune_malloc()


@pytest.fixture(autouse=True)
def _quiet() -> None:
    """The entry points' warning filters (pytest resets filters for every test)."""
    quiet_logs()


@functools.cache
def load_bench() -> ModuleType:
    """benchmarks/bench.py, the benchmark harness (outside the package, run as a script)."""
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_python(
    *args: str, cwd: Path = ROOT, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python ARGS` as a user would, output captured; Hydra errors without a long trace."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_train_py(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_python(str(ROOT / "train.py"), *args, **kwargs)


def start_paused_train_py(
    *args: str, marker: Path, epoch: int, batch: int, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `train.py ARGS` in the background and wait until it pauses at `batch` of
    `epoch` (tests/probes.PauseAt touches `marker`); fails with its output if it never does."""
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *args,
            "+callbacks.pause._target_=tests.probes.PauseAt",
            f"+callbacks.pause.epoch={epoch}",
            f"+callbacks.pause.batch={batch}",
            f"+callbacks.pause.marker={marker}",
        ],
        cwd=ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), process.communicate()[0][-3000:]
    return process


def in_ci() -> bool:
    """CI sets CI=true; there a missing ../shared is a broken set-up, not a reason to skip."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def shared_path(path: Path) -> Path:
    """A file or folder of ../shared: fails the test under CI=true when it is missing,
    skips it (with the reason) elsewhere, e.g. on a laptop without the folder."""
    if not path.exists():
        reason = (
            f"{path} is missing: the real-data tests need the read-only ../shared folder "
            f"beside the repo"
        )
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The 481 real METU images (241 Positive, 240 Negative)."""
    return shared_path(SAMPLE_ROOT)


@pytest.fixture(scope="session")
def backbone_weights() -> Path:
    """Real ImageNet MobileNetV2 feature weights, backbone keys only."""
    return shared_path(BACKBONE_WEIGHTS)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic data set: 24 images per class at 64 px."""
    root = tmp_path_factory.mktemp("synthetic") / "data"
    return generate_dataset(root, images_per_class=24, image_size=64, seed=0)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose conf/train.yaml with overrides; the run directory is a fresh temp dir."""

    def _make(*overrides: str) -> DictConfig:
        return compose_config(
            "train",
            [
                f"paths.output_dir={tmp_path / 'run'}",
                f"paths.cache_dir={tmp_path / 'cache'}",
                *QUIET,
                *overrides,
            ],
        )

    return _make


@pytest.fixture
def synthetic_cfg(
    make_cfg: Callable[..., DictConfig], synthetic_root: Path
) -> Callable[..., DictConfig]:
    """A fast config: tiny synthetic data, small random-init backbone, one epoch."""

    def _make(*overrides: str) -> DictConfig:
        return make_cfg(
            f"data.root={synthetic_root}",
            *SMALL,
            *overrides,
        )

    return _make


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """conf/<name>.yaml with overrides, composed as the commands compose it."""
    return compose_command(name, overrides)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, sample_root, backbone_weights) -> Path:
    """A run directory trained briefly on the real sample with real ImageNet features
    (3 epochs at 160 px): the model the prediction and export tests use."""
    from crack_lightning.training.run import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={run_dir}",
            f"data.root={sample_root}",
            f"model.weights_path={backbone_weights}",
            "data.image_size=160",
            "trainer.max_epochs=3",
            "callbacks.progress_bar.refresh_rate=0",
        ],
    )
    train(cfg)
    return run_dir


@pytest.fixture
def predict_cfg(tmp_path: Path, trained_run: Path) -> Callable[..., DictConfig]:
    """Compose conf/predict.yaml for the trained checkpoint, writing into a temp dir."""

    def _make(*overrides: str) -> DictConfig:
        return compose_config(
            "predict",
            [
                f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
                f"paths.output_dir={tmp_path / 'predict'}",
                "num_workers=0",
                "progress=false",
                *overrides,
            ],
        )

    return _make
