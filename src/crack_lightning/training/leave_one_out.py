"""A crack map's adaptation to a site of a few masked photos (experiment=adapt with a
crack-map init_from and adapt.map_epochs > 0): every site photo trains, and how many
epochs and which decision threshold are chosen by leaving each photo out in turn.

Holding one of 5 photos back for validation would spend a fifth of what the inspector
masked, and one photo's score chooses badly. Instead each photo is left out once: a copy
of init_from trains on the others (and the replayed sources) for up to map_epochs epochs,
and the left-out photo is mapped after each epoch, as crack-scan-eval maps it. The epochs
and threshold with the best pixel F1 pooled over the left-out photos are then used to
train on every photo. The same left-out maps give the before -> after table: each photo
scored by init_from and by a model that never saw it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image

from crack_lightning.data.decode import load_rgb, sample_file
from crack_lightning.evaluation.before_after import PhotoScans, before_after, write_before_after
from crack_lightning.evaluation.scan_masks import MaskReader, photo_name, score_groups
from crack_lightning.inference.crack_maps import MapNetwork
from crack_lightning.inference.scan import (
    ScanResult,
    map_photo,
    output_names,
    render_figure,
    save_png,
    scan_figure,
)
from crack_lightning.training.photo_scores import source_mask, window_note

log = logging.getLogger(__name__)

# the decision thresholds the left-out photos choose among
THRESHOLDS = tuple(round(0.1 * step, 1) for step in range(1, 10))


@dataclass
class LeftOut:
    """What leaving each site photo out chose, and the figures it chose by."""

    epochs: int
    threshold: float
    pixel_f1: float | None  # pooled over the left-out photos at the choice
    before_f1: float | None  # init_from's on the same photos, at its own threshold
    table: str  # before (init_from) -> after (the chosen epochs and threshold)
    # per photo: init_from's map and the chosen epoch's map of a model trained without it
    maps: dict[Path, tuple[np.ndarray, np.ndarray]]
    photos: dict[Path, Image.Image]  # the site's photos, read once
    start_threshold: float
    spec: Any


def site_photos(datamodule: Any, site: str) -> dict[Path, list[int]]:
    """The site's photos and the indices of their tiles, in every split."""
    index = datamodule.sources.names.index(site)
    photos: dict[Path, list[int]] = defaultdict(list)
    for name in ("train", "val", "test"):
        for i in datamodule.split[name]:
            if datamodule.sources.source[i] == index:
                photos[Path(sample_file(datamodule.samples[i][0]))].append(i)
    return dict(sorted(photos.items()))


def train_on_every_photo(datamodule: Any, site: str) -> None:
    """Move the site's validation and test tiles into training (in place)."""
    tiles = {i for indices in site_photos(datamodule, site).values() for i in indices}
    for name in ("val", "test"):
        datamodule.split[name][:] = [i for i in datamodule.split[name] if i not in tiles]
    datamodule.split["train"][:] = sorted({*datamodule.split["train"], *tiles})


class MapEachEpoch(L.Callback):
    """Maps the left-out photo after every training epoch, as 8-bit P(crack) (what a scan
    writes as PHOTO_cracks.png)."""

    def __init__(self, photo: Path, min_share: float) -> None:
        self.pixels = torch.from_numpy(np.array(load_rgb(photo))).permute(2, 0, 1)
        self.min_share = min_share
        self.maps: list[np.ndarray] = []

    def record(self, net: torch.nn.Module) -> None:
        network = MapNetwork(net, next(net.parameters()).device, self.min_share)
        crack_map = network.crack_map(self.pixels)
        self.maps.append(np.round(crack_map * 255).astype(np.uint8))
        net.train()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record(pl_module.net)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Without Lightning's start-up lines (accelerator found, fit stopped) once per photo."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def leave_one_photo_out(
    datamodule: Any,
    site: str,
    new_model: Callable[[], L.LightningModule],
    epochs: int,
    start_threshold: float,
    trainer_settings: dict[str, Any],
) -> LeftOut:
    """Train a fresh copy of init_from (new_model) without each site photo in turn and map
    that photo after every epoch; choose the epochs (0..epochs) and threshold (THRESHOLDS)
    with the best pooled pixel F1. The datamodule's split is left with every site photo in
    training."""
    train_on_every_photo(datamodule, site)
    photos = site_photos(datamodule, site)
    spec = datamodule.sources.specs[datamodule.sources.names.index(site)]
    everything = list(datamodule.split["train"])
    maps: dict[Path, list[np.ndarray]] = {}
    began = time.monotonic()
    for done, (photo, tiles) in enumerate(photos.items()):
        left_out = set(tiles)
        datamodule.split["train"][:] = [i for i in everything if i not in left_out]
        model = new_model()
        recorder = MapEachEpoch(photo, float(model.hparams.min_share))
        recorder.record(model.net)  # epoch 0: init_from itself
        with quiet_lightning():
            trainer = L.Trainer(
                max_epochs=epochs,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
                num_sanity_val_steps=0,
                log_every_n_steps=1,
                callbacks=[recorder],
                **trainer_settings,
            )
            trainer.fit(model, datamodule=datamodule)
        maps[photo] = recorder.maps
        spent = time.monotonic() - began
        log.info(
            "Left out %s (%d of %d): trained on the others for %d epochs; about %.0f s to go.",
            photo.name,
            done + 1,
            len(photos),
            epochs,
            spent / (done + 1) * (len(photos) - done),  # the last fold is the final training
        )
    datamodule.split["train"][:] = everything
    return choose(maps, spec, epochs, start_threshold)


