"""LightningDataModule over a data set's sources (data.root=DIR is one source)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from crack_lightning.data.decode import (
    DecodedImages,
    EncodedImages,
    OnBadImage,
    collate_encoded,
    decode_batch,
)
from crack_lightning.data.feature_cache import MAX_VIEWS, FeatureViews, cached_features
from crack_lightning.data.sources import (
    GROUP_DISTANCE,
    UNPACK_IMAGE_LIMIT,
    UNPACK_LIMIT,
    UNPACK_RATIO_LIMIT,
    SourceSpec,
    data_sources,
)
from crack_lightning.data.splits import (
    TEST_FRACTION,
    VAL_FRACTION,
    SourceSamples,
    check_fractions,
    load_sources,
    require_every_source,
    write_manifest,
)
from crack_lightning.data.transforms import Augmentation, augment_batch
from crack_lightning.errors import DataError
from crack_lightning.settings import Rule, at_least, at_most, require, within

log = logging.getLogger(__name__)

# images are resized to image_size x image_size: a batch of 32 at 1024 px already holds
# 400 MB of input and several GB of activations
IMAGE_SIZE_CEILING = at_most(1024, why="a batch of larger images does not fit in memory")
# how many times as often a source's not-crack cell is drawn (data.negative_weights)
NEGATIVE_WEIGHT = Rule("above 0", lambda factor: factor > 0)
# auto, true or false (not 1 or "yes")
AUTO = Rule("auto, true or false", lambda v: v == "auto" or isinstance(v, bool))
DOWNLOAD = Rule("auto (download when data.root is missing or empty), true or false", AUTO.ok)


class CrackDataModule(L.LightningDataModule):
    """Seeded train/val(/test) splits of the data set's sources (data.sources, or the one
    source data.root=DIR stands for), each split on its own (data/splits.py).

    Batches are uint8 image tensors (N, 3, image_size, image_size) and int labels;
    training batches are augmented on their device once there (float [0, 1] then). The
    model does the float conversion and normalisation.
    """

    settings_error = DataError

    def __init__(
        self,
        root: str,
        val_fraction: Annotated[float, VAL_FRACTION],
        test_fraction: Annotated[float, TEST_FRACTION],
        seed: int,
        image_size: Annotated[int, at_least(16), IMAGE_SIZE_CEILING],
        batch_size: Annotated[int, at_least(1)],
        num_workers: Annotated[int, at_least(0)],
        pin_memory: bool | None,
        augmentation: Mapping | None,
        synthetic: Mapping | None,
        download: Annotated[bool | str, DOWNLOAD],
        archive: str | None,
        split: Literal["random", "grouped"],
        group_distance: Annotated[int, GROUP_DISTANCE],
        check: bool,
        cache_features: Annotated[bool | str, AUTO],
        cache_views: Annotated[int, within(1, MAX_VIEWS)],
        cache_dir: str,
        decode_on_device: bool,
        on_bad_image: OnBadImage,
        unpack_limit_gib: Annotated[float, UNPACK_LIMIT],
        unpack_ratio_limit: Annotated[float, UNPACK_RATIO_LIMIT],
        unpack_image_limit_mib: Annotated[float, UNPACK_IMAGE_LIMIT],
        sources: Mapping | None,
        balanced_sampling: bool,
        holdout_source: str | None,
        negative_weights: dict[str, float] | None,
        # labels: each sample's class (the classifier); masks: each sample's crack mask
        # as well (the crack-map model, data/masks.py)
        targets: Literal["labels", "masks"],
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.augmentation = Augmentation.from_config(augmentation)
        self.samples: list[tuple[str, int]] = []
        self.split: dict[str, list[int]] = {}
        self.features: torch.Tensor | None = None  # (views, images, dim) once cached
        # with cached features: the stage whose output they are (None: pooled features)
        self.feature_stage: int | None = None
        self.sources: SourceSamples | None = None  # every sample's source, once set up
        self.datasets: list[DecodedImages] = []  # every loader's, to list skipped files
        self.reported: set[str] = set()
        self.cache_skipped: set[str] = set()  # damaged files the feature cache left out

    @staticmethod
    def check_together(settings: dict[str, Any], section: str) -> None:
        """The fractions leave images to train on; negative weights weigh cells of the
        balanced sampler and name sources of the run (a typo would weigh nothing)."""
        check_fractions(settings["val_fraction"], settings["test_fraction"], section)
        weights = settings["negative_weights"] or {}
        for name, factor in weights.items():
            require(NEGATIVE_WEIGHT, factor, f"{section}.negative_weights.{name}", DataError)
        if weights and not settings["balanced_sampling"]:
            raise DataError(
                f"{section}.negative_weights weighs cells of the balanced sampler: set "
                f"{section}.balanced_sampling=true with it, or {section}.negative_weights=null."
            )
        sources = {str(k) for k, v in (settings["sources"] or {}).items() if v is not None}
        if unknown := sorted(set(weights) - sources):
            raise DataError(
                f"{section}.negative_weights names {', '.join(unknown)}, not a source of this "
                f"run ({', '.join(sorted(sources)) or 'data.sources is not set'})."
            )

    @cached_property
    def specs(self) -> list[SourceSpec]:
        """The data set's sources, checked (on first use, not when built)."""
        hp = self.hparams
        return data_sources(hp.root, hp.sources, hp.split, hp.group_distance)

    def prepare_data(self) -> None:
        if self.hparams.synthetic is not None:
            from crack_lightning.data.synthetic import generate_dataset  # data=synthetic only

            generate_dataset(Path(self.hparams.root), **self.hparams.synthetic)
        else:
            hp = self.hparams
            ensure_sources(
                self.specs,
                hp.archive,
                hp.download,
                unpack_limit_gib=hp.unpack_limit_gib,
                unpack_ratio_limit=hp.unpack_ratio_limit,
                unpack_image_limit_mib=hp.unpack_image_limit_mib,
            )

    def setup(self, stage: str | None = None) -> None:
        if self.split:  # splitting is deterministic; do it once per process
            return
        self.sources = load_sources(
            self.specs,
            self.hparams.val_fraction,
            self.hparams.test_fraction,
            self.hparams.seed,
            self.hparams.check,
            self.hparams.holdout_source,
            by_pixels=self.hparams.targets == "masks",
        )
        self.samples, self.split = self.sources.samples, self.sources.split

    def use_feature_cache(
        self, net: torch.nn.Module, device: torch.device, stage: int | None = None
    ) -> None:
        """Serve cached backbone features instead of images (the backbone, or with `stage`
        its stages below that one, must stay frozen): cache_views views of training
        images when augmenting (feature_cache.make_view), the plain view otherwise."""
        views = self.hparams.cache_views if self.augmentation.enabled else 1
        cache = cached_features(
            net,
            [path for path, _ in self.samples],
            self.split["train"],
            self.split["val"] + self.split["test"],
            views,
            self.hparams.image_size,
            Path(self.hparams.cache_dir),
            self.hparams.batch_size,
            self.hparams.num_workers,
            device,
            self.hparams.on_bad_image,
            self.augmentation,
            stage,
            self.sources.states,
        )
        self.features, self.feature_stage = cache.features, stage
        self._drop_uncached(cache.done[0])

    def _drop_uncached(self, done: torch.Tensor) -> None:
        """Leave out of every split the images the cache could not compute: damaged files
        skipped under data.on_bad_image=skip (listed at the end of the run); a source
        left without images of a class where it is used is an error, not a quiet loss."""
        for name, indices in self.split.items():
            self.cache_skipped.update(self.samples[i][0] for i in indices if not done[i])
            self.split[name] = [i for i in indices if done[i]]
        require_every_source(self.sources, self.hparams.holdout_source, self.cache_skipped)

    def augment(self, inputs: torch.Tensor, targets: Any) -> tuple[torch.Tensor, Any]:
        """A training batch augmented on its device; masks (data.targets=masks) move with
        their images. Cached features pass unchanged, the pooled (N, dim) ones and a
        frozen stage's (N, C, H, W) activations alike: their views were augmented as
        images when cached; flipping or rotating activations would be no image's."""
        if not self.augmentation.enabled or self.features is not None:
            return inputs, targets
        if isinstance(targets, dict):
            images, masks = augment_batch(inputs, self.augmentation, targets["mask"])
            return images, targets | {"mask": masks}
        return augment_batch(inputs, self.augmentation), targets

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With data.decode_on_device, decode the batch's files where the model runs."""
        inputs, labels = batch
        if isinstance(inputs, list):
            device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
            inputs = decode_batch(inputs, self.hparams.image_size, device)
        return inputs, labels

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment training batches once they are on their device."""
        inputs, targets = batch
        if self.trainer is not None and self.trainer.training:
            return self.augment(inputs, targets)
        return inputs, targets

    def write_manifest(self, path: Path) -> None:
        """Record which file went to which split, so a run can be audited and repeated."""
        write_manifest(path, self.sources)

    @property
    def has_test_split(self) -> bool:
        return bool(self.split.get("test"))

    def split_samples(self, name: str) -> list[tuple[str, int]]:
        return [self.samples[i] for i in self.split[name]]

    def split_sources(self, name: str) -> tuple[list[str], list[int]]:
        """Source names and each sample's source in split `name`, in loader order; no
        names for a data set of one source (its metrics are the pooled ones)."""
        sources = [self.sources.source[i] for i in self.split[name]]
        return (self.sources.names if len(self.specs) > 1 else []), sources

    def _train_sampler(self) -> torch.utils.data.Sampler | None:
        if not self.hparams.balanced_sampling:
            return None
        _, sources = self.split_sources("train")
        labels = [label for _, label in self.split_samples("train")]
        wanted = self.hparams.negative_weights or {}
        names = self.sources.names
        weights = {i: float(wanted[name]) for i, name in enumerate(names) if name in wanted}
        return balanced_sampler(labels, sources, self.hparams.seed, weights)

    def teardown(self, stage: str) -> None:
        """List the damaged images skipped (data.on_bad_image=skip) at the end of a run;
        a source they left without images of a class was never really trained or
        evaluated on: an error (the checkpoints are kept)."""
        found = (path for data in self.datasets for path in data.skipped())
        skipped = sorted({*found, *self.cache_skipped})
        new = [path for path in skipped if path not in self.reported]
        if new:
            log.warning(
                "%d damaged image(s) skipped (data.on_bad_image=skip): %s",
                len(new),
                ", ".join(new),
            )
            self.reported.update(new)
            require_every_source(self.sources, self.hparams.holdout_source, skipped)

    def _dataset(self, name: str) -> tuple[Dataset, Callable | None, int]:
        """Split `name` as a dataset, its collate function and its worker count: cached
        features are in memory already (no worker processes needed), served as batches of
        Activations that say which they are; images are decoded by the workers, or only
        read there when decoding on the device."""
        if self.features is not None:
            samples = [(i, self.samples[i][1]) for i in self.split[name]]
            views = FeatureViews(self.features, samples, name == "train", self.feature_stage)
            return views, views.collate, 0
        samples = self.split_samples(name)
        workers = self.hparams.num_workers
        if self.hparams.targets == "masks":
            from crack_lightning.data.masks import MaskedImages

            specs = [self.specs[self.sources.source[i]] for i in self.split[name]]
            images = MaskedImages(
                samples, specs, self.hparams.image_size, self.hparams.on_bad_image
            )
            self.datasets.append(images)
            return images, None, workers
        if self.hparams.decode_on_device:  # on_before_batch_transfer decodes
            return EncodedImages(samples, self.hparams.image_size), collate_encoded, workers
        paths, labels = [path for path, _ in samples], [label for _, label in samples]
        images = DecodedImages(paths, labels, self.hparams.image_size, self.hparams.on_bad_image)
        self.datasets.append(images)
        return images, None, workers

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        dataset, collate, workers = self._dataset(name)
        sampler = self._train_sampler() if name == "train" else None
        pin = self.hparams.pin_memory
        pin = torch.cuda.is_available() if pin is None else pin
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=pin and self.features is None,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not self.has_test_split:
            raise DataError("No test split: set data.test_fraction > 0 to hold one out.")
        return self._loader("test", shuffle=False)


def balanced_sampler(
    labels: Sequence[int],
    sources: Sequence[int],
    seed: int,
    negative_weights: Mapping[int, float] | None = None,
) -> WeightedRandomSampler:
    """Draws (with replacement, one epoch = as many draws as images) so that every
    source x class cell is equally likely, however many images it holds; the not-crack
    cell of a source in `negative_weights` (source index -> factor) that many times as
    likely, for sources whose negatives are the hard ones (joints, board patterns)."""
    cells = list(zip(sources, labels, strict=True))
    sizes = Counter(cells)
    factor = negative_weights or {}
    weights = torch.tensor(
        [(factor.get(s, 1.0) if label == 0 else 1.0) / sizes[(s, label)] for s, label in cells],
        dtype=torch.double,
    )
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, len(cells), replacement=True, generator=generator)


def download_wanted(root: Path, download: bool | str) -> bool:
    """data.download=auto fetches only into a missing or empty root or to finish a download
    left beside it, so a folder of the user's own images is never touched."""
    if download != "auto":
        return bool(download)
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        log.info(
            "data.root=%s holds no data set: downloading the METU data set (241 MB) into "
            "it (data.download=auto; data.download=false never downloads)",
            root,
        )
        return True
    from crack_lightning.data.fetch import METU  # the name of its archive; no fetch code runs

    archive = root.with_name(root.name + METU.suffix)
    if unfinished := archive.exists() or archive.with_name(archive.name + ".part").exists():
        log.info("Finishing the download of the data set into data.root=%s", root)
    return unfinished


def ensure_sources(
    specs: Sequence[SourceSpec],
    archive: str | Path | None = None,
    download: bool | str = False,
    **bounds: float,
) -> None:
    """Fetch data.root's archive if data.archive or data.download asks, and each source's
    whose download.enabled is, under data's unpack bounds unless a source sets its own:
    the only time a training run runs data/fetch.py."""
    for spec in specs:
        if spec.shorthand:
            wanted = archive is not None or download_wanted(spec.root, download)
        else:
            wanted = bool(spec.download and spec.download.get("enabled"))
        if wanted:
            from crack_lightning.data.fetch import ensure_source

            ensure_source(spec, archive=archive if spec.shorthand else None, **bounds)
