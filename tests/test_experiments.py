"""Reproducibility (deterministic runs on CPU) and the experiment configs."""

from __future__ import annotations

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from crack_lightning.settings import check_train_settings
from crack_lightning.training.run import train

from .conftest import QUIET, ROOT, compose_config


def test_deterministic_runs_on_cpu_give_identical_metrics_and_weights(synthetic_cfg, tmp_path):
    def run(name: str, *overrides: str) -> tuple[dict, dict]:
        cfg = synthetic_cfg(
            "trainer.deterministic=true",
            f"paths.output_dir={tmp_path / name}",
            *overrides,
        )
        metrics = train(cfg)
        metrics.pop("best_checkpoint")
        state = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        return metrics, state["state_dict"]

    first, first_state = run("a")
    second, second_state = run("b")
    assert first == second
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    # a different seed: another head initialisation and other augmentations
    _, other_state = run("c", "seed=7")
    assert not torch.equal(other_state["net.head.1.weight"], first_state["net.head.1.weight"])


EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def set_values(tree: dict, prefix: str = "") -> dict[str, object]:
    """Every leaf an experiment file sets, by its dotted key (the defaults list and
    Hydra's own settings aside)."""
    leaves: dict[str, object] = {}
    for key, value in tree.items():
        if key in ("defaults", "hydra"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            leaves |= set_values(value, f"{name}.")
        else:
            leaves[name] = value
    return leaves


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_configs_pass_the_settings_checks(experiment):
    """Each recipe is a runnable one: every schema (data, augmentation, model, trainer,
    callbacks) accepts it and every _target_ takes its keywords."""
    cfg = compose_config("train", [f"experiment={experiment}", *QUIET])
    check_train_settings(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_values_win_over_the_config_groups(experiment):
    """What an experiment file sets is what the run gets: its values are applied after
    the groups it selects (a wrong package or defaults order would let them lose), and
    each group it sets to null is off."""
    written = yaml.safe_load((ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text())
    cfg = compose_config("train", [f"experiment={experiment}", *QUIET])
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key, value in set_values(written).items():
        node = plain
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    for entry in written.get("defaults", []):
        if isinstance(entry, dict):
            [(group, option)] = entry.items()
            group = group.removeprefix("override ")
            # the group's package: after an @, else its path
            path = group.split("@", 1)[1] if "@" in group else group.strip("/").replace("/", ".")
            assert (OmegaConf.select(cfg, path) is None) == (option is None), group


def test_the_generalising_recipe_reads_every_source_from_the_data_dir():
    """experiment=generalize paths.data_dir=D reads D/metu,
    D/sdnet2018, D/brickwork and the masked surfaces: each source's root is D/<its name>,
    and the masked photos are tiled at the scan window the drone photos are judged by."""
    cfg = compose_config("train", ["experiment=generalize", "paths.data_dir=/data/D", *QUIET])
    roots = {name: source.root for name, source in cfg.data.sources.items()}
    masked = ("crackforest", "cracktile", "masonry")
    assert roots == {
        name: f"/data/D/{name}" for name in ("metu", "sdnet2018", "brickwork", *masked)
    }
    assert all(cfg.data.sources[name].kind == "masks" for name in masked)
    assert {(cfg.data.sources[n].tile_size, cfg.data.sources[n].stride) for n in masked} == {
        (128, 64)
    }
