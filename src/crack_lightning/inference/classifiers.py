"""A trained model loaded from any of its files (Lightning checkpoint, exported ONNX or
TorchScript), and running it over image files. A checkpoint becomes the plain-torch
network (models/network.py): prediction never imports Lightning.

Every file becomes one typed `LoadedModel`: the network, the input size, the decision
threshold stored with it and the training features' statistics (or why there are none).
What checkpoints of earlier versions lack or hold is settled in `_read_checkpoint` only.
"""

from __future__ import annotations

import inspect
import logging
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from crack_lightning.data.decode import DecodedImages
from crack_lightning.data.workers import compute_in_workers, run_batches
from crack_lightning.errors import CrackLightningError, PredictionError
from crack_lightning.evaluation.threshold import METADATA_KEY, stored_threshold
from crack_lightning.inference.unfamiliar import CHECKPOINT_KEY as FEATURE_STATS_KEY
from crack_lightning.inference.unfamiliar import stats_stage, unfamiliar_score
from crack_lightning.io import load_safely
from crack_lightning.models.crack_map import MAP_HPARAM
from crack_lightning.models.network import CrackNet, build_network
from crack_lightning.progress import progress as progress_of

if TYPE_CHECKING:
    from crack_lightning.inference.crack_maps import MapNetwork
    from crack_lightning.models.classifier import CrackClassifier

log = logging.getLogger(__name__)

MODEL_FILES = (
    "Use a training run's checkpoints/best.ckpt (e.g. "
    "logs/train/runs/<date_time>/checkpoints/best.ckpt), or a file crack-export wrote "
    "(.onnx or .pt)."
)
# hyperparameters that earlier versions' checkpoints hold and CrackClassifier does not take
DROPPED_HPARAMS = ("finetune",)  # fine-tuning is a callback (callbacks.finetune)
# Lightning stores the data module's hyperparameters (data.*) in every checkpoint here
DATA_HPARAMS_KEY = "datamodule_hyper_parameters"
# a checkpoint's (CrackClassifier's) weights of the network: under net.
NET_PREFIX = "net."
# onnxruntime's providers that run nothing on a GPU (Azure's only calls remote endpoints)
CPU_PROVIDERS = {"CPUExecutionProvider", "AzureExecutionProvider"}
NO_STATS_IN_CHECKPOINT = (
    "the checkpoint holds no feature statistics; train with callbacks.feature_stats "
    "(on in experiment=generalize) to get the unfamiliar score"
)
NO_STATS_OF_MAPS = "a crack-map model has no feature statistics"
NO_STATS_WHEN_EXPORTED = (
    "an exported {kind} model holds no feature statistics (it outputs probabilities "
    "only); scan with the training checkpoint (.ckpt) to get the unfamiliar score"
)


