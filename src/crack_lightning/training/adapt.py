"""Adapting a trained model to a new site (experiment=adapt; docs/generalization.md,
"Adapting to a new site").

`init_from=CKPT` starts training from a checkpoint's weights instead of ImageNet's. With
the site source (`data.sources.<adapt.site>`) the run also: labels the site as a masks
source (photos with PHOTO_mask.png), as a folder source when it holds Positive/ and
Negative/ folders of tiles, or as both (the crops as the source SITE_crops) when it holds
masked photos beside those folders; replays `adapt.replay` of the training images of
the sources the checkpoint was trained on, with their own split (the checkpoint's seed
and fractions), so they do not regress; and with `adapt.bn_stats` re-estimates the
backbone's BatchNorm statistics on the site's tiles (unlabelled adaptation) before
fine-tuning. Fine-tuning, checkpoint choice and the new threshold are the ordinary
training's (experiment=adapt takes experiment=generalize's recipe).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader

from crack_lightning.data.decode import DecodedImages
from crack_lightning.data.sources import MASKS_KIND, ROOT_SOURCE, inside
from crack_lightning.errors import ConfigError, DataError
from crack_lightning.evaluation.threshold import decision_threshold, stored_threshold
from crack_lightning.inference.classifiers import DATA_HPARAMS_KEY
from crack_lightning.models.crack_map import MAP_HPARAM
from crack_lightning.settings import CLASS_NAMES, Rule, at_least, settings_of, within

if TYPE_CHECKING:
    from crack_lightning.models.classifier import CrackClassifier

log = logging.getLogger(__name__)

INIT_FILES = "Use a training run's checkpoints/best.ckpt (a .ckpt train.py wrote)."
# what a crack-map adaptation builds, and the classifier's callbacks it leaves out
SEGMENTER_TARGET = "crack_lightning.models.segmenter.CrackSegmenter"
MAP_UNUSED_CALLBACKS = (
    "finetune",
    "validation_figures",
    "validation_mistakes",
    "source_metrics",
    "feature_stats",
)
# the data settings of the checkpoint's run that fix its sources' split
SPLIT_SETTINGS = ("seed", "val_fraction", "test_fraction")
# a site of Positive/ and Negative/ folders of labelled crops (a folder source)
FOLDER_KIND = "folder"
# a site that also holds masked photos: its crops are the source SITE_crops
CROPS_SUFFIX = "_crops"


@dataclass(frozen=True)
class AdaptSettings:
    """adapt.* (conf/train.yaml, conf/experiment/adapt.yaml): adapting an init_from
    checkpoint to a site."""

    settings_error = ConfigError
    site: str
    replay: Annotated[
        float,
        Rule(
            "a share in [0, 1] of the original training images (0: replay nothing)",
            lambda share: 0 <= share <= 1,
        ),
    ]
    bn_stats: bool
    map_epochs: Annotated[int, at_least(0)]
    map_encoder_blocks: Annotated[int, within(0, 19, "of MobileNetV2's 19 blocks")]
    folder_site: dict[str, Any] | None = None  # the site as class folders, when it is


@dataclass
class Start:
    """A checkpoint to start from, and what the adaptation adds (site, replayed sources)."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    hparams: dict[str, Any]
    settings: AdaptSettings
    site: str | None = None  # the site source's name; None: weights only
    replayed: list[str] = field(default_factory=list)
    threshold: float | None = None  # the checkpoint's stored decision threshold
    masked_site: bool = False  # the site holds photos with masks (a masks source)

    @property
    def leaves_photos_out(self) -> bool:
        """A crack map adapting to a masks site chooses by leaving each photo out."""
        return self.masked_site and MAP_HPARAM in self.hparams and self.settings.map_epochs > 0