@dataclass
class FixedMap:
    """A map already made, standing where map_photo expects a network."""

    probs: np.ndarray
    min_share: float

    def crack_map(self, pixels: torch.Tensor) -> np.ndarray:
        return self.probs


def scanned(
    maps: dict[Path, np.ndarray], photos: dict[Path, Image.Image], spec: Any, threshold: float
) -> list[ScanResult]:
    """The maps as the scan loop's results at this threshold (tiles of the site's size and
    stride, each P(crack) from its map by the tile rule), named as a scan names them."""
    tiles = spec.tiles
    results = []
    for (photo, crack_map), name in zip(maps.items(), output_names(list(maps)), strict=True):
        probs = FixedMap(crack_map.astype(np.float32) / 255, tiles.min_share)
        result = map_photo(probs, photos[photo], photo, tiles.tile_size, tiles.stride, threshold)
        result.name = name
        results.append(result)
    return results


def scored(
    maps: dict[Path, np.ndarray],
    photos: dict[Path, Image.Image],
    spec: Any,
    threshold: float,
    mask_of: MaskReader,
) -> dict[str, Any]:
    """The photos' pooled scores at this threshold (pixels within the usual tolerance):
    crack-scan-eval's figures of these maps."""
    results = scanned(maps, photos, spec, threshold)
    groups = [(spec.name, list(maps))]
    return score_groups(groups, results, spec.tiles.min_share, mask_of)[1][0]


def photo_scans(
    maps: dict[Path, np.ndarray],
    photos: dict[Path, Image.Image],
    spec: Any,
    threshold: float,
    model: str,
    out: Path,
) -> PhotoScans:
    """The maps scored per photo and pooled, each photo's figure saved in `out` as the
    scan loop saves it: one side of the before/after page."""
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    results = scanned(maps, photos, spec, threshold)
    for result in results:
        figures[f"{spec.name}/{photo_name(result)}"] = figure = scan_figure(out, result.name)
        save_png(render_figure(result, photos[result.path]), figure)
    groups = [(spec.name, list(maps))]
    report, rows = score_groups(groups, results, spec.tiles.min_share, source_mask(spec))
    return PhotoScans(
        model,
        threshold,
        rows,
        {f"{spec.name}/{name}": scores for name, scores in report.items()},
        figures,
        {spec.name: window_note(spec)},
    )


def choose(
    maps: dict[Path, list[np.ndarray]], spec: Any, epochs: int, start_threshold: float
) -> LeftOut:
    """The epochs and threshold with the best pooled pixel F1 (ties: fewer epochs, then the
    threshold nearest 0.5), and the before -> after table at that choice. Epoch 0 is
    init_from itself: where no training beats it, the site keeps its weights."""
    photos = {photo: load_rgb(photo) for photo in maps}
    mask_of = functools.cache(source_mask(spec))  # each mask read once for every choice

    def at(epoch: int, threshold: float) -> dict[str, Any]:
        found = {p: epoch_maps[epoch] for p, epoch_maps in maps.items()}
        return scored(found, photos, spec, threshold, mask_of)

    f1 = {(e, t): at(e, t)["pixel_f1"] or 0.0 for e in range(epochs + 1) for t in THRESHOLDS}
    epoch, threshold = max(f1, key=lambda c: (f1[c], -c[0], -abs(c[1] - 0.5)))
    before, after = at(0, start_threshold), at(epoch, threshold)
    return LeftOut(
        epoch,
        threshold,
        f1[epoch, threshold],
        before["pixel_f1"],
        before_after([before], [after]),
        {p: (found[0], found[epoch]) for p, found in maps.items()},
        photos,
        start_threshold,
        spec,
    )


def write_page(choice: LeftOut, start: str, out: Path, page: Path) -> Path:
    """The before/after page of the left-out photos: init_from's overlays beside those of
    the models trained without each photo (figures in out/before and out/after)."""
    sides = []
    for side, model, threshold in (
        (0, start, choice.start_threshold),
        (1, f"a model trained {choice.epochs} epoch(s) without the photo", choice.threshold),
    ):
        maps = {photo: pair[side] for photo, pair in choice.maps.items()}
        folder = out / ("before", "after")[side]
        sides.append(photo_scans(maps, choice.photos, choice.spec, threshold, model, folder))
    note = "the site's photos, each left out in turn: every one trains the adapted model"
    return write_before_after(page, sides[0], sides[1], note)
