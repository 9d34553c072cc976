"""LightningDataModule over an ImageFolder of Negative/ and Positive/ images."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import default_loader

from crack_lightning.errors import DataError
from crack_lightning.layout import scan_samples
from crack_lightning.splits import check_fractions, stratified_split, write_manifest
from crack_lightning.synthetic import generate_dataset
from crack_lightning.transforms import Augmentation, eval_transform, train_transform


class ImageList(Dataset):
    """(path, label) pairs read with PIL and passed through one transform."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(default_loader(path)), label


class CrackDataModule(L.LightningDataModule):
    """Stratified, seeded train/val(/test) splits of ROOT/{Negative,Positive}/ images.

    Batches are uint8 image tensors (N, 3, image_size, image_size) and int labels;
    the model does the float conversion and normalisation.
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        check_fractions(val_fraction, test_fraction)
        for name, value, low in (
            ("image_size", image_size, 16),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if int(value) != value or value < low:
                raise DataError(f"data.{name}={value} must be an integer >= {low}.")
        self.root = Path(root)
        self.augmentation = Augmentation.from_config(augmentation)
        self.samples: list[tuple[str, int]] = []
        self.split: dict[str, list[int]] = {}

    def prepare_data(self) -> None:
        if self.hparams.synthetic is not None:
            generate_dataset(self.root, **self.hparams.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.split:  # splitting is deterministic; do it once per process
            return
        self.samples = scan_samples(self.root)
        labels = [label for _, label in self.samples]
        self.split = stratified_split(
            labels, self.hparams.val_fraction, self.hparams.test_fraction, self.hparams.seed
        )

    def write_manifest(self, path: Path) -> None:
        """Record which file went to which split, so a run can be audited and repeated."""
        write_manifest(path, self.root, self.samples, self.split)

    @property
    def has_test_split(self) -> bool:
        return bool(self.split.get("test"))

    def split_samples(self, name: str) -> list[tuple[str, int]]:
        return [self.samples[i] for i in self.split[name]]

    def _loader(self, name: str, transform: Callable, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        pin = self.hparams.pin_memory
        return DataLoader(
            ImageList(self.split_samples(name), transform),
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=torch.cuda.is_available() if pin is None else pin,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        size = self.hparams.image_size
        return self._loader("train", train_transform(size, self.augmentation), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", eval_transform(self.hparams.image_size), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not self.has_test_split:
            raise DataError("No test split: set data.test_fraction > 0 to hold one out.")
        return self._loader("test", eval_transform(self.hparams.image_size), shuffle=False)
