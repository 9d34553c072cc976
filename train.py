"""Train a concrete-crack classifier: `python train.py model=mobilenetv2 trainer.max_epochs=10`.

The same command as `crack-train`; `python train.py --help` lists the settings.
"""

from crack_lightning.commands.train import train

if __name__ == "__main__":
    train()
