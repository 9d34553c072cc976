"""LightningDataModule over an ImageFolder of Negative/ and Positive/ images."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from crack_lightning.data.check import require_clean
from crack_lightning.data.decode import DecodedImages
from crack_lightning.data.device_decode import EncodedImages, collate_encoded, decode_batch
from crack_lightning.data.download import ensure_dataset
from crack_lightning.data.feature_cache import FeatureViews, cached_features
from crack_lightning.data.grouping import check_distance, image_hashes, near_duplicate_groups
from crack_lightning.data.layout import scan_samples
from crack_lightning.data.sources import SourceSamples, balanced_sampler, load_sources
from crack_lightning.data.sources_download import ensure_sources
from crack_lightning.data.splits import grouped_split, stratified_split, write_manifest
from crack_lightning.data.synthetic import generate_dataset
from crack_lightning.data.transforms import Augmentation, augment_batch
from crack_lightning.errors import DataError

log = logging.getLogger(__name__)


class CrackDataModule(L.LightningDataModule):
    """Stratified, seeded train/val(/test) splits of ROOT/{Negative,Positive}/ images.

    Batches are uint8 image tensors (N, 3, image_size, image_size) and int labels;
    training batches are augmented on their device once there (float [0, 1] then). The
    model does the float conversion and normalisation.
    """

    def __init__(
        self,
        root: str,
        val_fraction: float,
        test_fraction: float,
        seed: int,
        image_size: int,
        batch_size: int,
        num_workers: int,
        pin_memory: bool | None,
        augmentation: Mapping | None,
        synthetic: Mapping | None,
        download: bool,
        archive: str | None,
        split: str,
        group_distance: int,
        check: bool,
        cache_features: bool | str,
        cache_views: int,
        cache_dir: str,
        decode_on_device: bool,
        on_bad_image: str,
        sources: Mapping | None = None,
        balanced_sampling: bool = False,
        holdout_source: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        # types and ranges: crack_lightning.settings.DataSettings, checked by train()
        if split == "grouped":
            check_distance(group_distance)
        self.root = Path(root)
        self.augmentation = Augmentation.from_config(augmentation)
        self.samples: list[tuple[str, int]] = []
        self.split: dict[str, list[int]] = {}
        self.features: torch.Tensor | None = None  # (views, images, dim) once cached
        # with data.sources: every sample's source (index into source_names)
        self.sources: SourceSamples | None = None
        self.datasets: list[DecodedImages] = []  # every loader's, to list skipped files
        self.reported: set[str] = set()
        self.cache_skipped: set[str] = set()  # damaged files the feature cache left out

    def prepare_data(self) -> None:
        if self.hparams.sources is not None:
            ensure_sources(self.hparams.sources)
        elif self.hparams.synthetic is not None:
            generate_dataset(self.root, **self.hparams.synthetic)
        elif self.hparams.download or self.hparams.archive is not None:
            ensure_dataset(self.root, archive=self.hparams.archive)

    def setup(self, stage: str | None = None) -> None:
        if self.split:  # splitting is deterministic; do it once per process
            return
        fractions = (self.hparams.val_fraction, self.hparams.test_fraction)
        if self.hparams.sources is not None:
            self.sources = load_sources(
                self.hparams.sources,
                *fractions,
                self.hparams.seed,
                self.hparams.check,
                self.hparams.holdout_source,
            )
            self.samples, self.split = self.sources.samples, self.sources.split
            return
        self.samples = scan_samples(self.root)
        if self.hparams.check:
            report = require_clean(self.root, self.samples)
            if report.duplicates:
                log.warning(
                    "%d groups of identical images within a class (e.g. %s); data.split=grouped "
                    "keeps each group on one side of the split",
                    len(report.duplicates),
                    " = ".join(report.duplicates[0]),
                )
        labels = [label for _, label in self.samples]
        if self.hparams.split == "grouped":
            self.split = grouped_split(labels, self.groups(), *fractions, self.hparams.seed)
        else:
            self.split = stratified_split(labels, *fractions, self.hparams.seed)

    def groups(self) -> list[int]:
        """Near-duplicate group of every sample (perceptual hash neighbours)."""
        hashes = image_hashes([path for path, _ in self.samples])
        groups = near_duplicate_groups(hashes, self.hparams.group_distance).tolist()
        sizes = Counter(groups)
        log.info(
            "Grouped split: %d images in %d groups (largest %d; %d images share a group "
            "with another) at data.group_distance=%d",
            len(groups),
            len(sizes),
            max(sizes.values()),
            sum(n for n in sizes.values() if n > 1),
            self.hparams.group_distance,
        )
        return groups

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
        )
        self.features = cache.features
        self._drop_uncached(cache.done[0])

    def _drop_uncached(self, done: torch.Tensor) -> None:
        """Leave out of every split the images the cache could not compute: damaged files
        skipped under data.on_bad_image=skip (listed at the end of the run)."""
        for name, indices in self.split.items():
            self.cache_skipped.update(self.samples[i][0] for i in indices if not done[i])
            self.split[name] = [i for i in indices if done[i]]

    def augment(self, inputs: torch.Tensor) -> torch.Tensor:
        """A training batch augmented on its device; cached features (N, dim) pass
        unchanged: their dihedral views stand in."""
        if self.augmentation.enabled and inputs.ndim == 4:
            return augment_batch(inputs, self.augmentation)
        return inputs

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With data.decode_on_device, decode the batch's files where the model runs."""
        inputs, labels = batch
        if isinstance(inputs, list):
            device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
            inputs = decode_batch(inputs, self.hparams.image_size, device)
        return inputs, labels

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment training batches once they are on their device."""
        inputs, labels = batch
        if self.trainer is not None and self.trainer.training:
            inputs = self.augment(inputs)
        return inputs, labels

    def write_manifest(self, path: Path) -> None:
        """Record which file went to which split, so a run can be audited and repeated."""
        if self.sources is not None:
            self.sources.write_manifest(path)
        else:
            write_manifest(path, self.root, self.samples, self.split)

    @property
    def has_test_split(self) -> bool:
        return bool(self.split.get("test"))

    def split_samples(self, name: str) -> list[tuple[str, int]]:
        return [self.samples[i] for i in self.split[name]]

    def split_sources(self, name: str) -> tuple[list[str], list[int]]:
        """Source names and each sample's source in split `name`, in loader order."""
        if self.sources is None:
            return [], [0] * len(self.split[name])
        return self.sources.names, [self.sources.source[i] for i in self.split[name]]

    def _train_sampler(self) -> torch.utils.data.Sampler | None:
        if not self.hparams.balanced_sampling:
            return None
        _, sources = self.split_sources("train")
        labels = [label for _, label in self.split_samples("train")]
        return balanced_sampler(labels, sources, self.hparams.seed)

    def teardown(self, stage: str) -> None:
        """List the damaged images skipped (data.on_bad_image=skip) at the end of a run."""
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

    def _dataset(self, name: str) -> tuple[Dataset, Callable | None, int]:
        """Split `name` as a dataset, its collate function and its worker count: cached
        features are in memory already (no worker processes needed); images are decoded
        by the workers, or only read there when decoding on the device."""
        if self.features is not None:
            samples = [(i, self.samples[i][1]) for i in self.split[name]]
            return FeatureViews(self.features, samples, random_view=name == "train"), None, 0
        samples = self.split_samples(name)
        workers = self.hparams.num_workers
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
