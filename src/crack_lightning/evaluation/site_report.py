"""predict.py mode=scan's site report: the photos of a scan ranked for an inspector.

An inspector with a folder of photos of one structure needs to know which to look at
first. `site_summary.csv` and the offline `site_report.html` (evaluation/html_page.py:
thumbnails inlined, no script) rank the scanned photos by one stated triage score
(`triage_score`), and give per photo the verdict, the windows' figures, the cracks a
crack-map model measures, and when and where the photo was taken (EXIF). Photos the scan
skipped are listed last with the reason.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from crack_lightning.evaluation.html_page import html_page, inline_image, thumbnail_jpeg
from crack_lightning.io import write_csv, write_text

SUMMARY_NAME, REPORT_NAME = "site_summary.csv", "site_report.html"
# the triage score of each kind of scan, as the page and the CSV state it
WINDOW_SCORE = (
    "sum of P(crack) over the cracked windows (P(crack) at or above the threshold, not "
    "Unfamiliar): how sure and how much crack; ties by the highest P(crack)"
)
MAP_SCORE = "total crack length in px on the crack map; ties by the highest P(crack)"
COLUMNS = (
    "rank",
    "file",
    "folder",
    "score",
    "verdict",
    "cracked_windows",
    "windows",
    "max_prob_crack",
    "unfamiliar_share",
    "cracks",
    "crack_length_px",
    "max_width_px",
    "crack_length_mm",
    "max_width_mm",
    "taken",
    "latitude",
    "longitude",
    "figure",
    "score_rule",
)
# a crack-map scan's figures (crack_maps.measure_cracks) that the report carries
MEASURES = ("cracks", "crack_length_px", "max_width_px", "crack_length_mm", "max_width_mm")
# EXIF tags (PIL's getexif()): the Exif and GPS sub-IFDs and what is read from them
EXIF_IFD, GPS_IFD = 0x8769, 0x8825
DATE_TIME_ORIGINAL, DATE_TIME = 0x9003, 0x0132
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4
STYLE = """
td img { max-width: 320px; max-height: 320px; display: block; }
td.path { max-width: 16em; overflow-wrap: anywhere; }
"""


@dataclass(frozen=True)
class ScanContext:
    """What the photos were scanned with, for the page's header."""

    ckpt_path: str
    threshold: float
    patch_size: int
    stride: int
    mm_per_px: float | None = None

    @property
    def model(self) -> str:
        """The checkpoint's file name and its run folder (RUN/checkpoints/best.ckpt: RUN)."""
        path = Path(self.ckpt_path)
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return f"{path.name} (run {run.name})" if run.name else path.name


@dataclass(frozen=True)
class Exif:
    """When and where a photo was taken: "" and None where its EXIF does not say."""

    taken: str = ""  # YYYY-MM-DD HH:MM:SS
    latitude: float | None = None  # decimal degrees, north positive
    longitude: float | None = None  # decimal degrees, east positive


@dataclass(frozen=True)
class SitePhoto:
    """One scanned photo's figures for the report (`site_photo`)."""

    path: Path
    figure: Path
    windows: int
    cracked_windows: int
    cracked_prob_sum: float  # P(crack) summed over the cracked windows
    max_prob: float
    unfamiliar_share: float
    measures: Mapping[str, Any] | None  # a crack-map scan's cracks (crack_maps.measure_cracks)

    @property
    def verdict(self) -> str:
        cracked = self.cracked_windows > 0 or bool(self.measures and self.measures["cracks"])
        return "Crack" if cracked else "No crack"


def site_photo(result: Any, entry: Mapping[str, Any]) -> SitePhoto:
    """A scan's result (inference/scan.py ScanResult) and its summary entry (predict.py
    scan: the figure's path and, from a crack-map model, its cracks) for the report."""
    cracked = result.cracked
    return SitePhoto(
        Path(result.path),
        Path(entry["figure"]),
        len(result.probs),
        int(cracked.sum()),
        float(result.probs[cracked].sum()),
        float(result.probs.max()) if len(result.probs) else 0.0,
        float(result.is_unfamiliar.mean()) if len(result.probs) else 0.0,
        {key: entry[key] for key in MEASURES} if "cracks" in entry else None,
    )


def triage_score(photo: SitePhoto) -> tuple[float, float]:
    """(score, tie-break), higher first: with a crack map the total crack length in px,
    else the sum of P(crack) over the cracked windows; ties by the highest P(crack)."""
    if photo.measures is not None:
        return float(photo.measures["crack_length_px"]), photo.max_prob
    return photo.cracked_prob_sum, photo.max_prob


