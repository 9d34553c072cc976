"""Data: finding, fetching, checking, splitting and decoding crack images.

Public API: `datamodule.CrackDataModule` (the LightningDataModule of train.py),
`sources.scan_samples` (the labelled files under a data.root), `decode.load_rgb` and
`decode.decode` (the one decoder of every image). The class names are
`crack_lightning.settings.CLASS_NAMES`. Nothing is imported here, so that a command
loads only the modules it uses.
"""
