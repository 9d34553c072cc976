"""Metrics per data source and their mean, and a decision threshold chosen on validation.

Sources differ in size and crack share (SDNET2018 is ~15% cracked, METU 50%), so the
pooled accuracy mostly measures the largest source. Each source is scored on its own
(accuracy, balanced accuracy, crack recall and precision, F1, ROC-AUC), and
`mean_source/*` averages the sources with equal weight: what checkpointing and early
stopping can monitor (`val/mean_source/bal_acc`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("acc", "bal_acc", "recall", "precision", "f1", "auroc")
MEAN = "mean_source"
THRESHOLD_RULES = ("balanced_accuracy", "recall")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney statistic (ties count half); NaN with one class."""
    pos, neg = probs[labels == 1], probs[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([neg, pos]), kind="mergesort")
    values = np.concatenate([neg, pos])[order]
    ranks = np.empty(len(values))
    ranks[order] = _average_ranks(values)
    return float((ranks[len(neg) :].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _average_ranks(sorted_values: np.ndarray) -> np.ndarray:
    """1-based ranks of sorted values, tied values sharing their mean rank."""
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(sorted_values)]
    ranks = np.empty(len(sorted_values))
    for start, end in zip(starts, ends, strict=True):
        ranks[start:end] = (start + end + 1) / 2
    return ranks


def binary_scores(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """The METRICS of P(crack) against labels (1 = crack); balanced accuracy is the mean
    of crack recall and no-crack recall (the one present, with one class only)."""
    labels = np.asarray(labels).astype(int)
    preds = np.asarray(probs) >= threshold
    tp = int((preds & (labels == 1)).sum())
    tn = int((~preds & (labels == 0)).sum())
    fp = int((preds & (labels == 0)).sum())
    fn = int((~preds & (labels == 1)).sum())
    recall, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "acc": _ratio(tp + tn, len(labels)),
        "bal_acc": float(np.nanmean([recall, specificity])),
        # 0 where nothing is cracked or nothing was called cracked, as torchmetrics does
        "recall": float(np.nan_to_num(recall)),
        "precision": float(np.nan_to_num(_ratio(tp, tp + fp))),
        "f1": float(np.nan_to_num(_ratio(2 * tp, 2 * tp + fp + fn))),
        "auroc": auroc(labels, np.asarray(probs)),
    }


def per_source_scores(
    labels: np.ndarray,
    probs: np.ndarray,
    sources: np.ndarray,
    names: Sequence[str],
    threshold: float,
) -> dict[str, float]:
    """`name/metric` for every source, `mean_source/metric` (sources equally weighted)
    and the pooled `bal_acc`. With no names: one source, mean = pooled. ROC-AUC of a
    source with one class only is left out (undefined), so nothing logged is NaN."""
    pooled = binary_scores(labels, probs, threshold)
    result = {"bal_acc": pooled["bal_acc"]}
    if not names:
        result |= {f"{MEAN}/{m}": pooled[m] for m in METRICS}
        return {k: v for k, v in result.items() if not np.isnan(v)}
    per_source = []
    for index, name in enumerate(names):
        keep = sources == index
        if not keep.any():
            continue
        scores = binary_scores(labels[keep], probs[keep], threshold)
        per_source.append(scores)
        result |= {f"{name}/{m}": v for m, v in scores.items()}
    for metric in METRICS:
        values = [s[metric] for s in per_source if not np.isnan(s[metric])]
        if values:
            result[f"{MEAN}/{metric}"] = float(np.mean(values))
    return {k: v for k, v in result.items() if not np.isnan(v)}


def choose_threshold(
    labels: np.ndarray,
    probs: np.ndarray,
    sources: np.ndarray,
    rule: str,
    target_recall: float,
    tolerance: float = 0.0,
) -> float:
    """The decision threshold on P(crack) that validation data support.

    balanced_accuracy: of the thresholds whose mean-over-sources balanced accuracy is
    within `tolerance` of the best, the one nearest 0.5. With few validation photos the
    best alone can sit far out on a plateau that a new photo does not share; the
    tolerance keeps the threshold at 0.5 unless moving it gains more than that.
    recall: the highest whose mean-over-sources crack recall is at least target_recall
    (the fewest false alarms at that recall).
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {rule!r} is not one of {THRESHOLD_RULES}")
    unique = np.unique(probs)
    candidates = np.unique(np.r_[0.5, unique, np.nextafter(unique, 2.0)])
    candidates = candidates[(candidates > 0) & (candidates < 1)]
    recalls, specificities = [], []
    for source in np.unique(sources):
        pos = np.sort(probs[(sources == source) & (labels == 1)])
        neg = np.sort(probs[(sources == source) & (labels == 0)])
        nan = np.full(len(candidates), np.nan)
        recalls.append(
            (len(pos) - np.searchsorted(pos, candidates)) / len(pos) if len(pos) else nan
        )
        specificities.append(np.searchsorted(neg, candidates) / len(neg) if len(neg) else nan)
    recall = np.nanmean(recalls, axis=0)
    if rule == "balanced_accuracy":
        balanced = np.nanmean(
            np.r_[recalls, specificities].reshape(2, len(recalls), -1), axis=(0, 1)
        )
        best = np.flatnonzero(
            (balanced >= balanced.max() - tolerance) | np.isclose(balanced, balanced.max())
        )
        return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])
    reaching = np.flatnonzero(recall >= target_recall)
    return float(candidates[reaching.max()]) if len(reaching) else float(candidates.min())
