"""Reading PyTorch files safely: tensors and plain containers only, never pickled code."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from crack_lightning.errors import CrackLightningError


def load_safely(
    path: str | Path, setting: str, error: type[CrackLightningError], missing_hint: str
) -> Any:
    """torch.load(weights_only=True) with one-line errors that name the setting and file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{setting}={path} does not exist. {missing_hint}")
    if path.stat().st_size == 0:
        raise error(f"{setting}={path} is empty (0 bytes): not a PyTorch file. {missing_hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe files
        raise error(
            f"{setting}={path} could not be read as a tensors-only PyTorch file: "
            f"{load_error_reason(err)}"
        ) from None


def load_error_reason(err: Exception) -> str:
    """torch.load's error in one line, without its advice to load with weights_only=False
    (which would run whatever code the file holds)."""
    if isinstance(err, EOFError):
        return "the file ends early (cut short while being written or copied)."
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
        kept = [
            part
            for part in str(err).split("\n\n")
            if part.strip()
            and "weights_only" not in part
            and not part.startswith("Check the documentation")
        ]
        detail = " ".join(kept).strip()
        if "GLOBAL" not in detail:  # the unpickler met bytes that are no pickle at all
            return f"not a PyTorch file ({detail})."
        return f"it holds more than tensors, refused for safety ({detail})."
    if isinstance(err, KeyError | pickle.UnpicklingError | UnicodeDecodeError):
        return "not a PyTorch file."
    first = str(err).split(". ")[0].replace("\n", " ").strip()
    return f"corrupt or truncated ({type(err).__name__}: {first})."
