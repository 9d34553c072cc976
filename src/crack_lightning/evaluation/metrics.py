"""Metrics of a labelled set of predictions, as a report and as figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
    binary_roc,
)

from crack_lightning.evaluation.plots import confusion_matrix_figure, curve_figure, save
from crack_lightning.settings import CLASS_NAMES


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def confusion_matrix(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """2x2 counts: rows true Negative/Positive, columns predicted Negative/Positive."""
    matrix = np.zeros((2, 2), dtype=np.int64)
    np.add.at(matrix, (labels.astype(int), preds.astype(int)), 1)
    return matrix


def class_report(matrix: np.ndarray) -> dict[str, dict[str, float]]:
    """Per-class precision, recall, F1 and support, each class in turn taken as positive."""
    report = {}
    for label, name in enumerate(CLASS_NAMES):
        true_pos = matrix[label, label]
        precision = _ratio(true_pos, matrix[:, label].sum())
        recall = _ratio(true_pos, matrix[label, :].sum())
        report[name] = {
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "support": int(matrix[label, :].sum()),
        }
    report["macro avg"] = {
        key: float(np.mean([report[name][key] for name in CLASS_NAMES]))
        for key in ("precision", "recall", "f1")
    } | {"support": int(matrix.sum())}
    return report


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """Accuracy, precision, recall, F1 (Positive = crack), ROC-AUC, AP and the matrix."""
    matrix = confusion_matrix(labels, probs >= threshold)
    per_class = class_report(matrix)
    both = len(set(labels.tolist())) == 2
    target, scores = torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(probs)
    return {
        "images": len(labels),
        "threshold": threshold,
        "accuracy": _ratio(np.trace(matrix), matrix.sum()),
        "precision": per_class["Positive"]["precision"],
        "recall": per_class["Positive"]["recall"],
        "f1": per_class["Positive"]["f1"],
        "roc_auc": float(binary_auroc(scores, target)) if both else float("nan"),
        "average_precision": float(binary_average_precision(scores, target))
        if both
        else float("nan"),
        "confusion_matrix": {
            "rows_true_cols_predicted": list(CLASS_NAMES),
            "counts": matrix.tolist(),
        },
        "classification_report": per_class,
    }


def format_report(metrics: dict) -> str:
    """A plain-text report like scikit-learn's classification_report, plus the matrix."""
    lines = [f"{'':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for name, row in metrics["classification_report"].items():
        lines.append(
            f"{name:>12} {row['precision']:9.4f} {row['recall']:9.4f} {row['f1']:9.4f} "
            f"{row['support']:8d}"
        )
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]["counts"]
    lines += [
        "",
        f"accuracy {metrics['accuracy']:.4f}   ROC-AUC {metrics['roc_auc']:.4f}   "
        f"AP {metrics['average_precision']:.4f}   threshold {metrics['threshold']}",
        "confusion matrix (rows true, columns predicted):",
        f"{'':>12} {'Negative':>9} {'Positive':>9}",
        f"{'Negative':>12} {tn:9d} {fp:9d}",
        f"{'Positive':>12} {fn:9d} {tp:9d}",
    ]
    return "\n".join(lines)


def write_evaluation(
    metrics: dict, labels: np.ndarray, probs: np.ndarray, folder: Path
) -> list[Path]:
    """metrics.json, report.txt and the confusion-matrix, ROC and PR figures."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        folder / name
        for name in (
            "metrics.json",
            "report.txt",
            "confusion_matrix.png",
            "roc_curve.png",
            "pr_curve.png",
        )
    ]
    written[0].write_text(json.dumps(metrics, indent=2) + "\n")
    written[1].write_text(format_report(metrics) + "\n")
    save(confusion_matrix_figure(np.array(metrics["confusion_matrix"]["counts"])), written[2])
    target, scores = torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(probs)
    fpr, tpr, _ = binary_roc(scores, target)
    save(curve_figure(fpr.numpy(), tpr.numpy(), "roc", metrics["roc_auc"]), written[3])
    precision, recall, _ = binary_precision_recall_curve(scores, target)
    save(
        curve_figure(recall.numpy(), precision.numpy(), "pr", metrics["average_precision"]),
        written[4],
    )
    return written