@dataclass
class TorchNetwork:
    """A checkpoint's network on a device."""

    net: CrackNet
    device: torch.device

    def __post_init__(self) -> None:
        self.net = self.net.to(self.device, memory_format=torch.channels_last).eval()

    def _on_device(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, memory_format=torch.channels_last, non_blocking=True)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """P(crack) of each image."""
        return self.net(self._on_device(images)).softmax(dim=-1)[:, 1].float().cpu().numpy()

    @torch.inference_mode()
    def with_unfamiliar(
        self, images: torch.Tensor, stats: Mapping[str, torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray]:
        """P(crack) and the unfamiliar score, in one pass through the backbone."""
        images, net, stage = self._on_device(images), self.net, stats_stage(stats)
        if stage is None:
            features = described = net.features(images)
        else:  # statistics of the frozen stages' pooled output (unfamiliar.py)
            hidden = net.stage_output(images, stage)
            features, described = net.from_stage(hidden, stage), hidden.mean(dim=(2, 3))
        probs = net.head(features).softmax(dim=-1)[:, 1]
        scores = unfamiliar_score(described, stats)
        return probs.float().cpu().numpy(), scores.float().cpu().numpy()


@dataclass
class OnnxNetwork:
    """An exported ONNX model (float32 or int8) run by onnxruntime.

    A session does not survive a fork (its thread pool stays behind), so every process
    that runs the model builds its own from the same bytes, on its first batch: a
    DataLoader worker (data/workers.py) with its share of the cores (the torch threads
    run_batches gives it, one on 2 cores with 2 workers) and no inter-op threads, so that
    no thread waits for another while the other worker decodes. The loading process keeps
    the session it loaded, with onnxruntime's default threads.
    """

    model: bytes  # the file's contents, for the sessions of worker processes
    session: Any  # the loading process's onnxruntime.InferenceSession
    input_name: str
    _sessions: dict[int, Any] = field(default_factory=dict, repr=False)  # by process id

    def __post_init__(self) -> None:
        self._sessions[os.getpid()] = self.session

    @property
    def device(self) -> torch.device:
        """cpu when onnxruntime runs it on the CPU only (a GPU session stays here)."""
        on_cpu = set(self.session.get_providers()) <= CPU_PROVIDERS
        return torch.device("cpu" if on_cpu else "cuda")

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        return self._own_session().run(None, {self.input_name: images.numpy()})[0][:, 1]

    def _own_session(self) -> Any:
        """This process's session; the one inherited from the parent is never run (or
        freed) here."""
        pid = os.getpid()
        if pid not in self._sessions:
            self._sessions[pid] = onnx_session(self.model, torch.get_num_threads())
        return self._sessions[pid]


def onnx_session(model: bytes, threads: int | None = None) -> Any:
    """An onnxruntime session for an ONNX model's bytes: on every provider there is by
    default; with `threads`, on the CPU with that many intra-op threads and one
    inter-op thread (a worker process's)."""
    import onnxruntime

    if threads is None:
        return onnxruntime.InferenceSession(model, providers=onnxruntime.get_available_providers())
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@dataclass
class ScriptNetwork:
    """An exported TorchScript model."""

    module: torch.jit.ScriptModule
    device: torch.device

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        return self.module(images.to(self.device))[:, 1].float().cpu().numpy()


@dataclass
class LoadedModel:
    """A trained model ready to predict, whichever file it came from.

    It takes uint8 RGB batches (N, 3, image_size, image_size), decoded and resized as in
    training (data.decode): scaling and the backbone's normalisation are inside every
    network, checkpoint or exported, so nothing else is needed to prepare an input.
    """

    source: str  # the file it came from, for messages
    network: TorchNetwork | OnnxNetwork | ScriptNetwork | MapNetwork
    image_size: int
    threshold: float | None  # chosen on validation and stored with the model; None: not stored
    feature_stats: dict[str, torch.Tensor] | None  # training features' (unfamiliar.py)
    no_stats_reason: str = ""  # why feature_stats is None
    # (patch size, stride) of the tiles it was trained or adapted on (stored_window); None:
    # trained on crops only, or an exported file
    window: tuple[int, int] | None = None
    _reason_told: bool = field(default=False, init=False, repr=False)

    @classmethod
    def from_module(
        cls,
        module: CrackNet | CrackClassifier,
        device: str | torch.device = "cpu",
        source: str = "the network in memory",
        threshold: float | None = None,
        feature_stats: dict[str, torch.Tensor] | None = None,
    ) -> LoadedModel:
        """A network (a checkpoint's, or one just built, alone or in its CrackClassifier)
        on `device`."""
        net = module if isinstance(module, CrackNet) else module.net
        return cls(
            source,
            TorchNetwork(net, torch.device(device)),
            int(net.hparams.image_size),
            threshold,
            feature_stats,
            "" if feature_stats is not None else NO_STATS_IN_CHECKPOINT,
        )

    @property
    def checkpoint_module(self) -> CrackNet:
        """The checkpoint's network, which export writes out; exported files have none."""
        if self.maps:
            raise PredictionError(
                f"ckpt_path={self.source} is a crack-map model (model=segmenter): export "
                f"takes a classifier's checkpoint; scan with the crack-map checkpoint itself."
            )
        if not isinstance(self.network, TorchNetwork):
            raise PredictionError(
                f"ckpt_path={self.source} is an exported model: export needs the training "
                f"checkpoint (.ckpt) it came from."
            )
        return self.network.net

    @property
    def maps(self) -> bool:
        """Whether it maps cracks pixel by pixel (a crack-map checkpoint)."""
        from crack_lightning.inference.crack_maps import MapNetwork

        return isinstance(self.network, MapNetwork)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """P(crack) of each image."""
        return self.network.probabilities(images)

    def predict_unfamiliar(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """P(crack) and the unfamiliar score of each image; without feature statistics,
        no scores, and the reason logged once per model."""
        return self.unfamiliar_scorer()(images)

    def unfamiliar_scorer(self) -> Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray | None]]:
        """What predict_unfamiliar runs, to hand to worker processes (data/workers.py):
        the reason for no scores is logged here, once per model, not in each worker."""
        if self.feature_stats is None or not isinstance(self.network, TorchNetwork):
            if not self._reason_told:
                log.warning("%s: no unfamiliar score: %s.", self.source, self.no_stats_reason)
                self._reason_told = True
            return _without_scores(self.predict)
        return partial(self.network.with_unfamiliar, stats=self.feature_stats)

    def ready_for_workers(
        self, num_workers: int, compute: Callable[[torch.Tensor], Any] | None = None
    ) -> bool:
        """Whether batches should run through this model in the DataLoader's worker
        processes (data/workers.py: any network on a CPU, with workers). If so, for a
        checkpoint's or TorchScript network `compute` (default: predict) has run once on
        a one-image batch, so that the folded backbone (or the optimised graph) exists
        before the workers fork; an ONNX model's workers build their own sessions."""
        if not compute_in_workers(self.network.device, num_workers):
            return False
        if not isinstance(self.network, OnnxNetwork):
            probe = torch.zeros(1, 3, self.image_size, self.image_size, dtype=torch.uint8)
            (compute or self.predict)(probe)
        return True