def prepare_start(cfg: DictConfig) -> Start:
    """Read init_from and, with a site source, set data.sources to the
    site plus the checkpoint's replayed sources and data's split settings and image size to
    the checkpoint's, in cfg, before anything is built. Errors name the setting."""
    from crack_lightning.inference.classifiers import read_training_checkpoint  # init_from only

    settings = settings_of(cfg.adapt, AdaptSettings, "adapt")
    path = Path(cfg.init_from)
    checkpoint, hparams = read_training_checkpoint(path, "init_from", ConfigError, INIT_FILES)
    start = Start(path, checkpoint["state_dict"], hparams, settings)
    start.threshold = stored_threshold(checkpoint)
    if MAP_HPARAM in hparams:
        use_map_recipe(cfg, hparams, settings)
    check_backbone(start, cfg.model)
    with open_dict(cfg):
        cfg.data.image_size = int(hparams["image_size"])
    sources = cfg.data.get("sources") or {}
    if sources.get(settings.site) is None:
        log.info("init_from=%s: training starts from its weights (no site source).", path)
        return start
    start.site = settings.site
    data = checkpoint.get(DATA_HPARAMS_KEY) or {}
    with open_dict(cfg):
        for name in SPLIT_SETTINGS:  # before the site is checked against the fractions
            if data.get(name) is not None:
                cfg.data[name] = data[name]
        site = site_sources(cfg, settings)
        start.masked_site = site[settings.site].get("kind") == MASKS_KIND
        replayed = replay_sources(data, sources, cfg, settings, site) if settings.replay > 0 else {}
        cfg.data.sources = {**replayed, **site}
    start.replayed = list(replayed)
    log.info(
        "Adapting %s to the site %s (%s), replaying %.0f%% of the training images of %s "
        "(split with the checkpoint's seed and fractions).",
        path,
        cfg.data.sources[settings.site].root,
        " and ".join(site),
        100 * settings.replay,
        ", ".join(replayed) or "no source",
    )
    return start


def use_map_recipe(cfg: DictConfig, hparams: Mapping[str, Any], settings: AdaptSettings) -> None:
    """A crack-map checkpoint adapts as a crack map: its own model settings, mask targets,
    the site's photos as crops of the model's input size at their own scale, and the
    checkpoint chosen by validation pixel F1; the classifier's fine-tuning schedule,
    figures and thresholds (which read class probabilities) are left out."""
    if settings.bn_stats:
        raise ConfigError(
            "adapt.bn_stats=true re-estimates a classifier backbone's statistics; a crack-map "
            "model keeps its encoder's: set adapt.bn_stats=false."
        )
    site, size = settings.site, int(hparams["image_size"])
    with open_dict(cfg):
        cfg.model = OmegaConf.merge({"_target_": SEGMENTER_TARGET, "_recursive_": False}, hparams)
        cfg.model.train_encoder_blocks = settings.map_encoder_blocks
        cfg.data.targets = "masks"
        cfg.data.cache_features = False
        sources = cfg.data.get("sources") or {}
        if sources.get(site) is not None:
            cfg.data.sources[site].tile_size = size
            cfg.data.sources[site].stride = size // 2
            cfg.data.sources[site].ambiguous = None
        for name in MAP_UNUSED_CALLBACKS:
            if name in cfg.callbacks:
                cfg.callbacks[name] = None
        cfg.optimized_metric = "val/pixel_f1"
        for name in ("model_checkpoint", "early_stopping"):  # unless told to watch nothing
            if cfg.callbacks.get(name) is not None and cfg.callbacks[name].monitor is not None:
                cfg.callbacks[name].monitor, cfg.callbacks[name].mode = "val/pixel_f1", "max"
    log.info("init_from holds a crack-map model: adapting it as one (mask targets, %d px).", size)


def check_backbone(start: Start, model: DictConfig) -> None:
    """The configured model must be the checkpoint's architecture, said before building it."""
    stored = (start.hparams.get("backbone"), start.hparams.get("name"))
    wanted = (model.get("backbone"), model.get("name"))
    if stored != wanted:
        raise ConfigError(
            f"init_from={start.path} holds a {'/'.join(filter(None, map(str, stored)))} model, "
            f"but model.backbone is {'/'.join(filter(None, map(str, wanted)))}: choose the "
            f"model it was trained with (e.g. model=mobilenetv2)."
        )


@dataclass(frozen=True)
class SiteContents:
    """A site folder as one listing shows it: its Positive/ and Negative/ folders (names as
    on disk, any letter case) and its photos outside them, the masked photos (data/masks.py's
    finder: masks are not photos)."""

    class_folders: list[str]
    photos: list[str]

    @property
    def kinds(self) -> tuple[str, ...]:
        """(MASKS_KIND,) photos with masks; (FOLDER_KIND,) Positive/ and Negative/ folders
        of labelled crops (e.g. an inspector's marks); both where masked photos lie beside
        those folders."""
        if len(self.class_folders) < len(CLASS_NAMES):
            return (MASKS_KIND,)
        return (MASKS_KIND, FOLDER_KIND) if self.photos else (FOLDER_KIND,)


