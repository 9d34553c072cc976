"""The one definition of the binary metrics (Positive = crack = label 1): accuracy,
balanced accuracy, precision, recall, F1, ROC-AUC and average precision, per data source
and as a report. Training-time validation, per-source metrics, predict mode=eval, scan
evaluation and sweep summaries all take their figures from here.

Zero division: a ratio whose denominator is empty is 0.0 (as torchmetrics and scikit-learn
do by default); a figure that is undefined (ROC-AUC with one class only, average
precision without a cracked image) is None, null in JSON, and is not logged: no NaN is
ever written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crack_lightning.io import write_json, write_text
from crack_lightning.settings import CLASS_NAMES

# the figures binary_scores returns, under the names training logs them by
METRICS = ("acc", "bal_acc", "recall", "precision", "f1", "auroc")
# the mean over sources, `STAGE/mean_source/METRIC`, logged when a run has several sources
MEAN = "mean_source"


def ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray | float:
    """num / den, 0.0 where den is 0; element-wise for arrays."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    result = np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)
    return float(result) if result.ndim == 0 else result


@dataclass(frozen=True)
class Counts:
    """Confusion counts, at one threshold (ints) or at many (arrays of the same shape)."""

    tp: np.ndarray | int
    fp: np.ndarray | int
    tn: np.ndarray | int
    fn: np.ndarray | int

    def swapped(self) -> Counts:
        """The counts with Negative taken as the positive class."""
        return Counts(tp=self.tn, fp=self.fn, tn=self.tp, fn=self.fp)


def counts(labels: np.ndarray, preds: np.ndarray) -> Counts:
    """Counts of boolean predictions (True = crack) against labels (1 = crack)."""
    truth, preds = np.asarray(labels).astype(bool), np.asarray(preds).astype(bool)
    return Counts(
        tp=int((preds & truth).sum()),
        fp=int((preds & ~truth).sum()),
        tn=int((~preds & ~truth).sum()),
        fn=int((~preds & truth).sum()),
    )