def score_rule(photos: Sequence[SitePhoto]) -> str:
    return MAP_SCORE if any(photo.measures is not None for photo in photos) else WINDOW_SCORE


def ranked(photos: Sequence[SitePhoto]) -> list[SitePhoto]:
    """Highest triage score first; equal scores keep the scan's order."""
    return sorted(photos, key=triage_score, reverse=True)


def read_exif(path: Path) -> Exif:
    """The photo's date and time (DateTimeOriginal, else DateTime) and GPS position.
    EXIF is whatever a camera or editor wrote: anything missing, malformed or out of
    range is left blank, never an error."""
    try:
        with Image.open(path) as image:
            exif = image.getexif()
            details = exif.get_ifd(EXIF_IFD)
            gps = exif.get_ifd(GPS_IFD)
    except Exception:  # not an image, unreadable, or EXIF PIL cannot parse
        return Exif()
    taken = exif_time(details.get(DATE_TIME_ORIGINAL)) or exif_time(exif.get(DATE_TIME))
    latitude = gps_degrees(gps.get(GPS_LATITUDE), gps.get(GPS_LATITUDE_REF), "S", 90)
    longitude = gps_degrees(gps.get(GPS_LONGITUDE), gps.get(GPS_LONGITUDE_REF), "W", 180)
    if latitude is None or longitude is None:  # half a position is no position
        latitude = longitude = None
    return Exif(taken, latitude, longitude)


def exif_time(value: Any) -> str:
    """EXIF's "YYYY:MM:DD HH:MM:SS" as "YYYY-MM-DD HH:MM:SS"; "" when it is not one."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return ""
    try:
        parsed = datetime.strptime(value.strip("\x00 "), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return ""
    return parsed.strftime("%Y-%m-%d %H:%M:%S")


def gps_degrees(value: Any, ref: Any, negative: str, limit: float) -> float | None:
    """Degrees, minutes, seconds (three rationals) and a reference (N/S, E/W) as signed
    decimal degrees; None when they are not that or lie beyond +-limit."""
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    try:
        degrees, minutes, seconds = (float(part) for part in value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    decimal = degrees + minutes / 60 + seconds / 3600
    if not math.isfinite(decimal) or min(degrees, minutes, seconds) < 0 or decimal > limit:
        return None
    if not isinstance(ref, str):
        return None
    ref = ref.strip("\x00 ").upper()
    if ref not in ("N", "S", "E", "W"):
        return None
    return -decimal if ref == negative else decimal


def number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def summary_rows(
    photos: Sequence[SitePhoto],
    exifs: Mapping[Path, Exif],
    skipped: Sequence[tuple[Path, str]],
    folder: Path,
) -> list[dict[str, Any]]:
    """The CSV's rows: the photos ranked, then the skipped ones (no rank)."""
    rule = score_rule(photos)
    rows = []
    for rank, photo in enumerate(ranked(photos), start=1):
        measures = photo.measures or {}
        exif = exifs[photo.path]
        rows.append(
            {
                "rank": rank,
                "file": photo.path.name,
                "folder": str(photo.path.parent),
                "score": f"{triage_score(photo)[0]:.4f}",
                "verdict": photo.verdict,
                "cracked_windows": photo.cracked_windows,
                "windows": photo.windows,
                "max_prob_crack": f"{photo.max_prob:.4f}",
                "unfamiliar_share": f"{photo.unfamiliar_share:.4f}",
                "cracks": measures.get("cracks", ""),
                "crack_length_px": number(measures.get("crack_length_px"), 1),
                "max_width_px": number(measures.get("max_width_px"), 2),
                "crack_length_mm": number(measures.get("crack_length_mm"), 2),
                "max_width_mm": number(measures.get("max_width_mm"), 3),
                "taken": exif.taken,
                "latitude": number(exif.latitude, 6),
                "longitude": number(exif.longitude, 6),
                "figure": relative(photo.figure, folder),
                "score_rule": rule,
            }
        )
    for path, reason in skipped:
        exif = exifs[Path(path)]
        rows.append(
            {
                "file": Path(path).name,
                "folder": str(Path(path).parent),
                "verdict": f"skipped: {reason}",
                "taken": exif.taken,
                "latitude": number(exif.latitude, 6),
                "longitude": number(exif.longitude, 6),
                "score_rule": rule,
            }
        )
    return rows


