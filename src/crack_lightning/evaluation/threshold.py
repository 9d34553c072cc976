"""The decision threshold on P(crack): chosen on validation (SourceMetrics), stored with
the model (checkpoint["decision_threshold"], ONNX metadata "decision_threshold"), and
used by predict, scan and export unless the user sets threshold= explicitly."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Literal

import numpy as np

from crack_lightning.errors import PredictionError
from crack_lightning.evaluation.metrics import balanced_accuracy, counts_at, recall

# the one untuned threshold: what training's metrics use, and what a model trained
# without a threshold rule (or before thresholds were stored) decides by
DEFAULT_THRESHOLD = 0.5
METADATA_KEY = "decision_threshold"
# how callbacks.source_metrics.threshold_rule (training/validation.py) chooses the
# threshold on validation
ThresholdRule = Literal["balanced_accuracy", "recall"]
THRESHOLD_RULES = typing.get_args(ThresholdRule)


def stored_threshold(checkpoint: Mapping) -> float | None:
    """The threshold a training checkpoint carries, if any."""
    entry = checkpoint.get(METADATA_KEY)
    return float(entry["threshold"]) if entry else None


def decision_threshold(requested: float | None, stored: float | None) -> float:
    """threshold= when given, else the stored one, else the default; always inside (0, 1)."""
    threshold = requested if requested is not None else stored
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if not 0 < threshold < 1:
        raise PredictionError(f"threshold={threshold} must lie strictly between 0 and 1.")
    return threshold


def choose_threshold(
    labels: np.ndarray,
    probs: np.ndarray,
    sources: np.ndarray,
    rule: ThresholdRule,
    target_recall: float,
    tolerance: float = 0.0,
) -> float:
    """The decision threshold on P(crack) that validation data support.

    balanced_accuracy: of the thresholds whose mean-over-sources balanced accuracy is
    within `tolerance` of the best, the one nearest the default. With few validation
    photos the best alone can sit far out on a plateau that a new photo does not share;
    the tolerance keeps the default unless moving it gains more than that.
    recall: the highest whose mean-over-sources crack recall (of the sources with cracked
    images) is at least target_recall (the fewest false alarms at that recall).
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {rule!r} is not one of {THRESHOLD_RULES}")
    labels, probs, sources = np.asarray(labels), np.asarray(probs, float), np.asarray(sources)
    unique = np.unique(probs)
    candidates = np.unique(np.r_[DEFAULT_THRESHOLD, unique, np.nextafter(unique, 2.0)])
    candidates = candidates[(candidates > 0) & (candidates < 1)]
    per_source = [
        counts_at(labels[sources == s], probs[sources == s], candidates) for s in np.unique(sources)
    ]
    if rule == "balanced_accuracy":
        balanced = np.mean([balanced_accuracy(c) for c in per_source], axis=0)
        best = np.flatnonzero(
            (balanced >= balanced.max() - tolerance) | np.isclose(balanced, balanced.max())
        )
        return float(candidates[best[np.argmin(np.abs(candidates[best] - DEFAULT_THRESHOLD))]])
    cracked = [c for c in per_source if np.any(np.add(c.tp, c.fn) > 0)]
    if not cracked:
        return float(candidates.min())
    reaching = np.flatnonzero(np.mean([recall(c) for c in cracked], axis=0) >= target_recall)
    return float(candidates[reaching.max()]) if len(reaching) else float(candidates.min())
