"""Running a trained model (Lightning checkpoint or exported ONNX file) over image files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from crack_lightning.data.decode import DecodedImages
from crack_lightning.errors import PredictionError
from crack_lightning.evaluation.threshold import METADATA_KEY, stored_threshold
from crack_lightning.inference.unfamiliar import CHECKPOINT_KEY as FEATURE_STATS_KEY
from crack_lightning.inference.unfamiliar import stats_stage, unfamiliar_score
from crack_lightning.io import load_safely
from crack_lightning.models.classifier import CrackClassifier
from crack_lightning.progress import progress as progress_of


def load_checkpoint_model(path: str | Path) -> CrackClassifier:
    """Rebuild the classifier from a checkpoint's hyperparameters and weights (tensors only).

    The backbone is built without downloading anything: the checkpoint holds its weights.
    """
    checkpoint = load_safely(
        path,
        "ckpt_path",
        PredictionError,
        "Use a training run's checkpoints/best.ckpt (e.g. "
        "logs/train/runs/<date_time>/checkpoints/best.ckpt) or an exported .onnx file.",
    )
    if not isinstance(checkpoint, dict) or not {"hyper_parameters", "state_dict"} <= set(
        checkpoint
    ):
        raise PredictionError(
            f"ckpt_path={path} is not a crack-lightning training checkpoint (it lacks "
            f"hyper_parameters and state_dict). Use a run's checkpoints/best.ckpt."
        )
    hparams = {**checkpoint["hyper_parameters"], "pretrained": False, "weights_path": None}
    hparams.pop("finetune", None)  # checkpoints from before fine-tuning became a callback
    try:
        model = CrackClassifier(**hparams)
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError) as err:
        raise PredictionError(
            f"ckpt_path={path} does not match this version's model: {err}"
        ) from None
    # chosen on validation by training's SourceMetrics callback; None if not stored
    model.decision_threshold = stored_threshold(checkpoint)
    # training features' statistics for the unfamiliar score (inference/unfamiliar.py)
    model.feature_stats = checkpoint.get(FEATURE_STATS_KEY)
    return model.eval()


@dataclass
class TorchClassifier:
    """A checkpoint's model on a device; batches in, P(crack) out."""

    model: CrackClassifier
    device: torch.device

    @property
    def image_size(self) -> int:
        return int(self.model.hparams.image_size)

    @property
    def threshold(self) -> float | None:
        """The decision threshold stored in the checkpoint, if any."""
        return getattr(self.model, "decision_threshold", None)

    def __post_init__(self) -> None:
        self.model = self.model.to(self.device, memory_format=torch.channels_last).eval()

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> np.ndarray:
        images = images.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        return self.model(images).softmax(dim=-1)[:, 1].float().cpu().numpy()

    @property
    def feature_stats(self) -> dict | None:
        return getattr(self.model, "feature_stats", None)

    @torch.inference_mode()
    def predict_unfamiliar(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """P(crack) and the unfamiliar score (needs feature_stats) of each image."""
        images = images.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        net, stage = self.model.net, stats_stage(self.feature_stats)
        if stage is None:
            features = described = net.features(images)
        else:  # statistics of the frozen stages' pooled output (unfamiliar.py)
            hidden = net.stage_output(images, stage)
            features, described = net.from_stage(hidden, stage), hidden.mean(dim=(2, 3))
        probs = net.head(features).softmax(dim=-1)[:, 1]
        scores = unfamiliar_score(described, self.feature_stats)
        return probs.float().cpu().numpy(), scores.float().cpu().numpy()


class OnnxClassifier:
    """An exported ONNX model run by onnxruntime; same interface as TorchClassifier."""

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise PredictionError(
                "Running .onnx models needs onnxruntime: pip install onnxruntime"
            ) from None
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), providers=onnxruntime.get_available_providers()
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise PredictionError(f"ckpt_path={path} is not a loadable ONNX model: {err}") from None
        self.input = self.session.get_inputs()[0]
        size = self.input.shape[-1]
        if not isinstance(size, int):
            raise PredictionError(
                f"ckpt_path={path}: expected a fixed input size, got {self.input.shape}"
            )
        self.image_size = size
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.threshold = float(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None

    def predict(self, images: torch.Tensor) -> np.ndarray:
        probs = self.session.run(None, {self.input.name: images.numpy()})[0]
        return probs[:, 1]


def load_classifier(path: str | Path, device: str = "auto") -> TorchClassifier | OnnxClassifier:
    """A Lightning checkpoint (.ckpt) or an exported model (.onnx), ready to predict."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise PredictionError(f"ckpt_path={path} does not exist.")
        return OnnxClassifier(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TorchClassifier(load_checkpoint_model(path), torch.device(device))


class ImageFiles(DecodedImages):
    """Files decoded and resized exactly as images are during training (data.decode).

    A file that cannot be read yields its reason instead of an image, so one bad file
    never stops a batch.
    """

    def __init__(self, paths: Sequence[Path], image_size: int) -> None:
        super().__init__(paths, range(len(paths)), image_size, on_bad="skip")

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str]:
        image, reason = self.read(index)
        return image, index, reason


def _collate(items: list) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    good = [(image, index) for image, index, reason in items if not reason]
    failed = [(index, reason) for _, index, reason in items if reason]
    images = torch.stack([image for image, _ in good]) if good else None
    return images, [index for _, index in good], failed


def classify_files(
    classifier: TorchClassifier | OnnxClassifier,
    paths: Sequence[Path],
    batch_size: int,
    num_workers: int,
    progress: bool = True,
) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """P(crack) per file (NaN where unreadable), and (file, reason) for each skipped file."""
    probs = np.full(len(paths), np.nan, dtype=np.float32)
    skipped: list[tuple[Path, str]] = []
    loader = DataLoader(
        ImageFiles(paths, classifier.image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    with progress_of(len(paths), "Classifying", "img", progress) as bar:
        for images, indices, failed in loader:
            if images is not None:
                probs[indices] = classifier.predict(images)
            skipped += [(paths[i], reason) for i, reason in failed]
            bar.update(len(indices) + len(failed))
    return probs, skipped
