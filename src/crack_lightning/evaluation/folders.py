"""Cross-dataset evaluation: each labelled input folder scored on its own, plus a table.

`predict.py mode=eval inputs=[metu_dir,sdnet_dir,brick_dir]` writes, besides the pooled
report, REPORT_DIR/<folder>/ (metrics.json, report.txt, figures) for every input,
and summary.csv, summary.md and TensorBoard scalars/text (REPORT_DIR/tensorboard).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crack_lightning.data.decode import collect_inputs
from crack_lightning.evaluation.metrics import (
    METRICS,
    binary_metrics,
    binary_scores,
    figure,
    write_evaluation,
)
from crack_lightning.io import write_csv, write_text

SUMMARY_COLUMNS = ("input", "images", "cracked", *METRICS)


def input_names(inputs: Sequence[str]) -> list[str]:
    """A short, unique folder name per input (its last path part, numbered on clashes)."""
    names: list[str] = []
    for item in inputs:
        base = Path(str(item).rstrip("/*")).name or "input"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def input_members(inputs: Sequence[str], files: Sequence[Path]) -> list[tuple[str, list[int]]]:
    """(name, indices into `files`) of each input that holds any of them: predict's
    sources (files from several inputs count in each)."""
    index = {Path(f): i for i, f in enumerate(files)}
    groups = []
    for name, item in zip(input_names(inputs), inputs, strict=True):
        found, _ = collect_inputs([str(item)])
        members = [index[f] for f in found if f in index]
        if members:
            groups.append((name, members))
    return groups


def evaluate_inputs(
    groups: Sequence[tuple[str, list[int]]],
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    report_dir: Path,
) -> list[dict]:
    """One row of SUMMARY_COLUMNS per input of `groups` (input_members)."""
    rows = []
    for name, members in groups:
        true, scores = labels[members], probs[members]
        write_evaluation(binary_metrics(true, scores, threshold), true, scores, report_dir / name)
        rows.append(
            {"input": name, "images": len(members), "cracked": int(true.sum())}
            | binary_scores(true, scores, threshold)
        )
    write_summary(rows, report_dir, threshold)
    return rows


def _cell(value: float | int | str | None) -> str:
    return figure(value) if value is None or isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = SUMMARY_COLUMNS) -> str:
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(rows: Sequence[dict], report_dir: Path, threshold: float) -> None:
    """summary.csv, summary.md and TensorBoard (one scalar per input and metric)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    write_csv(report_dir / "summary.csv", SUMMARY_COLUMNS, rows)
    table = markdown_table(rows)
    write_text(report_dir / "summary.md", f"threshold {threshold}\n\n{table}\n")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(report_dir / "tensorboard")) as writer:
        for row in rows:
            for metric in METRICS:
                if row[metric] is not None:  # ROC-AUC of a one-class folder is undefined
                    writer.add_scalar(f"eval/{row['input']}/{metric}", row[metric], 0)
        writer.add_text("eval/summary", f"threshold {threshold}\n\n{table}", 0)
