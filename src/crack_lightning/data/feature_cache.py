"""Pooled features of a frozen backbone, computed once per image and view, kept on disk.

With the backbone frozen, every epoch would push each image through the same network
again; only the head learns. So the features are computed once and the head trains on
them. Augmentation is kept by caching several views of each training image and drawing
one per image per epoch: the dihedral views (the flips and 90-degree rotations, which
suit cracks: they have no natural orientation), or, with photometric augmentation on
(scale, colour, blur, noise, JPEG), random draws of the whole augmentation on top of
them. Validation and test images use the plain view only.

Fine-tuning the top stages of a backbone from the first epoch (models/finetuning.py,
`cached_stage`) caches, in the same way, the output of the frozen stages below them
instead of pooled features: each epoch then runs only the stages that train.

One cache file serves a data set, backbone weights, image size, number of views and
augmentation; it fills lazily, so another split, seed or learning rate reuses what is
there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, default_collate

from crack_lightning.data.decode import DECODE_VERSION, DecodedImages, sample_file
from crack_lightning.data.transforms import Augmentation, augment_batch
from crack_lightning.data.workers import (
    any_failed,
    compute_in_workers,
    cpu_group,
    first_on_host,
    forward_rate,
    group_ranks,
    run_batches,
    share,
)
from crack_lightning.errors import DamagedImage, DataError, ModelConfigError
from crack_lightning.io import save_torch
from crack_lightning.models.network import Activations
from crack_lightning.progress import progress

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
# the most augmented views of each training image data.cache_views may cache
MAX_VIEWS = 8
# seconds between saves of a running fill: what a killed fill loses at most
SAVE_EVERY_S = 60.0


def cache_wanted(
    setting: bool | str, frozen: bool, finetuning: bool, quick: bool, top_only: bool = False
) -> bool:
    """data.cache_features: `auto` caches whenever the backbone stays frozen, or only its
    top stages train from the first epoch (`top_only`: the frozen stages' output is cached
    then), since most of the time of a run is otherwise the same forward passes again each
    epoch; except in a quick check run (fast_dev_run: a few batches, where a fill would
    cost a whole pass). true insists."""
    cacheable = frozen and (not finetuning or top_only)
    if setting is True and not cacheable:
        raise ModelConfigError(
            "data.cache_features=true needs a backbone that stays frozen "
            "(model.freeze_backbone=true, callbacks.finetune=null), or fine-tuning of a "
            "number of top stages from the first epoch (callbacks.finetune.epoch=0, "
            "callbacks.finetune.blocks=N) on a backbone built of stages (MobileNets, "
            "EfficientNet, ConvNeXt): features of layers that train change every step. "
            "data.cache_features=auto caches only when it can."
        )
    return cacheable and not quick if setting == "auto" else bool(setting)


def apply_view(images: torch.Tensor, view: int) -> torch.Tensor:
    """View 0 is the image itself; 1-3 rotate by 90/180/270 degrees; 4-7 mirror first."""
    if view >= 4:
        images = images.flip(-1)
    return torch.rot90(images, view % 4, dims=(-2, -1))


def make_view(images: torch.Tensor, view: int, augmentation: Augmentation | None) -> torch.Tensor:
    """View 0 is the image itself. Other views are dihedral (apply_view) and, with
    photometric augmentation, a random draw of the whole augmentation on top."""
    if view == 0:
        return images
    images = apply_view(images, view)
    if augmentation is not None and augmentation.photometric:
        images = augment_batch(images, augmentation)
    return images


def cache_key(
    backbone: torch.nn.Module,
    files: Sequence[str],
    image_size: int,
    views: int,
    augmentation: Augmentation | None = None,
    stage: int | None = None,
    states: dict[str, tuple[int, int]] | None = None,
) -> str:
    """Changes whenever the weights, image size, view count, photometric augmentation,
    the stage cached or any file (path, size, mtime) do. A file's (size, mtime_ns) is
    taken from `states` (the run's listing of its sources), else stat'ed."""
    digest = hashlib.sha256()
    settings = {
        "version": FORMAT_VERSION,
        "decode": DECODE_VERSION,
        "image_size": image_size,
        "views": views,
        "backbone": type(backbone).__name__,
    }
    if stage is not None:
        settings["stage"] = stage
    if augmentation is not None and augmentation.photometric and views > 1:
        settings["augmentation"] = asdict(augmentation)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for path in files:  # a tile's string names its box; its photo's state counts
        file = sample_file(path)
        if states is not None and file in states:
            state = "{}\0{}".format(*states[file])
        else:
            try:
                stat = os.stat(file)
                state = f"{stat.st_size}\0{stat.st_mtime_ns}"
            except OSError as err:  # missing, a broken link: the fill skips or stops on it
                state = f"unreadable {err.errno}"
        digest.update(f"{path}\0{state}\n".encode())
    return digest.hexdigest()[:24]


class FeatureCache:
    """features[view, image] (pooled features, or stage outputs) for one data set; `done`
    marks what has been computed.

    The file is written to a temporary name unique to the writer and renamed over the
    cache, so concurrent runs never trip over each other's files and a reader sees a whole
    file or none. The fill saves every SAVE_EVERY_S seconds, so a killed fill resumes
    where it was. A damaged file (truncated, empty, of another shape) is reported by its
    path and computed again.
    """

    def __init__(self, path: Path, count: int, views: int, shape: Sequence[int]) -> None:
        self.path = path
        self.features = torch.zeros(views, count, *shape, dtype=torch.float16)
        self.done = torch.zeros(views, count, dtype=torch.bool)
        stored = self._read()
        if stored is not None:
            self.features, self.done = stored

    def _read(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored (features, done), or None when there is no usable file."""
        if not self.path.is_file():
            return None
        try:
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
            features, done = stored["features"], stored["done"]
        except Exception as err:  # torch raises many types for truncated or foreign files
            log.warning("Feature cache %s is damaged (%s); computing it again", self.path, err)
            return None
        if features.shape != self.features.shape or done.shape != self.done.shape:
            log.warning(
                "Feature cache %s holds %s features where %s were expected; computing it again",
                self.path,
                tuple(features.shape),
                tuple(self.features.shape),
            )
            return None
        return features, done.bool()

    def fill(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        files: Sequence[str],
        needed: torch.Tensor,
        image_size: int,
        batch_size: int,
        num_workers: int,
        device: torch.device,
        on_bad: str,
        augmentation: Augmentation | None = None,
    ) -> None:
        """Compute (`encode`: images -> what is cached) every (view, image) that `needed`
        asks for and is not done; save as it goes and at the end. A damaged image stops
        the fill (on_bad=stop) or stays not done (skip), for the data module to leave out."""
        missing = needed & ~self.done
        todo = torch.nonzero(missing.any(dim=0)).flatten().tolist()
        if not todo:
            return
        images = DecodedImages([files[i] for i in todo], todo, image_size, on_bad)
        in_workers = compute_in_workers(device, num_workers)
        if in_workers:  # fold the backbone once, before the workers fork
            with torch.inference_mode():
                encode(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=device))
        compute = partial(_encode_views, encode, missing, device, augmentation)
        last_save = began = time.monotonic()
        seconds: list[float] = []
        # the loader draws from the global RNG: keep a run's randomness (shuffling, dropout)
        # the same whether or not the cache had to be filled
        with (
            torch.random.fork_rng(devices=[]),
            progress(int(missing.sum()), "Caching backbone features") as bar,
            _saved_on_interrupt(self),
        ):
            try:
                for (indices, views), spent in run_batches(
                    images, batch_size, num_workers, compute, in_workers
                ):
                    seconds.append(spent)
                    for view, feats in enumerate(views):
                        if feats is not None:
                            rows = indices[missing[view, indices]]
                            self.features[view, rows] = feats
                            self.done[view, rows] = True
                            bar.update(len(rows))
                    if time.monotonic() - last_save >= SAVE_EVERY_S:
                        self.save()
                        last_save = time.monotonic()
            except DamagedImage:
                # under skip the loader gives up only when every image left is damaged
                # (a second run on a cache that holds all but those): they stay not done
                if on_bad != "skip":
                    raise
        computed = int((missing & self.done).sum())
        elapsed = time.monotonic() - began
        if computed:  # none when every image left was damaged (on_bad=skip)
            forward = forward_rate(computed, seconds, in_workers, num_workers)
            log.info(
                "Feature cache filled: %d image views in %.1f s, %.1f/s; the backbone's forward "
                "pass alone (timed per batch in this fill) %.1f/s: %.2f of it",
                computed,
                elapsed,
                computed / elapsed,
                forward,
                computed / elapsed / forward,
            )
        self.save()

    def save(self) -> None:
        """Merge in what another run saved meanwhile, write to a temporary file of our own
        next to the cache, and rename it over the cache (io.save_torch)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stored = self._read()
        if stored is not None:
            theirs = stored[1] & ~self.done
            self.features[theirs] = stored[0][theirs]
            self.done |= theirs
        # other ranks may be writing the same cache: leave their temp files alone
        save_torch({"features": self.features, "done": self.done}, self.path, False)


@contextmanager
def _saved_on_interrupt(cache: FeatureCache) -> Iterator[None]:
    """Ctrl-C during a fill keeps what was computed (SIGKILL loses at most SAVE_EVERY_S)."""
    try:
        yield
    except KeyboardInterrupt:
        cache.save()
        raise


def _encode_views(
    encode: Callable[[torch.Tensor], torch.Tensor],
    missing: torch.Tensor,
    device: torch.device,
    augmentation: Augmentation | None,
    batch: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(the batch's image indices, float16 features of the rows of each view still
    missing, None for a view with none), on the CPU: a fill's work on one batch, run
    where data/workers.py says."""
    images, indices = batch
    images = images.to(device)
    out: list[torch.Tensor | None] = []
    for view in range(missing.shape[0]):
        rows = missing[view, indices]
        if not rows.any():
            out.append(None)
            continue
        chosen = images if rows.all() else images[rows.to(images.device)]
        feats = encode(make_view(chosen, view, augmentation))
        out.append(feats.to("cpu", torch.float16))
    return indices, out


