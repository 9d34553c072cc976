"""Errors a user can fix: each message names the file or setting at fault and the fix."""


class CrackLightningError(Exception):
    """Base class; entry points print these without a traceback."""


class ConfigError(CrackLightningError):
    """A setting has the wrong type or lies outside its range (the message says which)."""


class DataError(CrackLightningError):
    """The data set on disk is missing or not laid out as expected."""


class ModelConfigError(ConfigError):
    """A model setting (backbone name, scheduler, ...) is not valid."""


class WeightsError(CrackLightningError):
    """Pretrained weights cannot be downloaded, read or matched to the backbone."""


class PredictionError(CrackLightningError):
    """A checkpoint, exported model or set of inputs cannot be used for prediction."""


class UnreadableImage(CrackLightningError):
    """One input file is not an image we can decode; it is skipped, with this reason."""


class RunDirError(CrackLightningError):
    """A run or sweep directory (or its checkpoint) is missing or not what was expected."""


class WriteError(CrackLightningError):
    """A file cannot be written where the settings put it: a full disk, no permission, a
    read-only folder, a file where a folder should be (io.py names the file and cause)."""


class DamagedImage(DataError):
    """A training image cannot be decoded and data.on_bad_image=stop."""

    def __str__(self) -> str:
        # re-raised from a DataLoader worker, the message carries that worker's traceback;
        # keep our one line
        text = super().__str__()
        if "Original Traceback" in text:
            return text.rstrip().rsplit(f"{type(self).__name__}: ", 1)[-1]
        return text
