"""Settings checked at start-up, before any data is read or model built.

Each schema below is a dataclass whose field types OmegaConf enforces when the composed
config is merged into it; `__post_init__` adds the ranges. Only the settings a schema
names are checked, so a config may carry more (its `_target_`, new options). The
defaults stay in conf/: every field is required here (MISSING) and comes from there.
"""

from __future__ import annotations

import difflib
import enum
import importlib.util
import inspect
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from hydra.utils import get_method
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from crack_lightning.errors import (
    ConfigError,
    CrackLightningError,
    DataError,
    ModelConfigError,
    PredictionError,
    RunDirError,
)

S = TypeVar("S")
# model.scheduler keys for Lightning's lr_scheduler config, not for the scheduler itself
SCHEDULER_LIGHTNING_KEYS = ("interval", "frequency", "monitor")
# the most augmented views of each training image data.cache_views may cache
MAX_VIEWS = 8


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Refuse fractions that leave no training data or no validation data."""
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1.")
    if not 0 <= test_fraction < 1:
        raise DataError(f"data.test_fraction={test_fraction} must lie in [0, 1).")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves "
            f"no images to train on; keep the sum below 1."
        )


def require(ok: bool, setting: str, value: Any, allowed: str, error: type[Exception]) -> None:
    """Raise `error` naming the setting, its value and what is allowed unless `ok`."""
    if not ok:
        raise error(f"{setting}={value} must be {allowed}.")


def require_threshold(value: float | None, setting: str, error: type[Exception]) -> None:
    """A decision threshold on P(crack), when set, lies strictly between 0 and 1."""
    if value is not None:
        require(0 < value < 1, setting, value, "strictly between 0 and 1", error)


# index = class label: Negative (no crack) = 0, Positive (crack) = 1
CLASS_NAMES = ("Negative", "Positive")
SOURCE_HINT = (
    "Add a source from a shipped config with `+data/sources@data.sources.NAME=folder` "
    "(or metu, sdnet2018, masks) and set data.sources.NAME.root=DIR."
)


class SplitKind(str, enum.Enum):
    """How a source is split: stratified at random, by near-duplicate groups (image
    hashes), or by a file-name pattern's first group (group_pattern)."""

    random = "random"
    grouped = "grouped"
    pattern = "pattern"


class OnBadImage(str, enum.Enum):
    skip = "skip"
    stop = "stop"


