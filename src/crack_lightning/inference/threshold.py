"""The decision threshold on P(crack): the one chosen on validation and stored with the
model (checkpoint["decision_threshold"], ONNX metadata "decision_threshold"), unless
the user sets threshold= explicitly."""

from __future__ import annotations

from collections.abc import Mapping

from crack_lightning.errors import PredictionError

# what a model trained before thresholds were stored (or without a threshold rule) uses
UNTUNED_THRESHOLD = 0.5
METADATA_KEY = "decision_threshold"


def stored_threshold(checkpoint: Mapping) -> float | None:
    """The threshold a training checkpoint carries, if any."""
    entry = checkpoint.get(METADATA_KEY)
    return float(entry["threshold"]) if entry else None


def decision_threshold(requested: float | None, stored: float | None) -> float:
    """threshold= when given, else the stored one, else 0.5; always inside (0, 1)."""
    threshold = requested if requested is not None else stored
    threshold = UNTUNED_THRESHOLD if threshold is None else float(threshold)
    if not 0 < threshold < 1:
        raise PredictionError(f"threshold={threshold} must lie strictly between 0 and 1.")
    return threshold
