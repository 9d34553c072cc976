"""Train a concrete-crack classifier: `python train.py model=mobilenetv2 trainer.max_epochs=10`."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from crack_lightning.training.job_names import register_resolvers

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
CONF_DIR = Path(__file__).resolve().parent / "conf"
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from crack_lightning.training.run import main as train_main

    return train_main(cfg)


def prepare_command_line() -> None:
    """What must happen before Hydra picks the run directory: complete `ckpt_path=last`
    with the run to continue, refuse torchrun/srun launches that name no shared one, and
    refuse a run directory another live run holds (before Hydra writes into it)."""
    from crack_lightning.errors import CrackLightningError
    from crack_lightning.training.distributed import launch_argv
    from crack_lightning.training.resume import resume_argv
    from crack_lightning.training.run_lock import refuse_busy_run_dir

    try:
        sys.argv = resume_argv(launch_argv(sys.argv), CONF_DIR)
        refuse_busy_run_dir(sys.argv)
    except CrackLightningError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    prepare_command_line()
    main()
