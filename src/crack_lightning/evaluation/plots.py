"""Figures people would rather look at than read: confusion matrix, ROC/PR curves, image grids."""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed

from crack_lightning.io import write_atomically
from crack_lightning.settings import CLASS_NAMES

RIGHT, WRONG = "#1a7f37", "#cf222e"


def confusion_matrix_figure(matrix: np.ndarray, title: str = "Confusion matrix") -> Figure:
    """Counts and row shares; rows are true classes, columns predicted ones."""
    figure = Figure(figsize=(4.2, 3.8), dpi=100)
    axes = figure.subplots()
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, col), count in np.ndenumerate(matrix):
        colour = "white" if shares[row, col] > 0.5 else "black"
        axes.text(
            col, row, f"{count}\n{shares[row, col]:.1%}", ha="center", va="center", color=colour
        )
    axes.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=CLASS_NAMES,
        yticklabels=CLASS_NAMES,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    figure.tight_layout()
    return figure


def curve_figure(x: np.ndarray, y: np.ndarray, kind: str, area: float | None) -> Figure:
    """ROC (kind='roc') or precision-recall (kind='pr') curve with its area in the legend
    (n/a where undefined: one class only)."""
    figure = Figure(figsize=(4.2, 3.8), dpi=100)
    axes = figure.subplots()
    shown = "n/a" if area is None else f"{area:.4f}"
    if kind == "roc":
        axes.plot(x, y, label=f"AUC = {shown}")
        axes.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
        axes.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    else:
        axes.plot(x, y, label=f"AP = {shown}")
        axes.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    axes.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    axes.legend(loc="lower right" if kind == "roc" else "lower left")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def image_grid_figure(
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    correct: Sequence[bool | None],
    columns: int = 8,
) -> Figure:
    """HWC uint8 images with a title each; green/red titles when right/wrong is known."""
    if not len(images) == len(titles) == len(correct):
        raise ValueError("images, titles and correct must have the same length")
    rows = max(1, -(-len(images) // columns))
    columns = min(columns, max(1, len(images)))
    figure = Figure(figsize=(2 * columns, 2.25 * rows), dpi=80)
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for axes, image, title, ok in zip(grid.flat, images, titles, correct, strict=False):
        axes.imshow(image)
        axes.set_title(title, fontsize=8, color="black" if ok is None else RIGHT if ok else WRONG)
    figure.tight_layout()
    return figure


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG: for a file, or inlined in an HTML report."""
    buffer = BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def save(figure: Figure, path) -> None:
    """A PNG file, written atomically (crack_lightning.io)."""
    data = png_bytes(figure)
    write_atomically(Path(path), lambda handle: handle.write(data))
