"""The one metrics module against hand-computed figures (ties, zero division, one class),
the threshold choice on a hand-made case, and the metric names a one-source run logs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crack_lightning.errors import ModelConfigError, PredictionError
from crack_lightning.evaluation.metrics import (
    average_precision,
    binary_metrics,
    binary_scores,
    class_report,
    confusion_matrix,
    per_source_scores,
    roc_auc,
)
from crack_lightning.evaluation.threshold import (
    DEFAULT_THRESHOLD,
    choose_threshold,
    decision_threshold,
)
from crack_lightning.training.run import train

# 3 cracked, 5 not; at 0.5: 2 cracked found (0.9, 0.7), 1 missed (0.4), 2 false alarms
# (0.7, 0.6), 3 right (0.2, 0.1, 0.4). Ties: 0.7 and 0.4 each score a cracked and a sound one.
LABELS = np.array([1, 1, 1, 0, 0, 0, 0, 0])
PROBS = np.array([0.9, 0.7, 0.4, 0.7, 0.6, 0.2, 0.1, 0.4])


def test_every_metric_matches_a_hand_computation_with_ties():
    scores = binary_scores(LABELS, PROBS, 0.5)
    assert scores["acc"] == pytest.approx(5 / 8)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["precision"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert scores["bal_acc"] == pytest.approx((2 / 3 + 3 / 5) / 2)
    # of the 15 (cracked, sound) pairs: 0.9 wins 5; 0.7 wins 4 and ties 1; 0.4 wins 2, ties 1
    assert scores["auroc"] == pytest.approx((5 + 4.5 + 2.5) / 15)
    # precision at each new recall: 1 (0.9), 2/3 (0.7s), 1/2 (0.4s)
    assert average_precision(LABELS, PROBS) == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert confusion_matrix(LABELS, PROBS >= 0.5).tolist() == [[3, 2], [1, 2]]


def test_the_report_takes_each_class_in_turn_as_positive():
    report = class_report(confusion_matrix(LABELS, PROBS >= 0.5))
    assert report["Negative"]["precision"] == pytest.approx(3 / 4)
    assert report["Negative"]["recall"] == pytest.approx(3 / 5)
    assert report["Positive"]["recall"] == pytest.approx(2 / 3)
    assert report["macro avg"]["recall"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert [report[name]["support"] for name in ("Negative", "Positive", "macro avg")] == [5, 3, 8]


def test_an_empty_denominator_gives_zero_and_one_class_no_roc_auc():
    sound = np.zeros(4, dtype=int)
    scores = binary_scores(sound, np.array([0.1, 0.2, 0.3, 0.4]), 0.5)
    # nothing cracked, nothing called cracked: recall, precision and F1 divide by zero
    assert (scores["recall"], scores["precision"], scores["f1"]) == (0.0, 0.0, 0.0)
    assert scores["acc"] == scores["bal_acc"] == 1.0  # balanced: the one class present
    assert scores["auroc"] is None and roc_auc(np.ones(3), np.array([0.1, 0.5, 0.9])) is None
    assert average_precision(sound, np.full(4, 0.3)) is None
    report = binary_metrics(sound, np.array([0.1, 0.2, 0.3, 0.6]), 0.5)
    assert report["precision"] == 0.0 and report["accuracy"] == 0.75
    written = json.loads(json.dumps(report, allow_nan=False))  # no NaN anywhere
    assert written["roc_auc"] is None and written["average_precision"] is None


def test_per_source_figures_and_their_mean_only_with_several_sources():
    sources = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    both = per_source_scores(LABELS, PROBS, sources, ["a", "b"], 0.5)
    # a: cracked 0.9, 0.7, 0.4 and sound 0.7; b: only sound 0.6, 0.2, 0.1, 0.4
    assert both["a/recall"] == pytest.approx(2 / 3) and both["a/acc"] == pytest.approx(2 / 4)
    assert both["b/acc"] == both["b/bal_acc"] == pytest.approx(3 / 4)
    assert "b/auroc" not in both  # undefined for a source of one class: left out
    assert both["mean_source/bal_acc"] == pytest.approx(((2 / 3 + 0) / 2 + 3 / 4) / 2)
    # a: 0.9 beats the sound 0.7, the cracked 0.7 ties it, 0.4 loses: (1 + 0.5) / 3
    assert both["mean_source/auroc"] == both["a/auroc"] == pytest.approx(1.5 / 3)
    assert both["bal_acc"] == binary_scores(LABELS, PROBS, 0.5)["bal_acc"]  # pooled
    one = per_source_scores(LABELS, PROBS, np.zeros(8), ["a"], 0.5)
    assert one == binary_scores(LABELS, PROBS, 0.5)  # no mean_source copies


def test_threshold_choice_with_tolerance_on_a_hand_made_case():
    """Source a: cracked 0.9 0.8 0.7 0.3, sound 0.1 0.2 0.35 0.6; b: one sound photo at 0.65.
    Balanced accuracy of a is 0.75 at 0.5 and 0.875 just above 0.6 (the 0.6 false alarm
    gone); b's is 1 only above 0.65, so the mean over sources is best just above 0.65."""
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.7, 0.3, 0.1, 0.2, 0.35, 0.6, 0.65])
    sources = np.array([0] * 8 + [1])
    best = choose_threshold(labels, probs, sources, "balanced_accuracy", 1.0)
    assert 0.65 < best <= 0.7 and best == pytest.approx(0.65)
    # mean balanced accuracy: 0.375 at 0.5, 0.4375 just above 0.6, 0.9375 just above 0.65;
    # of those within the tolerance of the best, the one nearest 0.5
    assert choose_threshold(labels, probs, sources, "balanced_accuracy", 1.0, 0.4) == best
    above_06 = choose_threshold(labels, probs, sources, "balanced_accuracy", 1.0, 0.52)
    assert 0.6 < above_06 <= 0.65 and above_06 == pytest.approx(0.6)
    assert choose_threshold(labels, probs, sources, "balanced_accuracy", 1.0, 0.6) == 0.5
    # recall: mean over the sources with cracked photos (a only); highest reaching it
    assert choose_threshold(labels, probs, sources, "recall", 1.0) == 0.3
    assert choose_threshold(labels, probs, sources, "recall", 0.75) == 0.7
    with pytest.raises(ValueError, match="threshold rule 'f1'"):
        choose_threshold(labels, probs, sources, "f1", 1.0)


