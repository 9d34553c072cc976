"""The optimizer and learning-rate scheduler, built from `_target_` + `_partial_` configs.

`model.optimizer` (conf/model/_base.yaml; Adam by default) is any `torch.optim` class, or
anything called as `factory(params)`: `model.optimizer._target_=torch.optim.SGD
+model.optimizer.momentum=0.9` needs no code. `model.scheduler` (null, or an option of
conf/model/scheduler/) is called as `factory(optimizer)`; its keys `interval`,
`frequency` and `monitor` go to Lightning (when to step, which metric ReduceLROnPlateau
watches) instead. Checkpoints keep both as plain dicts among the hyper-parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn
from torch.optim import Optimizer

from crack_lightning.errors import ModelConfigError

# model.scheduler keys for Lightning's lr_scheduler config, not for the scheduler itself
LIGHTNING_KEYS = ("interval", "frequency", "monitor")


def scheduler_factory(config: Mapping[str, Any]) -> dict[str, Any]:
    """model.scheduler without the keys that go to Lightning."""
    return {k: v for k, v in config.items() if k not in LIGHTNING_KEYS}


def _call(config: Mapping[str, Any], setting: str, argument: Any) -> Any:
    """instantiate(config)(argument), with errors that name the setting."""
    if "_target_" not in config:
        raise ModelConfigError(
            f"{setting} needs a _target_ (a class such as torch.optim.Adam) and _partial_: "
            f"true; got {dict(config)}. See conf/model/_base.yaml and conf/model/scheduler/."
        )
    try:
        return instantiate(dict(config), _partial_=True)(argument)
    except (InstantiationException, TypeError, ValueError) as err:
        cause = err.__cause__ or err
        raise ModelConfigError(f"{setting} ({config['_target_']}): {cause}") from None


def build_optimizer(config: Mapping[str, Any], params: Iterable[nn.Parameter]) -> Optimizer:
    return _call(config, "model.optimizer", list(params))


def build_scheduler(config: Mapping[str, Any] | None, optimizer: Optimizer) -> dict | None:
    """Lightning's lr_scheduler dict, or None without a scheduler."""
    if config is None:
        return None
    scheduler = _call(scheduler_factory(config), "model.scheduler", optimizer)
    return {"scheduler": scheduler} | {k: config[k] for k in LIGHTNING_KEYS if k in config}