def counts_at(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> Counts:
    """Counts of `probs >= t` for every t in thresholds at once (arrays like thresholds)."""
    truth, probs = np.asarray(labels).astype(bool), np.asarray(probs, dtype=float)
    pos, neg = np.sort(probs[truth]), np.sort(probs[~truth])
    tp = len(pos) - np.searchsorted(pos, thresholds, side="left")
    fp = len(neg) - np.searchsorted(neg, thresholds, side="left")
    return Counts(tp=tp, fp=fp, tn=len(neg) - fp, fn=len(pos) - tp)


def accuracy(c: Counts) -> np.ndarray | float:
    return ratio(np.add(c.tp, c.tn), np.add(c.tp, c.tn) + np.add(c.fp, c.fn))


def recall(c: Counts) -> np.ndarray | float:
    """Share of the cracked called cracked (sensitivity)."""
    return ratio(c.tp, np.add(c.tp, c.fn))


def precision(c: Counts) -> np.ndarray | float:
    """Share of those called cracked that are cracked."""
    return ratio(c.tp, np.add(c.tp, c.fp))


def f1(c: Counts) -> np.ndarray | float:
    return ratio(2 * np.asarray(c.tp), 2 * np.asarray(c.tp) + np.add(c.fp, c.fn))


def balanced_accuracy(c: Counts) -> np.ndarray | float:
    """Mean recall of the classes present (scikit-learn's definition): the mean of crack
    and no-crack recall, or the one present's recall where the labels hold one class."""
    has_pos = np.add(c.tp, c.fn) > 0
    has_neg = np.add(c.tn, c.fp) > 0
    total = recall(c) * has_pos + recall(c.swapped()) * has_neg
    return ratio(total, has_pos.astype(int) + has_neg.astype(int))


def _ranked(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores from high to low and the (true, false) positives at or above each."""
    truth, probs = np.asarray(labels).astype(bool), np.asarray(probs, dtype=float)
    order = np.argsort(-probs, kind="mergesort")
    scores, truth = probs[order], truth[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]
    tps = np.cumsum(truth)[last_of_tie]
    fps = np.cumsum(~truth)[last_of_tie]
    return scores[last_of_tie], tps, fps


def roc_curve(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates of every distinct threshold, from (0, 0) to (1, 1)."""
    _, tps, fps = _ranked(labels, probs)
    fpr, tpr = np.r_[0, fps], np.r_[0, tps]
    return ratio(fpr, fpr[-1]), ratio(tpr, tpr[-1])


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Area under the ROC curve: the chance that a cracked image scores above a sound one,
    ties counting half. None with one class only (undefined)."""
    truth = np.asarray(labels).astype(bool)
    if truth.all() or not truth.any():
        return None
    fpr, tpr = roc_curve(labels, probs)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def precision_recall_curve(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of every distinct threshold, high to low, from recall 0."""
    _, tps, fps = _ranked(labels, probs)
    rec = np.r_[0.0, ratio(tps, tps[-1])]
    prec = np.r_[1.0, ratio(tps, tps + fps)]
    return prec, rec


def average_precision(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Sum over thresholds of precision times the recall gained (scikit-learn's and
    torchmetrics' definition). None without a cracked image (recall undefined)."""
    if not np.asarray(labels).astype(bool).any():
        return None
    prec, rec = precision_recall_curve(labels, probs)
    return float(np.sum(np.diff(rec) * prec[1:]))


def binary_scores(
    labels: np.ndarray, probs: np.ndarray, threshold: float
) -> dict[str, float | None]:
    """The METRICS of P(crack) against labels (1 = crack), deciding crack at >= threshold."""
    c = counts(labels, np.asarray(probs) >= threshold)
    return {
        "acc": accuracy(c),
        "bal_acc": balanced_accuracy(c),
        "recall": recall(c),
        "precision": precision(c),
        "f1": f1(c),
        "auroc": roc_auc(labels, probs),
    }


def defined(scores: dict[str, float | None]) -> dict[str, float]:
    """The figures that are defined: what can be logged."""
    return {name: value for name, value in scores.items() if value is not None}


def per_source_scores(
    labels: np.ndarray,
    probs: np.ndarray,
    sources: np.ndarray,
    names: Sequence[str],
    threshold: float,
) -> dict[str, float]:
    """The pooled METRICS; with several sources also `SOURCE/METRIC` for each and
    `mean_source/METRIC` (sources equally weighted: SDNET2018 is ~15% cracked, METU 50%,
    so the pooled figure mostly measures the largest source). With one source the mean
    would repeat the pooled figures, so there is none. Undefined figures are left out."""
    labels, probs, sources = np.asarray(labels), np.asarray(probs), np.asarray(sources)
    result = defined(binary_scores(labels, probs, threshold))
    if len(names) < 2:
        return result
    each = []
    for index, name in enumerate(names):
        keep = sources == index
        if keep.any():
            scores = defined(binary_scores(labels[keep], probs[keep], threshold))
            each.append(scores)
            result |= {f"{name}/{m}": v for m, v in scores.items()}
    for metric in METRICS:
        values = [s[metric] for s in each if metric in s]
        if values:
            result[f"{MEAN}/{metric}"] = float(np.mean(values))
    return result


def confusion_matrix(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """2x2 counts: rows true Negative/Positive, columns predicted Negative/Positive."""
    c = counts(labels, preds)
    return np.array([[c.tn, c.fp], [c.fn, c.tp]], dtype=np.int64)


def class_report(matrix: np.ndarray) -> dict[str, dict[str, float]]:
    """Per-class precision, recall, F1 and support, each class in turn taken as positive."""
    (tn, fp), (fn, tp) = np.asarray(matrix).tolist()
    positive = Counts(tp=tp, fp=fp, tn=tn, fn=fn)
    report = {}
    for name, c in zip(CLASS_NAMES, (positive.swapped(), positive), strict=True):
        report[name] = {
            "precision": precision(c),
            "recall": recall(c),
            "f1": f1(c),
            "support": int(c.tp + c.fn),
        }
    report["macro avg"] = {
        key: float(np.mean([report[name][key] for name in CLASS_NAMES]))
        for key in ("precision", "recall", "f1")
    } | {"support": int(np.asarray(matrix).sum())}
    return report


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """predict mode=eval's report: binary_scores (Positive = crack) under their long
    names, average precision, the confusion matrix and the per-class report."""
    scores = binary_scores(labels, probs, threshold)
    matrix = confusion_matrix(labels, np.asarray(probs) >= threshold)
    return {
        "images": len(labels),
        "threshold": threshold,
        "accuracy": scores["acc"],
        "balanced_accuracy": scores["bal_acc"],
        "precision": scores["precision"],
        "recall": scores["recall"],
        "f1": scores["f1"],
        "roc_auc": scores["auroc"],
        "average_precision": average_precision(labels, probs),
        "confusion_matrix": {
            "rows_true_cols_predicted": list(CLASS_NAMES),
            "counts": matrix.tolist(),
        },
        "classification_report": class_report(matrix),
    }


def figure(value: float | None) -> str:
    """A figure for people: 4 decimals, n/a where undefined."""
    return "n/a" if value is None else f"{value:.4f}"


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
        f"accuracy {figure(metrics['accuracy'])}   "
        f"balanced accuracy {figure(metrics['balanced_accuracy'])}   "
        f"ROC-AUC {figure(metrics['roc_auc'])}   AP {figure(metrics['average_precision'])}   "
        f"threshold {metrics['threshold']}",
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
    # matplotlib is imported where figures are drawn, not by training's metrics
    from crack_lightning.evaluation.plots import confusion_matrix_figure, curve_figure, save

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
    write_json(written[0], metrics)
    write_text(written[1], format_report(metrics) + "\n")
    save(confusion_matrix_figure(np.array(metrics["confusion_matrix"]["counts"])), written[2])
    fpr, tpr = roc_curve(labels, probs)
    save(curve_figure(fpr, tpr, "roc", metrics["roc_auc"]), written[3])
    prec, rec = precision_recall_curve(labels, probs)
    save(curve_figure(rec, prec, "pr", metrics["average_precision"]), written[4])
    return written