class FeatureViews(Dataset):
    """(features, label) of some images; with several views, a random one per draw, so
    each epoch sees each image under one randomly chosen view. Its batches (collate)
    say what they hold: the output of backbone.features[:stage], or pooled features
    when `stage` is None."""

    def __init__(
        self,
        features: torch.Tensor,
        samples: Sequence[tuple[int, int]],
        random_view: bool,
        stage: int | None,
    ) -> None:
        self.features = features  # (views, all images, dim)
        self.samples = samples  # (index into the cache, label)
        self.random_view = random_view and features.shape[0] > 1
        self.stage = stage

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index, label = self.samples[i]
        view = int(torch.randint(self.features.shape[0], ())) if self.random_view else 0
        return self.features[view, index].float(), label

    def collate(self, items: list[tuple[torch.Tensor, int]]) -> tuple[Activations, torch.Tensor]:
        values, labels = default_collate(items)
        return Activations(values, self.stage), labels


def cached_features(
    net: torch.nn.Module,
    files: Sequence[str],
    train_indices: Sequence[int],
    eval_indices: Sequence[int],
    views: int,
    image_size: int,
    cache_dir: Path,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    on_bad: str,  # data.on_bad_image
    augmentation: Augmentation | None = None,
    stage: int | None = None,
    states: dict[str, tuple[int, int]] | None = None,
) -> FeatureCache:
    """Load or complete the cache: every view of training images, the plain view of the
    rest; pooled features, or with `stage` the output of backbone.features[:stage].
    `states` are the files' (size, mtime_ns) from the run's listing (cache_key)."""
    key = cache_key(net.backbone, files, image_size, views, augmentation, stage, states)
    path = cache_dir / f"features_{key}.pt"
    net = net.to(device).eval()
    if stage is None:
        encode, shape = net.features, (net.head[-1].in_features,)
    else:
        encode = partial(net.stage_output, stage=stage)
        probe = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=device)
        shape = tuple(encode(probe).shape[1:])
    cache = FeatureCache(path, len(files), views, shape)
    journals = _merge_journals(cache)  # a killed sharded fill's work
    needed = torch.zeros(views, len(files), dtype=torch.bool)
    needed[:, list(train_indices)] = True
    needed[0, list(eval_indices)] = True
    reused = int((needed & cache.done).sum())
    log.info(
        "Feature cache %s: %d of %d image views already computed", path, reused, int(needed.sum())
    )
    fill = partial(
        cache.fill,
        encode,
        files,
        image_size=image_size,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        on_bad=on_bad,
        augmentation=augmentation,
    )
    if group_ranks()[1] > 1:
        fill_in_shares(cache, fill, needed, batch_size, journals)
    else:
        fill(needed=needed)
        if journals:  # kept in the cache file now
            cache.save()
            _remove(journals)
    return cache


