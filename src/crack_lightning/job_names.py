"""Readable names for sweep jobs' directories, so TensorBoard shows what each run changed.

TensorBoard names a run by its folder under --logdir; for a sweep that folder is the job
directory, so `3_model=resnet18,model.lr=0.0003/tensorboard` says what `3/tensorboard`
does not. conf/train.yaml sets `hydra.sweep.subdir` to use the resolver below.
"""

from __future__ import annotations

import re

from omegaconf import OmegaConf

# folder names stay well under the 255-byte limit of common file systems
MAX_NAME_CHARS = 150
RESOLVER = "job_dir"
# numbers with many digits (Optuna's samples) are shortened to 4 significant digits
_LONG_NUMBER = re.compile(r"(?<![\w.])\d*\.\d{5,}(?:[eE][-+]?\d+)?(?![\w.])")


def job_dir_name(num: int | str, override_dirname: str) -> str:
    """`<job number>_<overrides>`; the number alone keeps names unique, the rest is for people.

    Hydra's override_dirname is `key=value` pairs joined by commas. A "/" in a key (a
    group such as data/augmentation) or a value would nest folders, so it becomes ".".
    Long decimals are rounded (model.lr=0.0003575); the exact values are in the job's
    .hydra/overrides.yaml and in the sweep summary.
    """
    text = re.sub(r"\s+", "", str(override_dirname)).replace("/", ".").replace("\\", ".")
    text = _LONG_NUMBER.sub(lambda m: f"{float(m.group()):.4g}", text)
    text = text[:MAX_NAME_CHARS].rstrip(",")
    return f"{num}_{text}" if text else str(num)


def register_resolvers() -> None:
    """Make ${job_dir:NUM,OVERRIDES} available to Hydra (call before it composes)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, job_dir_name)