def check_unpack_limit(value: Any, setting: str) -> None:
    """The most GiB unpacking one archive may write (data/fetch.py): a number above 0."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 < value < float("inf"):
        shown = f"{value:g}" if number else value
        raise DataError(
            f"{setting}={shown} must be a number of GiB above 0 (the most that unpacking "
            f"one archive may write)."
        )


def check_distance(max_distance: int, setting: str = "data.group_distance") -> None:
    """Near-duplicate distance: bits of a 64-bit hash."""
    if int(max_distance) != max_distance or not 0 <= max_distance <= 16:
        raise DataError(
            f"{setting}={max_distance} must be an integer in [0, 16] (bits of a "
            f"64-bit hash; about 32 is what unrelated images differ by)."
        )


@dataclass
class DataSettings:
    """The data settings train.py checks before looking at any file."""

    error: ClassVar[type[CrackLightningError]] = DataError
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    image_size: int = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    cache_views: int = MISSING
    split: SplitKind = MISSING
    group_distance: int = MISSING
    check: bool = MISSING
    download: Any = MISSING  # auto, true or false
    cache_features: Any = MISSING  # auto, true or false
    decode_on_device: bool = MISSING
    on_bad_image: OnBadImage = MISSING
    balanced_sampling: bool = MISSING
    unpack_limit_gib: float = MISSING
    negative_weights: dict[str, float] | None = MISSING

    def __post_init__(self) -> None:
        check_fractions(self.val_fraction, self.test_fraction)
        for name, factor in (self.negative_weights or {}).items():
            require(factor > 0, f"data.negative_weights.{name}", factor, "above 0", DataError)
        if self.negative_weights and not self.balanced_sampling:
            raise DataError(
                "data.negative_weights weighs cells of the balanced sampler: set "
                "data.balanced_sampling=true with it, or data.negative_weights=null."
            )
        check_unpack_limit(self.unpack_limit_gib, "data.unpack_limit_gib")
        for name, low in (("image_size", 16), ("batch_size", 1), ("num_workers", 0)):
            value = getattr(self, name)
            require(value >= low, f"data.{name}", value, f"an integer >= {low}", DataError)
        views = self.cache_views
        require(
            1 <= views <= MAX_VIEWS,
            "data.cache_views",
            views,
            f"in 1..{MAX_VIEWS}",
            DataError,
        )
        require(
            self.download in (True, False, "auto"),
            "data.download",
            self.download,
            "auto (download when data.root is missing or empty), true or false",
            DataError,
        )
        cache = self.cache_features
        require(
            cache in (True, False, "auto"),
            "data.cache_features",
            cache,
            "auto, true or false",
            DataError,
        )
        require(
            self.split is not SplitKind.pattern,
            "data.split",
            "pattern",
            "random or grouped for data.root (a pattern split needs a group_pattern: give "
            "the folder as a data.sources entry with split=pattern)",
            DataError,
        )
        check_distance(self.group_distance)


@dataclass
class SourceSettings:
    """One entry of data.sources (conf/data/sources/*.yaml); `section` of validate() is
    data.sources.NAME, so every message names the source's setting."""

    error: ClassVar[type[CrackLightningError]] = DataError
    root: str = MISSING
    classes: dict[str, list[str]] = MISSING  # Negative/Positive -> folder globs under root
    subsets: list[str] | None = MISSING
    split: SplitKind = MISSING
    group_pattern: str | None = MISSING
    group_distance: int = MISSING
    download: dict[str, Any] | None = None
    name: str = ""  # the NAME of data.sources.NAME, for messages

    def __post_init__(self) -> None:
        where = f"data.sources.{self.name}"
        if set(self.classes) != set(CLASS_NAMES):
            raise DataError(
                f"{where}.classes must map exactly {' and '.join(CLASS_NAMES)} to lists of "
                f"folders (got {sorted(self.classes)})."
            )
        if self.split is SplitKind.pattern:
            if not self.group_pattern:
                raise DataError(f"{where}.split=pattern needs {where}.group_pattern (a regex).")
            try:
                re.compile(self.group_pattern)
            except re.error as err:
                raise DataError(
                    f"{where}.group_pattern={self.group_pattern!r} is no regex: {err}"
                ) from None
        check_distance(self.group_distance, f"{where}.group_distance")
        if self.download and "unpack_limit_gib" in self.download:
            limit = self.download["unpack_limit_gib"]
            check_unpack_limit(limit, f"{where}.download.unpack_limit_gib")

    @classmethod
    def of(cls, name: str, config: Any) -> SourceSettings:
        """data.sources.NAME checked: known keys, then types and ranges."""
        where = f"data.sources.{name}"
        config = plain(config)
        if not isinstance(config, Mapping):
            raise DataError(f"{where} must be a mapping of source settings. {SOURCE_HINT}")
        keys = {f.name for f in fields(cls)} - {"name", "download"}
        if missing := keys - set(config):
            raise DataError(
                f"{where} is not a known source (it lacks {', '.join(sorted(missing))}). "
                f"{SOURCE_HINT}"
            )
        if unknown := set(config) - keys - {"download"}:
            raise DataError(
                f"{where} has unknown settings {sorted(unknown)}; a source takes "
                f"{', '.join(sorted(keys | {'download'}))}."
            )
        if config["root"] is None:
            raise DataError(f"{where}.root is not set: point it at the source's folder.")
        classes = config["classes"]
        if not isinstance(classes, Mapping) or set(classes) != set(CLASS_NAMES):
            raise DataError(
                f"{where}.classes must map exactly {' and '.join(CLASS_NAMES)} to lists of "
                f"folders (got {sorted(classes) if isinstance(classes, Mapping) else classes})."
            )
        values = {**config, "download": config.get("download"), "name": name}
        return validate(values, cls, where)


class MaskValue(str, enum.Enum):
    """What a grey level of a crack mask stands for (data.sources.NAME.mask_values)."""

    crack = "crack"
    not_crack = "not_crack"
    ignore = "ignore"


# the `kind` of a data.sources entry that is photos with crack masks (data/masks.py)
MASKS_KIND = "masks"
MASKS_SPLIT = "photo"


@dataclass
class MasksSourceSettings:
    """A data.sources entry of photos with crack masks (conf/data/sources/masks.yaml),
    cut into labelled tiles by data/masks.py; messages name data.sources.NAME.KEY."""

    error: ClassVar[type[CrackLightningError]] = DataError
    kind: str = MISSING
    root: str = MISSING
    mask_dir: str | None = MISSING  # null: each mask beside its photo
    mask_suffix: str = MISSING
    tile_size: int = MISSING
    stride: int = MISSING
    min_share: float = MISSING
    ambiguous: list[float] | None = MISSING  # [low, high] crack shares left out
    mask_values: dict[int, MaskValue] | None = MISSING  # grey level -> what it stands for
    split: str = MISSING
    name: str = ""

    def __post_init__(self) -> None:
        where, err = f"data.sources.{self.name}", DataError
        require(self.tile_size >= 1, f"{where}.tile_size", self.tile_size, "pixels >= 1", err)
        require(self.stride >= 1, f"{where}.stride", self.stride, "pixels >= 1", err)
        share = self.min_share
        require(0 < share <= 1, f"{where}.min_share", share, "a share of a tile in (0, 1]", err)
        band = self.ambiguous
        require(
            band is None or (len(band) == 2 and 0 <= band[0] < band[1] <= 1),
            f"{where}.ambiguous",
            band,
            "null or [low, high] with 0 <= low < high <= 1 (tiles whose crack share lies "
            "strictly between are left out)",
            err,
        )
        for level in self.mask_values or {}:
            require(
                0 <= level <= 255,
                f"{where}.mask_values",
                {k: v.value for k, v in self.mask_values.items()},
                "a mapping of grey levels 0..255 to crack, not_crack or ignore",
                err,
            )
        require(
            bool(self.mask_suffix) and "/" not in self.mask_suffix,
            f"{where}.mask_suffix",
            self.mask_suffix,
            "a file-name ending such as _mask.png",
            err,
        )
        require(
            self.split == MASKS_SPLIT,
            f"{where}.split",
            self.split,
            f"{MASKS_SPLIT} (the tiles of one photo always stay on one side of every split)",
            err,
        )

    @classmethod
    def of(cls, name: str, config: Any) -> MasksSourceSettings:
        """data.sources.NAME checked: exactly the known keys, then types and ranges."""
        where = f"data.sources.{name}"
        keys = {f.name for f in fields(cls)} - {"name"}
        if unknown := set(config) - keys:
            raise DataError(
                f"{where} has unknown settings {sorted(unknown)}; a masks source takes "
                f"{', '.join(sorted(keys))}."
            )
        if config.get("root") is None:
            raise DataError(f"{where}.root is not set: point it at the folder of photos.")
        return validate({**config, "name": name}, cls, where)


def source_settings(name: str, config: Any) -> SourceSettings | MasksSourceSettings:
    """data.sources.NAME checked by its kind's schema: a masks source (`kind: masks`) or
    a folder of class folders (no kind)."""
    config = plain(config)
    if isinstance(config, Mapping) and config.get("kind") == MASKS_KIND:
        return MasksSourceSettings.of(name, config)
    if isinstance(config, Mapping) and config.get("kind") is not None:
        raise DataError(
            f"data.sources.{name}.kind={config['kind']} must be {MASKS_KIND} (photos with "
            f"crack masks) or absent (class folders). {SOURCE_HINT}"
        )
    return SourceSettings.of(name, config)


@dataclass
class DataToolSettings:
    """`crack-data` (conf/data_tool.yaml)."""

    error: ClassVar[type[CrackLightningError]] = DataError
    action: str = MISSING
    root: str = MISSING
    archive: str | None = MISSING
    keep_archive: bool = MISSING
    quick: bool = MISSING
    unpack_limit_gib: float = MISSING

    def __post_init__(self) -> None:
        check_unpack_limit(self.unpack_limit_gib, "unpack_limit_gib")


@dataclass
class ModelSettings:
    """The model settings: learning rate and regularisation in their ranges."""

    error: ClassVar[type[CrackLightningError]] = ModelConfigError
    backbone: str = MISSING
    pretrained: bool = MISSING
    weights_path: str | None = MISSING
    freeze_backbone: bool = MISSING
    channels_last: bool = MISSING
    dropout: float = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    image_size: int = MISSING

    def __post_init__(self) -> None:
        err = ModelConfigError
        require(self.lr > 0, "model.lr", self.lr, "a learning rate > 0", err)
        require(self.weight_decay >= 0, "model.weight_decay", self.weight_decay, ">= 0", err)
        require(0 <= self.dropout < 1, "model.dropout", self.dropout, "in [0, 1)", err)


@dataclass
class TimmSettings:
    """model.name when model.backbone=timm (conf/model/timm.yaml): a model timm knows,
    at an image size it takes."""

    error: ClassVar[type[CrackLightningError]] = ModelConfigError
    name: str = MISSING
    image_size: int = MISSING

    def __post_init__(self) -> None:
        check_timm_name(self.name, self.image_size)


TIMM_INSTALL = "model=timm needs the timm package: pip install -e '.[timm]' (or pip install timm)."
TIMM_FIND_NAMES = (
    "List the names timm knows with "
    "`python -c \"import timm; print(timm.list_models('convnext*'))\"`."
)


def check_timm_name(name: str, image_size: int | None = None) -> None:
    """Refuse a model name timm does not know, saying how to find the names, and an
    image size a model with a fixed input size (vision transformers) cannot take."""
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return  # a hub repository or a local folder: timm resolves it when building
    try:
        import timm
    except ImportError:
        raise ModelConfigError(TIMM_INSTALL) from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        guess = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelConfigError(f"model.name={name!r} is not a timm model.{guess} {TIMM_FIND_NAMES}")
    config = timm.get_pretrained_cfg(name)
    if image_size is not None and config is not None and config.fixed_input_size:
        size = config.input_size[-1]
        if image_size != size:
            raise ModelConfigError(
                f"timm model {name!r} takes {size}x{size} images only, but "
                f"data.image_size={image_size}; set data.image_size={size}."
            )


@dataclass
class TrainerSettings:
    """Epoch counts: Lightning reads max_epochs=-1 as "forever", which no run here wants."""

    error: ClassVar[type[CrackLightningError]] = ConfigError
    min_epochs: int = MISSING
    max_epochs: int = MISSING
    check_val_every_n_epoch: int = MISSING
    log_every_n_steps: int = MISSING

    def __post_init__(self) -> None:
        for name in ("max_epochs", "check_val_every_n_epoch", "log_every_n_steps"):
            value = getattr(self, name)
            require(value >= 1, f"trainer.{name}", value, "an integer >= 1", ConfigError)
        require(
            0 <= self.min_epochs <= self.max_epochs,
            "trainer.min_epochs",
            self.min_epochs,
            f"in 0..trainer.max_epochs ({self.max_epochs})",
            ConfigError,
        )


class PredictMode(str, enum.Enum):
    predict = "predict"
    eval = "eval"
    scan = "scan"


@dataclass
class PredictSettings:
    """predict.py's settings with a type or range (conf/predict.yaml)."""

    error: ClassVar[type[CrackLightningError]] = PredictionError
    mode: PredictMode = MISSING
    output: str = MISSING  # the predictions table: .csv or .json
    threshold: float | None = MISSING  # null: the checkpoint's stored threshold
    batch_size: int = MISSING
    num_workers: int = MISSING
    visualize: bool = MISSING
    max_visualize: int = MISSING
    progress: bool = MISSING
    html_report: bool = MISSING
    worst_per_source: int = MISSING
    suspects_shown: int = MISSING

    def __post_init__(self) -> None:
        err = PredictionError
        require_threshold(self.threshold, "threshold", err)
        for name in ("worst_per_source", "suspects_shown"):
            value = getattr(self, name)
            require(value >= 0, name, value, "an integer >= 0 (0: none)", err)
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1", err)
        require(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0", err)
        suffix = self.output.rsplit(".", 1)[-1].lower()
        require(suffix in ("csv", "json"), "output", self.output, "a .csv or .json file", err)


def describe(annotation: Any) -> str:
    """What a field's type allows, in a user's words."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        return "a list, each item " + describe(args[0])
    if typing.get_origin(annotation) is dict:
        return "a mapping, each value " + describe(args[1])
    if args:  # X | None
        return describe(args[0]) + " or null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(m.value for m in annotation)
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(
        annotation, str(annotation)
    )


def plain(value: Any) -> Any:
    """A config value with its interpolations resolved, containers as dicts and lists."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def validate(values: Mapping | DictConfig, schema: type[S], section: str, exact: bool = False) -> S:
    """`values` (only the keys `schema` names) as a `schema` instance; a wrong type or
    range raises the schema's error naming `section.key`. `exact`: a key the schema does
    not name (a typo) is refused too."""
    names = {f.name: f for f in fields(schema)}
    types = typing.get_type_hints(schema)
    subset = {k: plain(values[k]) for k in names if k in values}
    prefix = f"{section}." if section else ""
    if exact and (unknown := sorted(set(values) - set(names))):
        raise schema.error(
            f"{section or 'the config'} must set exactly {list(names)}; unknown {unknown}."
        )
    if missing := [n for n in names if n not in subset]:
        raise schema.error(f"missing setting(s): {', '.join(prefix + n for n in missing)}.")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), subset)
    except ValidationError as err:
        key = re.split(r"[.\[]", str(err.full_key or err.key))[0]  # the field, not its item
        raise schema.error(
            f"{prefix}{key}={subset.get(key)} must be {describe(types[key])}."
        ) from None
    return OmegaConf.to_object(merged)


class ResumeDataChanged(str, enum.Enum):
    """What a resumed run does when its data differ from the run's (training/resume.py)."""

    refuse = "refuse"
    allow = "allow"


@dataclass
class RunSettings:
    """train.py's own top-level settings with a type or range (conf/train.yaml)."""

    error: ClassVar[type[CrackLightningError]] = ConfigError
    resume_data_changed: ResumeDataChanged = MISSING
    init_from: str | None = MISSING  # a checkpoint whose weights training starts from
    scan_eval_at_end: bool = MISSING


@dataclass
class AdaptSettings:
    """adapt.* (conf/train.yaml): adapting an init_from checkpoint to a site
    (experiment=adapt, training/adapt.py)."""

    error: ClassVar[type[CrackLightningError]] = ConfigError
    site: str = MISSING  # the data.sources entry that is the site
    replay: float = MISSING  # share of the checkpoint's training images replayed
    bn_stats: bool = MISSING  # BatchNorm statistics re-estimated on the site's tiles

    def __post_init__(self) -> None:
        require(
            0 <= self.replay <= 1,
            "adapt.replay",
            self.replay,
            "a share in [0, 1] of the original training images (0: replay nothing)",
            ConfigError,
        )


def check_train_settings(cfg: DictConfig) -> None:
    """Every data, model, trainer and callback setting a schema covers, and the keywords
    of the optimizer, scheduler and callbacks, before anything slow."""
    validate(cfg, RunSettings, "")
    validate(cfg.adapt, AdaptSettings, "adapt")
    validate(cfg.data, DataSettings, "data")
    check_negative_weights(cfg.data)
    augmentation = cfg.data.get("augmentation")
    if augmentation is None:
        raise DataError(
            "data.augmentation=null: choose a file of conf/data/augmentation/ "
            "(data/augmentation=none for no augmentation)."
        )
    validate(augmentation, AugmentationSettings, "data.augmentation")
    validate(cfg.model, ModelSettings, "model")
    if cfg.model.backbone == "timm":
        validate(cfg.model, TimmSettings, "model")
    validate(cfg.trainer, TrainerSettings, "trainer")
    check_target(plain(cfg.model.get("optimizer")), "model.optimizer", ModelConfigError)
    scheduler = plain(cfg.model.get("scheduler"))
    if scheduler is not None:  # the keys for Lightning are not the scheduler's keywords
        scheduler = {k: v for k, v in scheduler.items() if k not in SCHEDULER_LIGHTNING_KEYS}
    check_target(scheduler, "model.scheduler", ModelConfigError)
    callbacks = cfg.get("callbacks") or {}
    for name, schema in CALLBACK_SETTINGS.items():
        if callbacks.get(name) is not None:
            validate(callbacks[name], schema, f"callbacks.{name}")
    for name, entry in callbacks.items():
        if entry is not None and "_target_" in entry:
            check_target(plain(entry), f"callbacks.{name}")
    check_loggers(cfg.get("logger"))


def check_negative_weights(data: DictConfig) -> None:
    """Every name in data.negative_weights is a source of the run: a typo would weigh
    nothing, silently."""
    named = set(data.get("negative_weights") or {})
    sources = {str(k) for k, v in (data.get("sources") or {}).items() if v is not None}
    if unknown := sorted(named - sources):
        raise DataError(
            f"data.negative_weights names {', '.join(unknown)}, not a source of this run "
            f"({', '.join(sorted(sources)) or 'data.sources is not set'})."
        )


# logger classes (conf/logger/) that need a package not installed by default, and how to
# get it
LOGGER_PACKAGES = {
    "MLFlowLogger": ("mlflow", 'pip install -e ".[mlflow]" (the mlflow-skinny client)'),
    "WandbLogger": ("wandb", "pip install wandb"),
}


def check_loggers(group: Mapping | None) -> None:
    """Each logger names a class that takes its settings, and the package it needs is
    installed: said before any data is read or downloaded."""
    for name, entry in (group or {}).items():
        if entry is None:
            continue
        config = plain(entry)
        check_target(config, f"logger.{name}")
        module, install = LOGGER_PACKAGES.get(
            str(config["_target_"]).rsplit(".", 1)[-1], (None, "")
        )
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"logger.{name} needs the `{module}` package, which is not installed: "
                f"{install}; or choose another logger (logger=tensorboard, logger=csv)."
            )


def check_target(
    config: Mapping | None, setting: str, error: type[CrackLightningError] = ConfigError
) -> None:
    """A `_target_` config names something importable that takes its keywords."""
    if config is None:
        return
    target = config.get("_target_")
    if target is None:
        raise error(f"{setting} needs a _target_ (the class or function it builds).")
    try:
        function = get_method(target)
    except (OmegaConfBaseException, ImportError, ValueError, AttributeError, TypeError):
        raise error(f"{setting}._target_={target} cannot be imported.") from None
    keywords = {k: v for k, v in config.items() if not (k.startswith("_") and k.endswith("_"))}
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(keywords) - set(parameters))
    if unknown:
        raise error(
            f"{setting}: {target} takes no setting {', '.join(map(repr, unknown))}; it takes "
            f"{', '.join(n for n in parameters if n not in ('self', 'params', 'optimizer'))}."
        )


# --- Training settings beyond data/model/trainer: augmentation and callbacks -----------
# (check_train_settings validates them; the defaults are in conf/data/augmentation/ and
# conf/callbacks/)


@dataclass
class AugmentationSettings:
    """data.augmentation (conf/data/augmentation/): every setting, each in its range.
    Every one of them off (0, false, or 1.0 for scale_min) is the identity."""

    error: ClassVar[type[CrackLightningError]] = DataError
    horizontal_flip: bool = MISSING
    vertical_flip: bool = MISSING
    rotation_degrees: float = MISSING
    # random resized crop: the crop covers a share of the image's area drawn from
    # [scale_min, 1], anywhere in it, and is resized back to the image size
    scale_min: float = MISSING
    # colour jitter: each factor drawn from [1 - x, 1 + x]
    brightness: float = MISSING
    contrast: float = MISSING
    saturation: float = MISSING
    grayscale_p: float = MISSING  # probability of turning an image grey
    # probability of a Gaussian blur with sigma (pixels) drawn from [0, blur_sigma]
    blur_p: float = MISSING
    blur_sigma: float = MISSING
    # Gaussian pixel noise, its standard deviation (on [0, 1]) drawn from [0, noise_std]
    noise_std: float = MISSING
    # probability of JPEG re-compression at a quality drawn from [jpeg_quality_min, 95]
    jpeg_p: float = MISSING
    jpeg_quality_min: int = MISSING

    RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "rotation_degrees": (0, 180),
        "scale_min": (0.05, 1),
        "brightness": (0, 1),
        "contrast": (0, 1),
        "saturation": (0, 1),
        "grayscale_p": (0, 1),
        "blur_p": (0, 1),
        "blur_sigma": (0, 10),
        "noise_std": (0, 0.5),
        "jpeg_p": (0, 1),
        "jpeg_quality_min": (1, 95),
    }

    def __post_init__(self) -> None:
        for name, (low, high) in self.RANGES.items():
            value = getattr(self, name)
            require(
                low <= value <= high,
                f"data.augmentation.{name}",
                value,
                f"in [{low}, {high}]",
                DataError,
            )


class ThresholdRule(str, enum.Enum):
    balanced_accuracy = "balanced_accuracy"
    recall = "recall"


@dataclass
class SourceMetricsSettings:
    """callbacks.source_metrics: how the decision threshold is chosen on validation."""

    error: ClassVar[type[CrackLightningError]] = ModelConfigError
    threshold_rule: ThresholdRule | None = MISSING  # null: keep 0.5
    target_recall: float = MISSING
    threshold_tolerance: float = MISSING

    def __post_init__(self) -> None:
        err, name = ModelConfigError, "callbacks.source_metrics"
        recall, tolerance = self.target_recall, self.threshold_tolerance
        require(0 < recall <= 1, f"{name}.target_recall", recall, "in (0, 1]", err)
        require(
            0 <= tolerance < 1,
            f"{name}.threshold_tolerance",
            tolerance,
            "in [0, 1): how much balanced accuracy a threshold nearer 0.5 may give up",
            err,
        )


@dataclass
class FineTuneSettings:
    """callbacks.finetune (conf/callbacks/finetune/unfreeze.yaml)."""

    error: ClassVar[type[CrackLightningError]] = ModelConfigError
    epoch: int = MISSING
    blocks: Any = MISSING  # a number of blocks, or "all" (OmegaConf has no int | str)
    lr: float = MISSING
    train_bn: bool = MISSING

    def __post_init__(self) -> None:
        err, name = ModelConfigError, "callbacks.finetune"
        require(
            self.epoch >= 0,
            f"{name}.epoch",
            self.epoch,
            "an epoch number >= 0 (counted from 0); callbacks.finetune=null keeps the "
            "backbone frozen",
            err,
        )
        blocks = self.blocks
        whole = isinstance(blocks, int) and not isinstance(blocks, bool) and blocks >= 1
        require(
            whole or blocks == "all",
            f"{name}.blocks",
            blocks,
            "a number of blocks >= 1 or 'all'",
            err,
        )
        require(self.lr > 0, f"{name}.lr", self.lr, "a learning rate > 0", err)


@dataclass
class FeatureStatsSettings:
    """callbacks.feature_stats: how many training images the unfamiliar score is fitted on."""

    error: ClassVar[type[CrackLightningError]] = ConfigError
    max_images: int = MISSING

    def __post_init__(self) -> None:
        value = self.max_images
        require(
            value >= 1, "callbacks.feature_stats.max_images", value, "an integer >= 1", ConfigError
        )


@dataclass
class ProgressBarSettings:
    """callbacks.progress_bar: a bar on a terminal, a line every line_every_s elsewhere."""

    error: ClassVar[type[CrackLightningError]] = ConfigError
    refresh_rate: int = MISSING  # 0: silent
    line_every_s: float = MISSING

    def __post_init__(self) -> None:
        name, err = "callbacks.progress_bar", ConfigError
        rate, every = self.refresh_rate, self.line_every_s
        require(rate >= 0, f"{name}.refresh_rate", rate, "an integer >= 0 (0: silent)", err)
        require(every > 0, f"{name}.line_every_s", every, "seconds > 0", err)


@dataclass
class ValidationFiguresSettings:
    """callbacks.validation_figures: the confusion matrix."""

    error: ClassVar[type[CrackLightningError]] = ConfigError
    threshold: float = MISSING

    def __post_init__(self) -> None:
        require_threshold(self.threshold, "callbacks.validation_figures.threshold", ConfigError)


@dataclass
class ValidationMistakesSettings:
    """callbacks.validation_mistakes: the worst validation images and the suspect labels."""

    error: ClassVar[type[CrackLightningError]] = ConfigError
    worst_per_source: int = MISSING  # 0: no grid
    suspect_labels: bool = MISSING
    suspects_shown: int = MISSING
    threshold: float = MISSING

    def __post_init__(self) -> None:
        name, err = "callbacks.validation_mistakes", ConfigError
        for key in ("worst_per_source", "suspects_shown"):
            value = getattr(self, key)
            require(value >= 0, f"{name}.{key}", value, "an integer >= 0 (0: none)", err)
        require_threshold(self.threshold, f"{name}.threshold", err)


# callbacks with a schema, by their name under `callbacks` in conf/callbacks/
CALLBACK_SETTINGS: dict[str, type] = {
    "progress_bar": ProgressBarSettings,
    "validation_figures": ValidationFiguresSettings,
    "validation_mistakes": ValidationMistakesSettings,
    "source_metrics": SourceMetricsSettings,
    "finetune": FineTuneSettings,
    "feature_stats": FeatureStatsSettings,
}


# --- Command settings (conf/<command>.yaml): each command validates its own at start ----


@dataclass
class ScanSettings:
    """scan.* (conf/scan/default.yaml): the sliding window of predict mode=scan and
    crack-scan-eval."""

    error: ClassVar[type[CrackLightningError]] = PredictionError
    patch_size: int = MISSING
    stride: int = MISSING
    unfamiliar_limit: float | None = MISSING  # null: never label a patch Unfamiliar

    def __post_init__(self) -> None:
        err = PredictionError
        require(self.patch_size >= 1, "scan.patch_size", self.patch_size, "pixels >= 1", err)
        require(self.stride >= 1, "scan.stride", self.stride, "pixels >= 1", err)
        limit = self.unfamiliar_limit
        require(
            limit is None or limit > 0,
            "scan.unfamiliar_limit",
            limit,
            "a number > 0 or null",
            err,
        )


class Quantize(str, enum.Enum):
    int8 = "int8"


class ExportFormat(str, enum.Enum):
    onnx = "onnx"
    torchscript = "torchscript"


@dataclass
class CalibrationSettings:
    """calibration.* of conf/export.yaml: the images an int8 export is calibrated on."""

    error: ClassVar[type[CrackLightningError]] = PredictionError
    inputs: list[str] | None = MISSING
    images: int = MISSING
    batch_size: int = MISSING
    float_convs: int = MISSING

    def __post_init__(self) -> None:
        for name, low in (("images", 1), ("batch_size", 1), ("float_convs", 0)):
            value = getattr(self, name)
            require(value >= low, f"calibration.{name}", value, f"at least {low}", PredictionError)


@dataclass
class ExportSettings:
    """conf/export.yaml."""

    error: ClassVar[type[CrackLightningError]] = PredictionError
    ckpt_path: str = MISSING
    format: ExportFormat = MISSING
    output: str | None = MISSING
    quantize: Quantize | None = MISSING  # null: float32
    progress: bool = MISSING

    def __post_init__(self) -> None:
        if self.quantize is not None and self.format is not ExportFormat.onnx:
            raise PredictionError(
                f"quantize={self.quantize.value} needs format=onnx "
                f"(got format={self.format.value})."
            )


def check_export_settings(cfg: DictConfig) -> tuple[ExportSettings, CalibrationSettings | None]:
    """The export settings; the calibration ones (and their images) only for int8."""
    settings = validate(cfg, ExportSettings, "")
    if settings.quantize is None:
        return settings, None
    calibration = validate(cfg.calibration, CalibrationSettings, "calibration")
    if not calibration.inputs:
        raise PredictionError(
            "quantize=int8 needs calibration.inputs: training images (a folder with "
            "Positive/ and Negative/, files or glob patterns), e.g. "
            "calibration.inputs=[data/concrete_crack]. Use images the model was trained on, "
            "not those you evaluate it on."
        )
    return settings, calibration


@dataclass
class ScanEvalSettings:
    """conf/scan_eval.yaml (its scan.* are ScanSettings)."""

    error: ClassVar[type[CrackLightningError]] = PredictionError
    photos: list[str] = MISSING
    min_share: float = MISSING
    threshold: float | None = MISSING  # null: the model's stored threshold
    batch_size: int = MISSING
    out: str = MISSING
    log_dir: str | None = MISSING  # TensorBoard scalars of the summary; null: none

    def __post_init__(self) -> None:
        err = PredictionError
        require(0 < self.min_share <= 1, "min_share", self.min_share, "in (0, 1]", err)
        require_threshold(self.threshold, "threshold", err)
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1", err)


@dataclass
class AppSettings:
    """conf/app.yaml: crack-app, the inspector's page (its scan.* are ScanSettings)."""

    error: ClassVar[type[CrackLightningError]] = PredictionError
    labels_dir: str = MISSING
    files_dir: str | None = MISSING  # null: a new folder in the system's temp dir
    threshold: float | None = MISSING  # null: the model's stored threshold
    max_pixels: int = MISSING
    batch_size: int = MISSING
    host: str = MISSING
    port: int | None = MISSING  # null: the first free port from 7860
    open_browser: bool = MISSING

    def __post_init__(self) -> None:
        err = PredictionError
        require_threshold(self.threshold, "threshold", err)
        require(self.max_pixels >= 1, "max_pixels", self.max_pixels, "an integer >= 1", err)
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1", err)
        port = self.port
        require(port is None or 1 <= port <= 65535, "port", port, "in [1, 65535] or null", err)


class Direction(str, enum.Enum):
    maximize = "maximize"
    minimize = "minimize"


@dataclass
class SummarizeSettings:
    """conf/summarize.yaml."""

    error: ClassVar[type[CrackLightningError]] = RunDirError
    sweep_dir: str = MISSING
    metric: str | None = MISSING  # null: the jobs' optimized_metric
    direction: Direction | None = MISSING  # null: the jobs' optimized_direction


@dataclass
class BenchSettings:
    """conf/bench.yaml (a wrong type is named before anything runs)."""

    error: ClassVar[type[CrackLightningError]] = ConfigError
    sample: str = MISSING
    weights: str | None = MISSING
    images: int = MISSING
    sizes: list[int] = MISSING
    batch_size: int = MISSING
    workers: int = MISSING
    epochs: int = MISSING
    reference: str | None = MISSING
    full_scale: str | None = MISSING

    def __post_init__(self) -> None:
        err = ConfigError
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1", err)
        require(self.workers >= 0, "workers", self.workers, "an integer >= 0", err)
        require(self.epochs >= 0, "epochs", self.epochs, "an integer >= 0", err)
        for size in self.sizes:
            require(size >= 16, "sizes", self.sizes, "a list of image sizes >= 16", err)
