"""Train a concrete-crack classifier: `python train.py model=mobilenetv2 trainer.max_epochs=10`."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from crack_lightning.naming import register_resolvers

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from crack_lightning.training import main as train_main

    return train_main(cfg)


if __name__ == "__main__":
    main()
