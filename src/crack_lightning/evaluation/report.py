"""predict.py mode=eval's page: one offline HTML file per run (report_dir/report.html).

What an inspector looks at instead of reading CSV files: the metrics table (all images,
and each source: an input folder), the ROC and precision-recall curves and the confusion
matrix (the figures of evaluation/plots.py), the worst mistakes per source as
thumbnails (the most confident wrong decisions), and the suspect labels
(evaluation/suspects.py). Written as every offline page is (evaluation/html_page.py):
images inlined, no script, no external address.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from crack_lightning.evaluation.html_page import html_page, image_png, inline_image
from crack_lightning.evaluation.metrics import (
    binary_metrics,
    figure,
    precision_recall_curve,
    roc_curve,
)
from crack_lightning.evaluation.plots import confusion_matrix_figure, curve_figure, png_bytes
from crack_lightning.evaluation.suspects import (
    grouped_suspects,
    suspect_rows,
    thumbnail,
    worst_mistakes,
    write_suspects,
)
from crack_lightning.io import write_text
from crack_lightning.settings import CLASS_NAMES

REPORT_NAME = "report.html"
THUMBNAIL_PX = 128
# the metrics table's columns: (binary_metrics key, heading)
TABLE = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("f1", "F1"),
    ("roc_auc", "ROC-AUC"),
    ("average_precision", "AP"),
)
STYLE = """
.figures img { width: 336px; margin-right: 0.5em; }
.thumbs { display: flex; flex-wrap: wrap; gap: 0.6em; }
.thumbs figure { margin: 0; width: 140px; font-size: 11px; overflow-wrap: anywhere; }
.thumbs img { width: 128px; height: 128px; border: 3px solid #cf222e; }
"""


@dataclass(frozen=True)
class EvalRun:
    """What was scored: every image's path, label (1 = crack) and P(crack), the threshold,
    and the sources as (name, indices) (a file may be in several)."""

    paths: Sequence[str | Path]
    labels: np.ndarray
    probs: np.ndarray
    threshold: float
    groups: Sequence[tuple[str, Sequence[int]]]
    model: str


def metrics_table(run: EvalRun, sections: Sequence[tuple[str, np.ndarray]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("source", "images", "cracked", *(h for _, h in TABLE)))
    rows = []
    for name, members in sections:
        metrics = binary_metrics(run.labels[members], run.probs[members], run.threshold)
        cells = [html.escape(name), str(len(members)), str(int(run.labels[members].sum()))]
        cells += [figure(metrics[key]) for key, _ in TABLE]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def figures_html(run: EvalRun, name: str, members: np.ndarray) -> str:
    """ROC, precision-recall and confusion matrix of one section, side by side."""
    labels, probs = run.labels[members], run.probs[members]
    metrics = binary_metrics(labels, probs, run.threshold)
    fpr, tpr = roc_curve(labels, probs)
    prec, rec = precision_recall_curve(labels, probs)
    drawn = {
        "ROC": curve_figure(fpr, tpr, "roc", metrics["roc_auc"]),
        "precision-recall": curve_figure(rec, prec, "pr", metrics["average_precision"]),
        "confusion matrix": confusion_matrix_figure(
            np.array(metrics["confusion_matrix"]["counts"]), title=f"Confusion matrix: {name}"
        ),
    }
    images = "".join(inline_image(png_bytes(f), f"{kind}, {name}") for kind, f in drawn.items())
    return f'<div class="figures">{images}</div>'


def thumbnails_html(items: Sequence[tuple[str, str]]) -> str:
    """(path, caption) pairs as inlined thumbnails with their caption and path."""
    cells = []
    for path, caption in items:
        image = thumbnail(path, THUMBNAIL_PX)
        picture = inline_image(image_png(image), path) if image is not None else "(unreadable)"
        cells.append(
            f"<figure>{picture}<figcaption><b>{html.escape(caption)}</b><br>"
            f"{html.escape(str(path))}</figcaption></figure>"
        )
    return f'<div class="thumbs">{"".join(cells)}</div>'


def mistakes_html(run: EvalRun, members: np.ndarray, limit: int) -> str:
    worst = members[worst_mistakes(run.labels[members], run.probs[members], run.threshold, limit)]
    if not len(worst):
        return '<p class="note">No mistake at this threshold.</p>'
    return thumbnails_html(
        [
            (
                str(run.paths[i]),
                f"true {CLASS_NAMES[int(run.labels[i])]}, P(crack) {run.probs[i]:.3f}",
            )
            for i in worst
        ]
    )


def suspects_html(rows: Sequence[dict], shown: int) -> str:
    """The suspect labels: how many, the first `shown` as thumbnails."""
    if not rows:
        return (
            '<p class="note">No label looks wrong to the model (where the images are of '
            "one class only, confident learning has nothing to compare with).</p>"
        )
    intro = (
        f"<p>{len(rows)} label(s) that confident learning (cleanlab) flags: the model "
        f"disagrees with them more confidently than it usually agrees with that class. "
        f"All are listed, ranked, in suspect_labels.csv; the first {min(shown, len(rows))} "
        f"here. Look at each: a plain crack labelled Negative is a label error; gravel, a "
        f"joint or a stain is a true hard negative.</p>"
    )
    return intro + thumbnails_html(
        [
            (
                row["path"],
                f"#{row['rank']} labelled {row['given_label']}, "
                f"P(crack) {row['prob_crack']:.3f} ({row['source']})",
            )
            for row in rows[:shown]
        ]
    )


def report_html(run: EvalRun, suspects: Sequence[dict], worst: int, shown: int) -> str:
    everything = np.arange(len(run.labels))
    sections = [("all", everything)]
    if len(run.groups) > 1:
        sections += [(name, np.asarray(members)) for name, members in run.groups]
    parts = [
        f"<h1>Evaluation of {html.escape(run.model)}</h1>",
        f'<p class="note">{len(run.labels)} images, decided crack at P(crack) &ge; '
        f"{run.threshold:g}; written {datetime.now().isoformat(timespec='seconds')}.</p>",
        "<h2>Metrics</h2>",
        metrics_table(run, sections),
    ]
    for name, members in sections:
        parts += [f"<h2>{html.escape(name)}</h2>", figures_html(run, name, members)]
        if worst > 0 and (name != "all" or len(sections) == 1):  # per source
            parts += [
                f"<h3>Worst mistakes: {html.escape(name)}</h3>",
                f'<p class="note">The {worst} most confident wrong decisions at most.</p>',
                mistakes_html(run, members, worst),
            ]
    parts += ["<h2>Suspect labels</h2>", suspects_html(suspects, shown)]
    return html_page(f"Evaluation: {run.model}", "\n".join(parts), STYLE)


def first_source(count: int, groups: Sequence[tuple[str, Sequence[int]]]) -> np.ndarray:
    """Each image's source as an index into `groups`: the first that holds it."""
    source = np.full(count, -1, dtype=int)
    for number, (_, members) in reversed(list(enumerate(groups))):
        source[np.asarray(members, dtype=int)] = number
    return source


def write_review(
    folder: Path, run: EvalRun, html_report: bool, worst: int, shown: int
) -> tuple[list[Path], int]:
    """mode=eval's review: suspect_labels.csv (and .png with the first `shown`), ranked
    within each source, and report.html (when `html_report`) with `worst` mistakes per
    source. Returns the files written and the number of suspect labels."""
    source = first_source(len(run.labels), run.groups)
    names = [run.groups[s][0] if s >= 0 else "all" for s in source]
    indices, quality = grouped_suspects(run.labels, run.probs, source)
    rows = suspect_rows(indices, run.paths, run.labels, run.probs, quality, names)
    written = write_suspects(folder, rows, shown)
    if html_report:
        written.append(folder / REPORT_NAME)
        write_text(written[-1], report_html(run, rows, worst, shown))
    return written, len(rows)