def fill_in_shares(
    cache: FeatureCache,
    fill: Callable[..., None],
    needed: torch.Tensor,
    batch_size: int,
    journals: Sequence[Path] = (),
) -> None:
    """The fill shared out among the processes of a DDP group: each computes its share
    (data/workers.py) of what is missing everywhere, the shares are summed across the
    processes (each entry comes from one, zeros from the others: exact), and the
    lowest rank on each machine saves the complete cache, so the folder need not be
    shared between machines.

    While filling, a process saves to its own journal beside the cache
    (features_KEY.pt.rank<R>), never to the cache itself: two processes merging into one
    file at once could each overwrite what the other had just saved. A killed fill's
    journals (`journals`, merged into `cache` already) go once the complete cache is
    saved.
    """
    rank, world = group_ranks()
    group = cpu_group()
    everywhere = cache.done.to(torch.uint8)
    dist.all_reduce(everywhere, op=dist.ReduceOp.MIN, group=group)
    missing = needed & ~everywhere.bool()
    todo = torch.nonzero(missing.any(dim=0)).flatten()
    mine = torch.zeros_like(missing)
    columns = todo[share(len(todo), batch_size, rank, world)]
    mine[:, columns] = missing[:, columns]
    log.info(
        "Feature cache: process %d of %d computes %d of the %d image views missing",
        rank,
        world,
        int(mine.sum()),
        int(missing.sum()),
    )
    error: BaseException | None = None
    try:
        with _saving_to(cache, _journal(cache.path, rank)):
            fill(needed=mine)
    except Exception as err:  # the others must hear of it before they wait for this rank
        error = err
    if any_failed(error is not None, group):
        if error is not None:
            raise error
        raise DataError(
            "Another process stopped while filling the feature cache (see its log); "
            "the shares the others finished are kept for the next run."
        )
    _exchange(cache, mine, everywhere.bool(), todo, group)
    if first_on_host(group):
        cache.save()
    any_failed(False, group)  # the complete cache is saved: the journals may go
    _remove([*journals, _journal(cache.path, rank)])