def site_contents(root: Path, where: str) -> SiteContents:
    """What the site holds; a DataError naming the setting when root is not a folder or
    holds no images."""
    if not root.is_dir():
        raise DataError(
            f"{where}.root={root} is not a folder: point it at the site's photos (each "
            f"with PHOTO_mask.png beside it) or at Positive/ and Negative/ folders of tiles."
        )
    from crack_lightning.data.masks import photos_in

    if not (photos := photos_in(root)):
        raise DataError(
            f"{where}.root={root} holds no photos: put the site's photos there with "
            f"PHOTO_mask.png beside each (white = crack), or Positive/ and Negative/ "
            f"folders of labelled tiles."
        )
    wanted = {name.lower() for name in CLASS_NAMES}
    names = sorted(c.name for c in root.iterdir() if c.is_dir() and c.name.lower() in wanted)
    folders = [os.path.realpath(root / name) for name in names]
    outside = [p for p in photos if not any(inside(os.path.realpath(p), f) for f in folders)]
    return SiteContents(names, outside)


def site_sources(cfg: DictConfig, settings: AdaptSettings) -> dict[str, dict[str, Any]]:
    """The site's data.sources entries: the masks source as configured, the folder
    source adapt.folder_site (conf/data/sources/folder.yaml) at the site's root, or both
    (the crops as `SITE_crops`, which the masks source then does not read), each checked
    against the fewest images its split needs."""
    where = f"data.sources.{settings.site}"
    entry = OmegaConf.to_container(cfg.data.sources[settings.site], resolve=True)
    root = Path(entry["root"])
    contents = site_contents(root, where)
    kinds = contents.kinds
    check_site_size(root, contents, cfg.data, where)
    if kinds == (MASKS_KIND,):
        return {settings.site: entry}
    folder = cfg.adapt.get("folder_site")
    if folder is None:
        raise ConfigError(
            f"{where}.root holds Positive/ and Negative/ folders but adapt.folder_site is "
            f"not set: use experiment=adapt (it sets it from conf/data/sources/folder.yaml)."
        )
    crops = {**OmegaConf.to_container(folder, resolve=True), "root": entry["root"]}
    if kinds == (FOLDER_KIND,):
        log.info("%s.root holds Positive/ and Negative/: read as labelled tiles.", where)
        return {settings.site: crops}
    log.info(
        "%s.root holds masked photos and Positive/ and Negative/ folders of crops: the "
        "photos are the source %s, the crops %s%s.",
        where,
        settings.site,
        settings.site,
        CROPS_SUFFIX,
    )
    masks = {**entry, "exclude": contents.class_folders}
    return {settings.site: masks, f"{settings.site}{CROPS_SUFFIX}": crops}


def check_site_size(root: Path, contents: SiteContents, data: DictConfig, where: str) -> None:
    """Each kind of labelled image in the site is split on its own: its crops need
    min_class_images of each class, its masked photos one for each split in use. One
    DataError stating the minimum of each kind the site holds, when one falls short."""
    from crack_lightning.data.sources import image_files
    from crack_lightning.data.splits import min_class_images

    val, test = float(data.val_fraction), float(data.test_fraction)
    needs, short = [], False
    if FOLDER_KIND in contents.kinds:
        need = min_class_images(val, test)
        have = dict.fromkeys(CLASS_NAMES, 0)
        for name in contents.class_folders:
            label = next(label for label in CLASS_NAMES if label.lower() == name.lower())
            have[label] += len(image_files(root / name))
        short |= min(have.values()) < need
        counts = ", ".join(f"{n} {label}" for label, n in have.items())
        needs.append(f"at least {need} crops of each class in Positive/ and Negative/ ({counts})")
    if MASKS_KIND in contents.kinds:
        splits = 3 if test > 0 else 2
        photos = len(contents.photos)
        short |= photos < splits
        needs.append(f"at least {splits} masked photos, one for each split ({photos})")
    if short:
        raise DataError(
            f"{where}.root={root} holds too few labelled images to adapt from: each kind is "
            f"split on its own (data.val_fraction={val}, data.test_fraction={test}), so it "
            f"needs {' and '.join(needs)}. Add images, or lower the fractions."
        )