def test_the_decision_threshold_is_the_requested_then_the_stored_then_the_default():
    assert decision_threshold(0.3, 0.7) == 0.3
    assert decision_threshold(None, 0.7) == 0.7
    assert decision_threshold(None, None) == DEFAULT_THRESHOLD == 0.5
    with pytest.raises(PredictionError, match="threshold=1.0 must lie strictly between"):
        decision_threshold(1.0, None)


def test_a_one_source_run_logs_each_metric_once(synthetic_cfg):
    """The model logs the pooled figures; with one source there are no per-source or
    mean_source copies of them (no val/mean_source/acc beside val/acc)."""
    metrics = train(
        synthetic_cfg(
            "callbacks.source_metrics.threshold_rule=balanced_accuracy", "data.test_fraction=0.2"
        )
    )
    figures = {"acc", "bal_acc", "precision", "recall", "f1", "auroc"}
    assert {k for k in metrics if k.startswith("val/")} == {
        *(f"val/{m}" for m in figures),
        "val/loss",
        "val/threshold",
        "val/bal_acc_at_threshold",
    }
    assert {k for k in metrics if k.startswith("test")} == {
        *(f"test/{m}" for m in figures),
        "test/loss",
        *(f"test_at_threshold/{m}" for m in figures),
    }


def test_monitoring_a_mean_over_sources_of_one_source_is_refused(synthetic_cfg):
    cfg = synthetic_cfg("callbacks.early_stopping.monitor=val/mean_source/bal_acc")
    with pytest.raises(ModelConfigError, match="monitor val/bal_acc .the same figure. instead"):
        train(cfg)