def load_classifier(path: str | Path, device: str = "auto") -> LoadedModel:
    """The one loader: a Lightning checkpoint (.ckpt) or a file crack-export wrote (ONNX,
    TorchScript), ready to predict."""
    path = Path(path)
    if not path.is_file():
        raise PredictionError(f"ckpt_path={path} does not exist. {MODEL_FILES}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path)
    if _is_torchscript(path):
        return _load_torchscript(path, torch.device(device))
    return _load_checkpoint(path, torch.device(device))


def _load_checkpoint(path: Path, device: torch.device) -> LoadedModel:
    """Rebuild the network from a checkpoint's hyperparameters and weights (tensors only).

    The backbone is built without downloading anything: the checkpoint holds its weights.
    """
    checkpoint = load_safely(path, "ckpt_path", PredictionError, MODEL_FILES)
    hparams, threshold, stats = _read_checkpoint(path, checkpoint)
    state = {
        name.removeprefix(NET_PREFIX): tensor
        for name, tensor in checkpoint["state_dict"].items()
        if name.startswith(NET_PREFIX)
    }
    build = build_network
    if MAP_HPARAM in hparams:  # a crack-map checkpoint (models/segmenter.py)
        from crack_lightning.models.crack_map import build_map_network as build
    try:
        net = build(**_network_settings(hparams, build))
        net.load_state_dict(state)
    except (TypeError, RuntimeError) as err:
        raise PredictionError(
            f"ckpt_path={path} does not match this version's model: {err}"
        ) from None
    if MAP_HPARAM in hparams:
        from crack_lightning.inference.crack_maps import MapNetwork

        network = MapNetwork(net, device, float(hparams["min_share"]))
        loaded = LoadedModel(
            str(path), network, int(hparams["image_size"]), threshold, None, NO_STATS_OF_MAPS
        )
    else:
        loaded = LoadedModel.from_module(net, device, str(path), threshold, stats)
    loaded.window = stored_window(checkpoint)
    return loaded


def stored_window(checkpoint: Mapping[str, Any]) -> tuple[int, int] | None:
    """The window a checkpoint was trained for: tile size and stride of the last masks
    source of its data settings (an adapted model's site: adapt puts it last), as
    Lightning stores them in every checkpoint; None when it learnt from crops only."""
    sources = (checkpoint.get(DATA_HPARAMS_KEY) or {}).get("sources") or {}
    tiled = [entry for entry in sources.values() if entry and entry.get("kind") == "masks"]
    if not tiled:
        return None
    return int(tiled[-1]["tile_size"]), int(tiled[-1]["stride"])


def _network_settings(hparams: Mapping[str, Any], build: Callable) -> dict[str, Any]:
    """The hyperparameters `build` takes (the rest are training's: lr, optimizer...)."""
    taken = inspect.signature(build).parameters
    return {name: value for name, value in hparams.items() if name in taken}


def read_training_checkpoint(
    path: Path, setting: str, error: type[CrackLightningError], hint: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A training checkpoint (tensors only) and its hyperparameters in this version's
    terms, for training to start from (init_from); errors name `setting` and give `hint`."""
    checkpoint = load_safely(path, setting, error, hint)
    return checkpoint, _read_checkpoint(path, checkpoint, setting, error, hint)[0]


def _read_checkpoint(
    path: Path,
    checkpoint: Any,
    setting: str = "ckpt_path",
    error: type[CrackLightningError] = PredictionError,
    hint: str = MODEL_FILES,
) -> tuple[dict[str, Any], float | None, dict[str, torch.Tensor] | None]:
    """Hyperparameters, stored threshold and feature statistics of a checkpoint of this
    or an earlier version, in this version's terms. The one place that knows them:

    - legacy (pre-zip) torch serialisation: read by load_safely like any other;
    - hyperparameters CrackClassifier does not take (DROPPED_HPARAMS) are dropped; no
      `optimizer` (before it was configurable): the model predicts but does not train;
    - no decision threshold (before thresholds were stored, or threshold_rule=null):
      None, and predict uses 0.5 (threshold.py);
    - no feature statistics (trained without callbacks.feature_stats): None, and scan
      says why its unfamiliar column is empty.
    """
    if not isinstance(checkpoint, dict) or not {"hyper_parameters", "state_dict"} <= set(
        checkpoint
    ):
        raise error(
            f"{setting}={path} is not a training checkpoint of this framework (it lacks "
            f"hyper_parameters and state_dict). {hint}"
        )
    hparams = {
        name: value
        for name, value in checkpoint["hyper_parameters"].items()
        if name not in DROPPED_HPARAMS
    }
    hparams |= {"pretrained": False, "weights_path": None, "optimizer": hparams.get("optimizer")}
    return hparams, stored_threshold(checkpoint), checkpoint.get(FEATURE_STATS_KEY)


def _load_onnx(path: Path) -> LoadedModel:
    try:
        import onnxruntime  # noqa: F401  (onnx_session imports it)
    except ImportError:
        raise PredictionError(
            "Running .onnx models needs onnxruntime: pip install onnxruntime"
        ) from None
    try:
        model = path.read_bytes()
        session = onnx_session(model)
    except Exception as err:  # onnxruntime raises its own exception types
        raise PredictionError(f"ckpt_path={path} is not a loadable ONNX model: {err}") from None
    images = session.get_inputs()[0]
    size = images.shape[-1]
    if not isinstance(size, int):
        raise PredictionError(f"ckpt_path={path}: expected a fixed input size, got {images.shape}")
    return LoadedModel(
        str(path),
        OnnxNetwork(model, session, images.name),
        size,
        exported_threshold(session.get_modelmeta().custom_metadata_map),
        None,
        NO_STATS_WHEN_EXPORTED.format(kind="ONNX"),
    )


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold compiled code (NAME/code/...); checkpoints do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def _load_torchscript(path: Path, device: torch.device) -> LoadedModel:
    metadata = dict.fromkeys(("image_size", METADATA_KEY), "")
    try:
        module = torch.jit.load(str(path), map_location=device, _extra_files=metadata)
    except Exception as err:  # TorchScript raises its own exception types
        raise PredictionError(
            f"ckpt_path={path} is not a loadable TorchScript model: {err}"
        ) from None
    text = {name: bytes(value).decode() for name, value in metadata.items() if value}
    if "image_size" not in text:
        raise PredictionError(
            f"ckpt_path={path} is a TorchScript model without its image size: export it "
            f"with crack-export format=torchscript."
        )
    return LoadedModel(
        str(path),
        ScriptNetwork(module.eval(), device),
        int(text["image_size"]),
        exported_threshold(text),
        None,
        NO_STATS_WHEN_EXPORTED.format(kind="TorchScript"),
    )


def exported_threshold(metadata: Mapping[str, str]) -> float | None:
    """The threshold an exported file's metadata carries (ONNX metadata_props, TorchScript
    extra files), if any."""
    return float(metadata[METADATA_KEY]) if metadata.get(METADATA_KEY) else None


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
    classifier: LoadedModel,
    paths: Sequence[Path],
    batch_size: int,
    num_workers: int,
    progress: bool = True,
) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """P(crack) per file (NaN where unreadable), and (file, reason) for each skipped file.
    On a CPU each worker decodes and classifies whole batches (data/workers.py)."""
    probs = np.full(len(paths), np.nan, dtype=np.float32)
    skipped: list[tuple[Path, str]] = []
    batches = run_batches(
        ImageFiles(paths, classifier.image_size),
        batch_size,
        num_workers,
        partial(_classify_batch, classifier.predict),
        classifier.ready_for_workers(num_workers),
        collate=_collate,
    )
    with progress_of(len(paths), "Classifying", "img", progress) as bar:
        for (batch_probs, indices, failed), _ in batches:
            if batch_probs is not None:
                probs[indices] = batch_probs
            skipped += [(paths[i], reason) for i, reason in failed]
            bar.update(len(indices) + len(failed))
    return probs, skipped


def _classify_batch(
    predict: Callable[[torch.Tensor], np.ndarray],
    batch: tuple[torch.Tensor | None, list[int], list[tuple[int, str]]],
) -> tuple[np.ndarray | None, list[int], list[tuple[int, str]]]:
    images, indices, failed = batch
    return (predict(images) if images is not None else None), indices, failed


def _without_scores(
    predict: Callable[[torch.Tensor], np.ndarray],
) -> Callable[[torch.Tensor], tuple[np.ndarray, None]]:
    return lambda images: (predict(images), None)
