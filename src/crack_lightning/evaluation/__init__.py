"""Evaluation: binary-classification metrics and the figures drawn from them, shared by
training (TensorBoard) and prediction (mode=eval reports).

Public API: `metrics.binary_metrics`, `metrics.confusion_matrix`. Nothing is imported
here, so that a command loads only the modules it uses.
"""
