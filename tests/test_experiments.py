"""Reproducibility (deterministic runs on CPU) and the experiment configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from crack_lightning.data.datamodule import CrackDataModule
from crack_lightning.data.decode import sample_file
from crack_lightning.data.synthetic import generate_dataset
from crack_lightning.errors import CrackLightningError
from crack_lightning.models.classifier import CrackClassifier
from crack_lightning.models.segmenter import CrackSegmenter
from crack_lightning.training.check import check_train_settings
from crack_lightning.training.run import build, build_callbacks, train

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


def given_paths(cfg: DictConfig, folder: Path) -> DictConfig:
    """cfg with a folder under `folder` for each value the user must give (`???`: the
    adapt recipe's site)."""
    for key in OmegaConf.missing_keys(cfg):
        OmegaConf.update(cfg, key, str(folder / key))
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_configs_build_their_run_and_refuse_a_bad_value(experiment, tmp_path):
    """Each recipe is a runnable one: it passes the start-up checks, and the data module,
    the model, every callback (the fine-tuning schedule checked against the model) and
    the trainer it describes are built from it; and those checks do run on it: a bad
    value stops train() at once with a message naming the setting, before any output."""

    def recipe(*overrides: str) -> DictConfig:
        cfg = compose_config(
            "train", [f"experiment={experiment}", "model.pretrained=false", *QUIET, *overrides]
        )
        written = OmegaConf.to_container(cfg, resolve=False)
        for key, value in set_values(written).items():  # what the user must give (`???`)
            if value == "???":
                OmegaConf.update(cfg, key, str(tmp_path / key))
        return cfg

    cfg = recipe(f"paths.output_dir={tmp_path / 'run'}")
    check_train_settings(cfg)
    datamodule, model = build(cfg.data), build(cfg.model)
    assert isinstance(datamodule, CrackDataModule)
    assert isinstance(model, CrackSegmenter if experiment == "crack_maps" else CrackClassifier)
    assert model.net.hparams.image_size == datamodule.hparams.image_size
    callbacks, finetune = build_callbacks(cfg.callbacks, tmp_path / "run", model)
    assert (finetune is not None) == (cfg.callbacks.get("finetune") is not None)
    trainer = build(cfg.trainer, callbacks=callbacks, logger=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs

    bad = recipe(f"paths.output_dir={tmp_path / 'bad'}", "data.val_fraction=1.5")
    with pytest.raises(CrackLightningError, match=r"data\.val_fraction=1\.5"):
        train(bad)
    assert not (tmp_path / "bad").exists()


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


MASKED = ("crackforest", "cracktile", "masonry")


def write_data_dir(data_dir: Path) -> None:
    """A tiny D/<source> for each of the recipe's sources: class folders for METU,
    SDNET2018 (photo-NAME files, its group pattern) and the brickwork crops; photos with
    a vertical crack in their masks for the masked surfaces."""
    for seed, name in enumerate(("metu", "sdnet2018", "brickwork")):
        generate_dataset(data_dir / name, images_per_class=20, image_size=64, seed=seed)
    for path in sorted((data_dir / "sdnet2018").rglob("*.jpg")):
        path.rename(path.with_name(f"{int(path.stem) % 10}-{path.name}"))
    for name in MASKED:
        (data_dir / name).mkdir()
        for i in range(5):
            pixels = np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data_dir / name / f"p{i}.png")
            mask = np.zeros((256, 256), dtype=np.uint8)
            mask[:, 60:64] = 255
            Image.fromarray(mask, mode="L").save(data_dir / name / f"p{i}_mask.png")


def test_the_generalising_recipe_reads_every_source_from_the_data_dir(tmp_path):
    """experiment=generalize paths.data_dir=D: the data module built from it reads each
    source from D/<its name>, and cuts the masked surfaces' photos into labelled tiles."""
    data_dir = tmp_path / "D"
    write_data_dir(data_dir)
    cfg = compose_config("train", ["experiment=generalize", f"paths.data_dir={data_dir}", *QUIET])
    datamodule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    sources = datamodule.sources
    assert sources.names == ["metu", "sdnet2018", "brickwork", *MASKED]
    by_source: dict[str, list[tuple[str, int]]] = {name: [] for name in sources.names}
    for sample, index in zip(sources.samples, sources.source, strict=True):
        by_source[sources.names[index]].append(sample)
    for name, samples in by_source.items():
        paths = [path for path, _ in samples]
        photos = {Path(sample_file(path)) for path in paths}
        assert photos and all(photo.is_relative_to(data_dir / name) for photo in photos), name
        # both classes, from the class folders or from the masks
        assert {label for _, label in samples} == {0, 1}, name
        if name in MASKED:  # tiles of the 5 photos (PATH#x,y,size), never a mask
            assert len(paths) > len(photos) == 5 and all("#" in path for path in paths)