def replay_sources(
    data: Mapping[str, Any],
    configured: Mapping,
    cfg: DictConfig,
    settings: AdaptSettings,
    site: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """The checkpoint's training sources as data.sources entries, less those at the
    site's folder (an adapted model adapted again: the site is trained on as it is now).
    A stored root that is gone (the checkpoint came from another machine) is taken from
    the configured source of that name (experiment=adapt: generalize's, under
    paths.data_dir)."""
    if data.get("sources"):
        stored = {str(name): dict(entry) for name, entry in data["sources"].items() if entry}
    elif data.get("root") is not None and data.get("synthetic") is None:
        folder = OmegaConf.to_container(cfg.adapt.folder_site, resolve=True)
        stored = {ROOT_SOURCE: {**folder, "root": data["root"], "split": data.get("split")}}
    else:
        stored = {}
    if not stored:
        log.warning("init_from holds no training sources to replay (data=synthetic?).")
    replayed = {}
    site_roots = {os.path.realpath(entry["root"]) for entry in site.values()}
    for name, entry in stored.items():
        if os.path.realpath(entry["root"]) in site_roots:
            log.info("adapt.replay: %s read the site's folder, which is not replayed.", name)
            continue
        if not Path(entry["root"]).is_dir():
            fallback = configured.get(name)
            if fallback is None or not Path(fallback.root).is_dir():
                raise DataError(
                    f"adapt.replay: the source {name} that init_from was trained on was at "
                    f"{entry['root']}, which is gone: set data.sources.{name}.root (or "
                    f"paths.data_dir) to where it is now, or adapt.replay=0 to replay nothing."
                )
            entry = {**entry, "root": str(fallback.root)}
        key = name if name not in site else f"{name}_before"
        replayed[key] = entry
    return replayed


def load_start_weights(model: CrackClassifier, start: Start) -> None:
    """The checkpoint's weights into the freshly built model (same architecture)."""
    try:
        model.load_state_dict(start.state_dict)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(
            f"init_from={start.path} does not fit the configured model ({first}): choose "
            f"the model settings it was trained with."
        ) from None


def keep_replay_share(datamodule: Any, start: Start, seed: int) -> None:
    """Keep adapt.replay of each replayed source's training images (a seeded draw); their
    validation and test images all stay, to show whether they regress."""
    share = start.settings.replay
    names = datamodule.sources.names
    replayed = {names.index(name) for name in start.replayed}
    if not replayed or share >= 1:
        return
    train = datamodule.split["train"]
    rng = np.random.default_rng(seed)
    kept = [i for i in train if datamodule.sources.source[i] not in replayed]
    for index in sorted(replayed):
        own = [i for i in train if datamodule.sources.source[i] == index]
        count = max(1, round(share * len(own))) if own else 0
        kept += rng.choice(own, size=count, replace=False).tolist() if count else []
    train[:] = sorted(kept)  # in place: the data module's split is its sources' split


def begin_from(start: Start, datamodule: Any, model: CrackClassifier, data: DictConfig) -> None:
    """After the split and the model are built: the replayed share of the training images,
    init_from's weights, and (adapt.bn_stats) BatchNorm statistics of the site."""
    if start.site is not None:
        keep_replay_share(datamodule, start, int(data.seed))
        if start.leaves_photos_out:
            from crack_lightning.training.leave_one_out import train_on_every_photo

            train_on_every_photo(datamodule, start.site)
        log.info("The site's photos: %s.", site_split(datamodule, start))
    load_start_weights(model, start)
    if start.site is not None and start.settings.bn_stats:
        samples = site_samples(datamodule, start.site)
        reestimate_batchnorm(model, samples, int(data.batch_size), str(data.on_bad_image))


def site_split(datamodule: Any, start: Start) -> str:
    """How the site's photos were split, e.g. "3 train, 1 val, 1 test (by photo: ...)"."""
    from crack_lightning.data.decode import sample_file

    index = datamodule.sources.names.index(start.site)
    counts = []
    for name in ("train", "val", "test"):
        photos = {
            sample_file(datamodule.samples[i][0])
            for i in datamodule.split[name]
            if datamodule.sources.source[i] == index
        }
        counts.append(f"{len(photos)} {name}")
    if start.leaves_photos_out:
        how = "every photo trains; each is left out in turn to choose the epochs and threshold"
    else:
        how = "by photo: the site's split in split_manifest.csv"
    return f"{', '.join(counts)} ({how})"


def choose_by_leaving_out(start: Start, datamodule: Any, cfg: DictConfig) -> None:
    """A crack map's site: leave each photo out in turn (training/leave_one_out.py), then
    set cfg to train on every photo for the chosen epochs and store the chosen threshold."""
    from crack_lightning.evaluation.before_after import PAGE_NAME
    from crack_lightning.training.check import resolve_precision
    from crack_lightning.training.leave_one_out import leave_one_photo_out, write_page
    from crack_lightning.training.photo_scores import SCAN_DIR
    from crack_lightning.training.run import build

    def new_model() -> CrackClassifier:
        model = build(cfg.model)
        load_start_weights(model, start)
        return model

    trainer_settings = {
        "accelerator": cfg.trainer.accelerator,
        "devices": 1,
        "precision": resolve_precision(cfg.trainer.precision),
    }
    start_threshold = decision_threshold(None, start.threshold)
    epochs = start.settings.map_epochs
    choice = leave_one_photo_out(
        datamodule, start.site, new_model, epochs, start_threshold, trainer_settings
    )
    log.info(
        "Leaving each site photo out chose %d of %d epochs and threshold %.1f (pooled pixel "
        "F1 %s). The site's photos, each scored by init_from (threshold %.2f) and by a model "
        "trained without it:\n%s",
        choice.epochs,
        epochs,
        choice.threshold,
        "n/a" if choice.pixel_f1 is None else f"{choice.pixel_f1:.3f}",
        start_threshold,
        choice.table,
    )
    output_dir = Path(cfg.paths.output_dir)
    page = write_page(choice, str(start.path), output_dir / SCAN_DIR, output_dir / PAGE_NAME)
    log.info("Overlays before and after, per photo: %s", page)
    if choice.epochs == 0:
        log.warning(
            "No epoch of training without a photo mapped it better than init_from: the adapted "
            "checkpoint keeps init_from's weights, with the threshold %.1f the photos chose.",
            choice.threshold,
        )
    with open_dict(cfg):
        cfg.trainer.max_epochs = choice.epochs  # chosen: the last epoch is kept
        cfg.callbacks.early_stopping = None
        if cfg.callbacks.get("model_checkpoint") is not None:
            cfg.callbacks.model_checkpoint.monitor = None
        if datamodule.split["val"]:  # the replayed sources' figures, once at the end
            cfg.trainer.check_val_every_n_epoch = max(1, choice.epochs)
        else:  # nothing replayed: no validation images
            cfg.trainer.limit_val_batches = 0
        cfg.callbacks.stored_threshold = {
            "_target_": "crack_lightning.training.callbacks.StoredThreshold",
            "threshold": choice.threshold,
            "rule": "leave_one_photo_out",
            "save_untrained": choice.epochs == 0,
        }


def site_samples(datamodule: Any, site: str) -> list[str]:
    """The site's samples (tiles or files) of every split: BatchNorm statistics need no
    labels."""
    index = datamodule.sources.names.index(site)
    return [
        path
        for (path, _), source in zip(datamodule.samples, datamodule.sources.source, strict=True)
        if source == index
    ]


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_batchnorm(
    model: CrackClassifier, samples: list[str], batch_size: int, on_bad: str
) -> int:
    """Replace the backbone's BatchNorm running statistics by the mean and variance of its
    activations over `samples` (AdaBN: unlabelled adaptation); returns the layers changed.
    The layers stay in eval mode afterwards, as a frozen backbone's are."""
    net = model.net
    layers = batchnorm_layers(net.backbone)
    images = DecodedImages(samples, [0] * len(samples), int(model.hparams.image_size), on_bad)
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over every batch
        layer.train()
    try:
        for batch, _ in DataLoader(images, batch_size=batch_size):
            net.backbone(net.normalize(batch))
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
            layer.eval()
    net.frozen = net.frozen  # new statistics: the BatchNorm-folded copy is built again
    log.info(
        "BatchNorm statistics of %d layers re-estimated on %d site tiles.",
        len(layers),
        len(samples),
    )
    return len(layers)
