"""Reading PyTorch files safely: tensors and plain containers only, never pickled code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from crack_lightning.errors import CrackLightningError


def load_safely(
    path: str | Path, setting: str, error: type[CrackLightningError], missing_hint: str
) -> Any:
    """torch.load(weights_only=True) with errors that name the setting and how to fix it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{setting}={path} does not exist. {missing_hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe files
        raise error(
            f"{setting}={path} could not be read as a tensors-only PyTorch file: {err}"
        ) from None