def _journal(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.name}.rank{rank}")


def _exchange(
    cache: FeatureCache,
    mine: torch.Tensor,
    everywhere: torch.Tensor,
    todo: torch.Tensor,
    group: dist.ProcessGroup | None,
    chunk: int = 1024,
) -> None:
    """Every process's computed entries into every process's cache, `chunk` images at a
    time (a copy of the whole cache could be gigabytes for stage outputs)."""
    for start in range(0, len(todo), chunk):
        columns = todo[start : start + chunk]
        ours = cache.done[:, columns] & mine[:, columns]
        features = cache.features[:, columns]
        features[~ours] = 0
        dist.all_reduce(features, op=dist.ReduceOp.SUM, group=group)
        computed = ours.to(torch.uint8)
        dist.all_reduce(computed, op=dist.ReduceOp.MAX, group=group)
        computed = computed.bool()
        block = cache.features[:, columns]
        block[computed] = features[computed]
        cache.features[:, columns] = block
        cache.done[:, columns] = everywhere[:, columns] | computed


def _merge_journals(cache: FeatureCache) -> list[Path]:
    """Merge into `cache` what the journals of a killed sharded fill (any number of
    processes) hold and it lacks; returns their paths."""
    journals = sorted(cache.path.parent.glob(f"{cache.path.name}.rank*"))
    for path in journals:
        other = FeatureCache(
            path, cache.done.shape[1], cache.done.shape[0], cache.features.shape[2:]
        )
        theirs = other.done & ~cache.done
        cache.features[theirs] = other.features[theirs]
        cache.done |= theirs
    return journals


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


@contextmanager
def _saving_to(cache: FeatureCache, path: Path) -> Iterator[None]:
    """The fill's saves go to `path` meanwhile (a journal only this process writes)."""
    cache.path, target = path, cache.path
    try:
        yield
    finally:
        cache.path = target
