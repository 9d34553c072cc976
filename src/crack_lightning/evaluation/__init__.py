"""Evaluation: binary-classification metrics and the figures drawn from them, shared by
training (TensorBoard) and prediction (mode=eval reports).

Public API: `binary_metrics`, `confusion_matrix`.
"""

from crack_lightning.evaluation.metrics import binary_metrics, confusion_matrix

__all__ = ["binary_metrics", "confusion_matrix"]
