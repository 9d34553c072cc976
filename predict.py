"""Classify new photos with a trained model.

python predict.py ckpt_path=RUN/checkpoints/best.ckpt inputs=[a.jpg,dir,"photos/*.png"] output=p.csv
python predict.py ckpt_path=... inputs=[labelled_dir] mode=eval
python predict.py ckpt_path=... inputs=[big_photo.jpg] mode=scan
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from crack_lightning.inference.run import main as predict_main

    predict_main(cfg)


if __name__ == "__main__":
    main()
