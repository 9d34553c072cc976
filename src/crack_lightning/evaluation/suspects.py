"""Labels that look wrong, and the mistakes the model is surest of: one ranking for both.

Both rank images by how confidently the model disagrees with their label, the
self-confidence P(given label) (low first). The worst mistakes are the images decided
against their label (at the threshold), in that order. The suspect labels are those
cleanlab's confident learning (Northcutt et al., 2021) flags as likely mislabelled: an
image is flagged when the model gives the other class more than that class's own images
get on average (per-class thresholds), pruned to the number of label errors the
estimated noise rates predict; `cleanlab.filter.find_label_issues` with
`cleanlab.rank.get_label_quality_scores`. The probabilities must be out-of-sample (the
model never trained on these images: a validation split, a held-out folder),
or the model has learnt the wrong labels and agrees with them.

predict.py mode=eval (the HTML report) and training (training/validation.py, on the
validation split) both call this module.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crack_lightning.data.decode import load_sample
from crack_lightning.evaluation.plots import image_grid_figure, save
from crack_lightning.io import write_csv
from crack_lightning.settings import CLASS_NAMES

log = logging.getLogger(__name__)

SUSPECT_COLUMNS = ("rank", "path", "source", "given_label", "prob_crack", "quality")
SUSPECTS_CSV, SUSPECTS_PNG = "suspect_labels.csv", "suspect_labels.png"


def label_quality(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """P(given label) of each image, in [0, 1]: cleanlab's self-confidence score, low =
    the model disagrees confidently."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=float)
    return np.where(labels == 1, probs, 1.0 - probs)


def worst_mistakes(
    labels: np.ndarray, probs: np.ndarray, threshold: float, limit: int
) -> np.ndarray:
    """Indices of at most `limit` wrongly decided images, the most confident mistake first."""
    labels = np.asarray(labels).astype(int)
    wrong = np.flatnonzero((np.asarray(probs) >= threshold).astype(int) != labels)
    order = np.argsort(label_quality(labels[wrong], np.asarray(probs)[wrong]), kind="stable")
    return wrong[order][: max(0, limit)]


def _pred_probs(probs: np.ndarray) -> np.ndarray:
    """cleanlab's (N, 2) class probabilities from P(crack), rows summing to 1."""
    crack = np.clip(np.asarray(probs, dtype=float), 0.0, 1.0)
    return np.stack([1.0 - crack, crack], axis=1)


def suspect_labels(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the suspect labels, most confident disagreement first; every image's
    label quality). Labels of one class give none: confident learning compares how sure
    the model is of each class's images with the other class's."""
    labels = np.asarray(labels).astype(int)
    quality = label_quality(labels, probs)
    if len(np.unique(labels)) < 2:
        return np.zeros(0, dtype=int), quality
    from cleanlab.filter import find_label_issues  # imported where used: ~1 s

    with warnings.catch_warnings():  # "too few examples in class": the ranking still holds
        warnings.simplefilter("ignore")
        ranked = find_label_issues(
            labels,
            _pred_probs(probs),
            return_indices_ranked_by="self_confidence",
            n_jobs=1,  # no worker processes: the ranking of a few thousand images is instant
        )
    return np.asarray(ranked, dtype=int), quality


def grouped_suspects(
    labels: np.ndarray, probs: np.ndarray, sources: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """suspect_labels within each source (sources differ in class balance and in how sure
    the model is, so each gets its own per-class thresholds), merged into one ranking by
    label quality. `sources`: an integer per image. A source of one class (a Negative/
    folder given alone) has no threshold of its own for the other class: its suspects
    are those of all images together."""
    sources, labels, probs = np.asarray(sources), np.asarray(labels), np.asarray(probs)
    quality = label_quality(labels, probs)
    pooled = None
    found = []
    for source in np.unique(sources):
        members = np.flatnonzero(sources == source)
        if len(np.unique(labels[members])) == 2:
            ranked, _ = suspect_labels(labels[members], probs[members])
            found.append(members[ranked])
            continue
        if pooled is None:
            pooled, _ = suspect_labels(labels, probs)
        found.append(pooled[sources[pooled] == source])
    merged = np.concatenate(found) if found else np.zeros(0, dtype=int)
    return merged[np.argsort(quality[merged], kind="stable")], quality


def suspect_rows(
    indices: np.ndarray,
    paths: Sequence[str | Path],
    labels: np.ndarray,
    probs: np.ndarray,
    quality: np.ndarray,
    source_names: Sequence[str],
) -> list[dict]:
    """SUSPECT_COLUMNS rows, rank 1 the most confident disagreement. `source_names`: the
    source of every image."""
    return [
        {
            "rank": rank,
            "path": str(paths[i]),
            "source": source_names[i],
            "given_label": CLASS_NAMES[int(labels[i])],
            "prob_crack": round(float(probs[i]), 6),
            "quality": round(float(quality[i]), 6),
        }
        for rank, i in enumerate(indices, start=1)
    ]


def thumbnail(sample: str | Path, size: int) -> np.ndarray | None:
    """An image (or a photo's tile) as HWC uint8 at size x size; None if it cannot be read
    any more (the list still names it)."""
    try:
        return np.asarray(load_sample(sample).convert("RGB").resize((size, size)))
    except Exception as err:  # a file gone or damaged since it was scored
        log.warning("No thumbnail for %s: %s", sample, err)
        return None


def mistake_grid(rows: Sequence[dict], size: int = 128, columns: int = 8):
    """A figure of the rows' images (path, given_label, prob_crack) titled with the label
    and P(crack) in red: what the model disputes. None when no image can be read."""
    shown = [(row, thumbnail(row["path"], size)) for row in rows]
    shown = [(row, image) for row, image in shown if image is not None]
    if not shown:
        return None
    return image_grid_figure(
        [image for _, image in shown],
        [f"labelled {row['given_label']}\nP(crack) {row['prob_crack']:.2f}" for row, _ in shown],
        [False] * len(shown),
        columns=columns,
    )


def write_suspects(folder: Path, rows: list[dict], grid_limit: int) -> list[Path]:
    """suspect_labels.csv (every suspect, ranked) and suspect_labels.png (the first
    `grid_limit`; none when 0 or no suspect)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / SUSPECTS_CSV]
    write_csv(written[0], SUSPECT_COLUMNS, rows)
    figure = mistake_grid(rows[:grid_limit]) if grid_limit > 0 else None
    if figure is not None:
        written.append(folder / SUSPECTS_PNG)
        save(figure, written[-1])
    return written