def relative(path: Path, folder: Path) -> str:
    try:
        return str(Path(path).relative_to(folder))
    except ValueError:
        return str(path)


def cracks_cell(row: Mapping[str, Any]) -> str:
    """A crack-map photo's cracks in one cell; "" for a window classifier's."""
    if row["cracks"] == "":
        return ""
    if not row["cracks"]:
        return "none"
    mm = row["crack_length_mm"] != ""
    length = f"{row['crack_length_px']} px" + (f" ({row['crack_length_mm']} mm)" if mm else "")
    widest = f"{row['max_width_px']} px" + (f" ({row['max_width_mm']} mm)" if mm else "")
    return f"{row['cracks']}, {length} long, widest {widest}"


def report_html(
    rows: Sequence[dict[str, Any]],
    pictures: Mapping[str, bytes | None],
    context: ScanContext,
    skipped: Sequence[tuple[Path, str]],
    written: str,
) -> str:
    """The page: what was scanned with what, the score, the ranked table, the skipped."""
    escape = html.escape
    scanned = [row for row in rows if row.get("rank")]
    scale = "pixels only" if context.mm_per_px is None else f"{context.mm_per_px:g} mm per px"
    parts = [
        "<h1>Site report</h1>",
        "<table>"
        + "".join(
            f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>"
            for k, v in (
                ("model", context.model),
                ("checkpoint", context.ckpt_path),
                ("decision threshold", f"P(crack) \u2265 {context.threshold:g}"),
                (
                    "window (scan.patch_size, scan.stride)",
                    f"{context.patch_size} px, stride {context.stride} px",
                ),
                ("scale (scan.mm_per_px)", scale),
                ("written", written),
                ("photos", f"{len(scanned)} scanned, {len(skipped)} skipped"),
            )
        )
        + "</table>",
        f"<p><b>Ranked by</b> {escape(rows[0]['score_rule'])}.</p>",
    ]
    head = ("rank", "overlay", "photo", "score", "verdict", "cracked windows")
    head += ("highest P(crack)", "unfamiliar", "cracks", "taken", "GPS (lat, lon)")
    cells = []
    for row in scanned:
        picture = pictures.get(row["figure"])
        image = inline_image(picture, row["figure"], "image/jpeg") if picture else "(no figure)"
        gps = f"{row['latitude']}, {row['longitude']}" if row["latitude"] else ""
        values = (
            escape(str(row["rank"])),
            image,
            f"<b>{escape(row['file'])}</b><br>{escape(row['folder'])}",
            escape(row["score"]),
            escape(row["verdict"]),
            f"{row['cracked_windows']}/{row['windows']}",
            escape(row["max_prob_crack"]),
            f"{float(row['unfamiliar_share']):.1%}",
            escape(cracks_cell(row)),
            escape(row["taken"]),
            escape(gps),
        )
        classes = ["", "", ' class="path"'] + [""] * (len(values) - 3)
        cells.append(
            "<tr>"
            + "".join(f"<td{c}>{v}</td>" for c, v in zip(classes, values, strict=True))
            + "</tr>"
        )
    parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(cells))
    parts.append("</table>")
    if skipped:
        parts += [
            f"<h2>Skipped ({len(skipped)})</h2>",
            "<ul>"
            + "".join(
                f"<li><b>{escape(str(path))}</b>: {escape(reason)}</li>" for path, reason in skipped
            )
            + "</ul>",
        ]
    return html_page(f"Site report: {context.model}", "\n".join(parts), STYLE)


def write_site_report(
    folder: Path,
    photos: Sequence[SitePhoto],
    skipped: Sequence[tuple[Path, str]],
    context: ScanContext,
) -> list[Path]:
    """site_summary.csv and site_report.html in `folder` (mode=scan's report_dir)."""
    exifs = {Path(p): read_exif(p) for p in [*(x.path for x in photos), *(p for p, _ in skipped)]}
    rows = summary_rows(photos, exifs, skipped, folder)
    pictures = {relative(p.figure, folder): thumbnail_jpeg(p.figure) for p in photos}
    written = datetime.now().isoformat(sep=" ", timespec="seconds")
    summary, page = folder / SUMMARY_NAME, folder / REPORT_NAME
    write_csv(summary, COLUMNS, rows)
    write_text(page, report_html(rows, pictures, context, skipped, written))
    return [summary, page]
