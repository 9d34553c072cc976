"""What adapting changed on the site: its held-out photos scanned with the start checkpoint
(init_from) and with the adapted one, each scored against its mask as crack-scan-eval
scores it (evaluation/scan_masks.py). A short table per folder goes to the log, and one
offline page, RUN/before_after.html (evaluation/html_page.py: overlays inlined, no
script), shows the table and each photo's two overlays side by side with its figures.

Both warn where a crack found before is no longer found: fewer of the mask's cracked
tiles found after adapting than before (`lost_cracks`), per folder and per photo.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from crack_lightning.evaluation.html_page import html_page, inline_image, thumbnail_jpeg
from crack_lightning.io import write_text

PAGE_NAME = "before_after.html"
# the figures compared before -> after: (scan_masks' row or photo key, heading)
COMPARED = (
    ("precision", "tile P"),
    ("recall", "tile R"),
    ("f1", "tile F1"),
    ("pixel_f1", "pixel F1"),
)
STYLE = """
td img { max-width: 320px; max-height: 320px; display: block; }
td + td { white-space: nowrap; }
tr.lost td { background: #fff0f0; }
.warn { color: #b00020; font-weight: bold; }
"""


@dataclass(frozen=True)
class PhotoScans:
    """One checkpoint's scan of the held-out photos, scored as crack-scan-eval scores it."""

    ckpt_path: str
    threshold: float
    rows: Sequence[dict]  # per folder: scan_summary.csv's rows (scan_masks.score_groups)
    photos: Mapping[str, dict]  # per photo (scan_eval.json's name): its scores
    figures: Mapping[str, Path]  # per photo (the same name): its overlay (scan.scan_figure)
    windows: Mapping[str, str]  # per folder: the scan's windows (ScanSettings.describe)


def shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def lost_cracks(old: Mapping, new: Mapping) -> int:
    """How many fewer of the mask's cracked tiles (found_patches) the scan after adapting
    finds than the one before; 0 where it finds as many or more."""
    return max(0, int(old["found_patches"]) - int(new["found_patches"]))


def compared_cells(old: Mapping, new: Mapping) -> list[str]:
    """The COMPARED figures as "before -> after" (3 decimals, n/a where undefined)."""
    return [f"{shown(old.get(key))} -> {shown(new.get(key))}" for key, _ in COMPARED]


def folder_lines(before: Sequence[dict], after: Sequence[dict]) -> list[tuple[list[str], int]]:
    """Per folder: its cells (folder, photos, the compared figures) and its lost cracks."""
    return [
        ([str(new["folder"]), str(new["photos"]), *compared_cells(old, new)], lost_cracks(old, new))
        for old, new in zip(before, after, strict=True)
    ]


def folder_heading() -> list[str]:
    return ["folder", "photos", *(f"{name} before -> after" for _, name in COMPARED)]


def folder_warning(folder: str, lost: int) -> str:
    return f"{folder}: {lost} cracked tile(s) found before adapting are missed after"


def before_after(before: Sequence[dict], after: Sequence[dict]) -> str:
    """The log's table of the same photos scanned before and after adapting, one line per
    folder (scan_summary.csv's rows), and a warning where fewer cracked tiles are found."""
    lines = [" | ".join(folder_heading())]
    warnings = []
    for cells, lost in folder_lines(before, after):
        lines.append(" | ".join(cells))
        if lost:
            warnings.append(
                f"WARNING {folder_warning(cells[0], lost)} (see the overlays in {PAGE_NAME})."
            )
    return "\n".join(lines + warnings)


def photo_cells(old: Mapping | None, new: Mapping | None) -> list[str]:
    """A photo's figures before -> after: cracked tiles found (of the mask's), false
    alarms, then the COMPARED figures; "not scanned" for a side that skipped the photo."""
    if old is None or new is None:
        missing = "not scanned " + ("before" if old is None else "after")
        return [missing] * (2 + len(COMPARED))
    return [
        f"{old['found_patches']} -> {new['found_patches']} of {new['cracked_patches']}",
        f"{old['false_alarms']} -> {new['false_alarms']}",
        *compared_cells(old, new),
    ]


def before_after_html(
    before: PhotoScans,
    after: PhotoScans,
    pictures: Mapping[Path, bytes | None],
    photos_note: str,
) -> str:
    """The page: what was scanned with what, the log's table, then one row per photo with
    its overlay before and after (`pictures`: JPEG bytes of each figure) and its figures;
    a photo or folder that loses cracks found before is marked with a warning."""
    escape = html.escape
    windows = "; ".join(f"{folder}: {text}" for folder, text in after.windows.items())
    names = list(dict.fromkeys([*after.photos, *before.photos]))
    settings = (
        ("photos", f"{len(names)}: {photos_note}"),
        ("before: init_from", f"{before.ckpt_path} (threshold {before.threshold:g})"),
        ("after: adapted", f"{after.ckpt_path} (threshold {after.threshold:g})"),
        ("scanned with", windows),
    )
    parts = [
        "<h1>Adaptation: the site's photos before and after</h1>",
        "<table>"
        + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in settings)
        + "</table>",
        '<p class="note">Each photo is scanned with both checkpoints at their own thresholds '
        "and scored against its mask as crack-scan-eval scores it: a tile is cracked where "
        "enough of its pixels are crack in the mask; found = cracked and flagged. A warning "
        "marks fewer cracked tiles found after adapting than before.</p>",
    ]
    lines = folder_lines(before.rows, after.rows)
    heading = "".join(f"<th>{escape(h)}</th>" for h in folder_heading())
    table = "".join(
        f'<tr class="folder{" lost" if lost else ""}">'
        + "".join(f"<td>{escape(c)}</td>" for c in cells)
        + "</tr>"
        for cells, lost in lines
    )
    parts.append(f'<h2>Per folder</h2><table class="folders"><tr>{heading}</tr>{table}</table>')
    warned = [folder_warning(cells[0], lost) for cells, lost in lines if lost]
    warned_photos = sum(
        bool(lost_cracks(before.photos[n], after.photos[n]))
        for n in names
        if n in before.photos and n in after.photos
    )
    if warned_photos:
        warned.append(
            f"{warned_photos} of {len(names)} photos miss cracked tiles found before: marked below"
        )
    parts += [f'<p class="warn">WARNING {escape(text)}.</p>' for text in warned]
    head = ("photo", "before (init_from)", "after (adapted)", "cracked tiles found")
    head += ("false alarms", *(name for _, name in COMPARED))
    rows = []
    for name in names:
        old, new = before.photos.get(name), after.photos.get(name)
        lost = lost_cracks(old, new) if old is not None and new is not None else 0
        images = [
            overlay(scans.figures.get(name), pictures, f"{name}, {side}")
            for scans, side in ((before, "before"), (after, "after"))
        ]
        first = f"<b>{escape(name)}</b>"
        if lost:
            first += (
                f'<p class="warn">WARNING: {lost} cracked tile(s) found before adapting '
                "are missed after</p>"
            )
        cells = [first, *images, *(escape(c) for c in photo_cells(old, new))]
        rows.append(
            f'<tr class="photo{" lost" if lost else ""}">'
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    parts.append(
        '<h2>Per photo</h2><table class="photos"><tr>'
        + "".join(f"<th>{escape(h)}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )
    return html_page("Adaptation: before and after", "\n".join(parts), STYLE)


def overlay(figure: Path | None, pictures: Mapping[Path, bytes | None], alt: str) -> str:
    picture = pictures.get(figure) if figure is not None else None
    return inline_image(picture, alt, "image/jpeg") if picture else "(no figure)"


def write_before_after(path: Path, before: PhotoScans, after: PhotoScans, photos_note: str) -> Path:
    """The page at `path`, each overlay a thumbnail of its scan figure."""
    figures = {*before.figures.values(), *after.figures.values()}
    pictures = {figure: thumbnail_jpeg(figure) for figure in figures}
    write_text(path, before_after_html(before, after, pictures, photos_note))
    return path
