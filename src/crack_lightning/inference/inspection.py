"""What the inspector's page does, without the page: scan the dropped photos (the one scan
loop, inference/scan.py), keep every patch's P(crack) so a new threshold needs no model
call, say each photo's verdict, and save an inspector's marks as a labelled folder that a
folder source trains on (`Positive/`, `Negative/`: data.sources.NAME.root=labels_dir).

The Gradio page (inference/page.py) only wires these to its widgets, so they are tested
without a browser too.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from crack_lightning.data.decode import load_rgb
from crack_lightning.evaluation.crack_maps import crack_table, measure_cracks
from crack_lightning.evaluation.site_report import ScanContext, site_photo, write_site_report
from crack_lightning.inference.classifiers import LoadedModel
from crack_lightning.inference.scan import (
    HEAT_OPACITY,
    ScanResult,
    ScanSettings,
    figure_scale,
    render_figure,
    save_png,
    scan_figure,
    scan_files,
    write_scan_csv,
)
from crack_lightning.settings import CLASS_NAMES

PATCH_COLUMNS = ["patch", "x", "y", "size", "P(crack)", "unfamiliar", "label", "mark"]
SUMMARY_COLUMNS = [
    "photo",
    "verdict",
    "patches",
    "cracked",
    "unfamiliar",
    "cracked area",
    "model",
]
# what a click on a patch does: mark it as one class, or take its mark back
MARK_CHOICES = {"crack": CLASS_NAMES[1], "not crack": CLASS_NAMES[0], "clear mark": None}
# the outline of a marked patch on the page (not in the downloaded overlay)
MARK_COLOURS = {CLASS_NAMES[1]: (255, 0, 255), CLASS_NAMES[0]: (0, 200, 80)}
# the gap between two models' overlays of one photo, side by side
SIDE_GAP = 8
# hex digits of a photo's SHA-256 in its name (48 bits: photos sharing a file name never
# meet a clash in practice)
DIGEST_CHARS = 12


@dataclass
class Inspection:
    """One scanned photo: its pixels (for the overlay and the crops), its scan (every
    patch's P(crack): a new threshold is applied without the model) and its marks."""

    name: str  # photo_name: its file stem and content digest
    photo: Image.Image
    result: ScanResult
    marks: dict[int, str] = field(default_factory=dict)  # patch index -> class name
    model: str = ""  # the file of the model that scanned it (LoadedModel.source)
    # the same photo as the model before scanned it, shown beside it (one model back)
    earlier: Inspection | None = None

    @property
    def model_name(self) -> str:
        """The scanning model's file name, for the photo's row and heading."""
        return Path(self.model).name

    @property
    def figure_scale(self) -> float:
        """Overlay pixels per photo pixel (scan figures shrink large photos)."""
        return figure_scale(self.result)


def photo_name(path: Path) -> str:
    """The name of a photo's rows, overlay, files and mark crops: its file stem and the
    start of its content's SHA-256. Photos that share a file name but not their pixels
    (a/IMG_0001.jpg, b/IMG_0001.jpg) never share a name, within a session or across
    sessions in labels_dir, and a photo dropped again keeps its name (the browser sends
    no folder: the content tells photos apart)."""
    try:
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return path.stem  # unreadable: skipped by the scan, named by its file
    return f"{path.stem}_{digest[:DIGEST_CHARS]}"


class Inspector:
    """The page's model and settings, shared by its sessions; scans one batch at a time
    (the model is not run by two threads at once)."""

    def __init__(
        self,
        classifier: LoadedModel,
        window: ScanSettings,
        batch_size: int,
        max_pixels: int,
        labels_dir: Path,
    ) -> None:
        self.classifier = classifier
        self.told = window  # scan.*: null patch size and stride follow the model
        self.window = window.for_model(classifier.window)
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.labels_dir = Path(labels_dir)
        # the fewest marks of each class an adaptation from them needs (app.py sets it from
        # experiment=adapt's fractions: data/splits.py min_class_images)
        self.marks_needed = 0
        self._lock = threading.Lock()

    def use(self, classifier: LoadedModel) -> None:
        """Scan with another model from now on (after a scan in progress)."""
        with self._lock:
            self.classifier = classifier
            self.window = self.told.for_model(classifier.window)

    def scan(
        self,
        paths: Sequence[Path],
        threshold: float,
        out: Path,
        window: tuple[int, int] | None = None,
    ) -> tuple[list[Inspection], list[tuple[str, str]]]:
        """Scan the photos (their overlay PNG and patch CSV written into `out`, named by
        photo_name) with `window` (patch size, stride; None: the model's); the refused and
        unreadable ones come back as (file name, reason)."""
        paths = [Path(path) for path in paths]
        chosen = self.window
        if window is not None:
            chosen = replace(chosen, patch_size=int(window[0]), stride=int(window[1]))
        skipped: list[tuple[Path, str]] = []
        inspections = []
        with self._lock:
            model = self.classifier.source
            results = list(
                # in this process (num_workers=0): the page's server runs on threads, and
                # forking worker processes from a threaded server can deadlock
                scan_files(
                    self.classifier,
                    paths,
                    chosen,
                    self.batch_size,
                    threshold,
                    out,
                    skipped,
                    num_workers=0,
                    max_pixels=self.max_pixels,
                    names=[photo_name(path) for path in paths],
                )
            )
        for result in results:
            inspection = Inspection(result.name, load_rgb(result.path), result, model=model)
            write_scan_csv(result, scan_table(out, result.name))
            inspections.append(inspection)
        return inspections, [(path.name, reason) for path, reason in skipped]

    def rescan(
        self, inspection: Inspection, threshold: float, out: Path, window: tuple[int, int] | None
    ) -> tuple[Inspection | None, str]:
        """The photo scanned again with the current model (and `window`): the scan it
        replaces, when by another model, is kept as `earlier` to be shown beside it, and
        its marks carry over where the windows are the same. (None, reason) where the
        photo cannot be scanned again."""
        scanned, refused = self.scan([inspection.result.path], threshold, out, window)
        if not scanned:
            return None, refused[0][1] if refused else "it could not be scanned"
        new = scanned[0]
        new.name = inspection.name  # its name on the page, whatever its upload is called
        old = replace(inspection, earlier=None)
        new.earlier = old if old.model != new.model else inspection.earlier
        same_windows = new.result.patch_size == old.result.patch_size and np.array_equal(
            new.result.boxes, old.result.boxes
        )
        if same_windows:
            new.marks = dict(inspection.marks)
        return new, ""

    def site_report(
        self, inspections: Sequence[Inspection], threshold: float, out: Path
    ) -> list[Path]:
        """predict mode=scan's site report (site_summary.csv, site_report.html) of the
        page's photos, written in `out` beside their files: each photo's overlay and,
        from a crack-map model, its cracks at the threshold, measured as mode=scan
        measures them (measure_cracks, which lists them in PHOTO_cracks.csv too). Returns
        the report's two files, then the crack tables."""
        window = self.window
        photos, tables = [], []
        for inspection in inspections:
            result = inspection.result
            measures = measure_cracks(result, out, window.mm_per_px)
            if measures:
                tables.append(crack_table(out, result.name))
            photos.append(site_photo(result, {"figure": scan_figure(out, result.name)} | measures))
        context = ScanContext(
            self.classifier.source, threshold, window.patch_size, window.stride, window.mm_per_px
        )
        return [*write_site_report(out, photos, [], context), *tables]

    def marks_folder(self, size: int) -> Path:
        """Where marks of size px windows go: one labelled folder per window size, so
        crops of different scales never train one model (data.sources.site.root=THIS)."""
        return self.labels_dir / f"window_{size}"

    def mark_counts(self, size: int) -> dict[str, int]:
        """How many crops of each class the window size's folder holds."""
        folder = self.marks_folder(size)
        return {label: len(list((folder / label).glob("*.png"))) for label in CLASS_NAMES}

    def mark(self, inspection: Inspection, index: int, label: str | None) -> Path | None:
        """Save patch `index` of the photo as a crop in marks_folder/<label>/ (replacing
        its crop under the other label), or with label None remove its crop; returns the
        crop written."""
        result = inspection.result
        x, y = (int(v) for v in result.boxes[index])
        size = result.patch_size
        name = f"{inspection.name}_x{x:04d}_y{y:04d}_s{size}.png"
        folder = self.marks_folder(size)
        for other in CLASS_NAMES:
            if other != label:
                (folder / other / name).unlink(missing_ok=True)
        if label is None:
            inspection.marks.pop(index, None)
            return None
        crop = folder / label / name
        save_png(inspection.photo.crop((x, y, x + size, y + size)), crop)
        inspection.marks[index] = label
        return crop


def scan_table(out: Path, name: str) -> Path:
    """The patch CSV beside the photo's overlay PNG (predict mode=scan's names)."""
    return scan_figure(out, name).with_suffix(".csv")


def rethreshold(inspections: Sequence[Inspection], threshold: float, out: Path) -> list[Path]:
    """Apply a new threshold to the kept P(crack) of every patch (no model call) and
    rewrite the overlay PNG and patch CSV of each photo whose labels it changed (the heat
    map itself does not depend on it); returns every photo's files."""
    for inspection in inspections:
        before = inspection.result.cracked
        inspection.result.threshold = threshold
        if np.array_equal(before, inspection.result.cracked):
            continue
        save_png(
            render_figure(inspection.result, inspection.photo), scan_figure(out, inspection.name)
        )
        write_scan_csv(inspection.result, scan_table(out, inspection.name))
    return downloads(inspections, out)


def downloads(inspections: Sequence[Inspection], out: Path) -> list[Path]:
    """Each photo's overlay PNG and patch CSV."""
    return [
        path
        for inspection in inspections
        for path in (scan_figure(out, inspection.name), scan_table(out, inspection.name))
    ]


def verdict(result: ScanResult) -> str:
    """The photo in one line: crack or not, how much of it, and what the model could not
    judge (unfamiliar patches are never counted as cracks)."""
    cracked, odd, total = (
        int(result.cracked.sum()),
        int(result.is_unfamiliar.sum()),
        len(result.probs),
    )
    head = "Crack" if cracked else "No crack"
    text = (
        f"{head}: {cracked} of {total} patches cracked "
        f"({result.cracked_area_share():.1%} of the photo) at threshold {result.threshold:.3f}"
    )
    if odd:
        text += f"; {odd} unfamiliar (unlike the training images: not judged)"
    return text


def patch_rows(inspection: Inspection) -> list[list]:
    """The patch table: index, box, P(crack), unfamiliar score, label and mark."""
    result = inspection.result
    scores = result.unfamiliar if result.unfamiliar is not None else [None] * len(result.probs)
    return [
        [
            index,
            int(x),
            int(y),
            result.patch_size,
            round(float(prob), 4),
            "" if score is None else round(float(score), 3),
            label,
            inspection.marks.get(index, ""),
        ]
        for index, ((x, y), prob, score, label) in enumerate(
            zip(result.boxes, result.probs, scores, result.labels(), strict=True)
        )
    ]


def summary_rows(inspections: Iterable[Inspection]) -> list[list]:
    """One row per photo: its verdict and counts."""
    return [
        [
            inspection.name,
            "Crack" if inspection.result.cracked.any() else "No crack",
            len(inspection.result.probs),
            int(inspection.result.cracked.sum()),
            int(inspection.result.is_unfamiliar.sum()),
            f"{inspection.result.cracked_area_share():.1%}",
            inspection.model_name,
        ]
        for inspection in inspections
    ]


def figure_offset(inspection: Inspection) -> int:
    """Where the photo's own overlay starts in the page's figure: right of the earlier
    model's overlay when the two are side by side."""
    if inspection.earlier is None:
        return 0
    earlier = inspection.earlier
    return round(earlier.result.width * earlier.figure_scale) + SIDE_GAP


def figure(inspection: Inspection, opacity: float = HEAT_OPACITY) -> Image.Image:
    """The page's figure: the overlay, or, for a photo scanned by two models, the earlier
    model's overlay (left) and the current one's (right) side by side."""
    image = overlay(inspection, opacity)
    if inspection.earlier is None:
        return image
    left = overlay(inspection.earlier, opacity)
    both = Image.new(
        "RGB",
        (figure_offset(inspection) + image.width, max(left.height, image.height)),
        (255, 255, 255),
    )
    both.paste(left, (0, 0))
    both.paste(image, (figure_offset(inspection), 0))
    return both


def patch_at(inspection: Inspection, x: float, y: float) -> int | None:
    """The patch under pixel (x, y) of the page's figure (scaled to the photo): of the
    windows covering it, the one whose centre is nearest; None outside every window and
    on the earlier model's overlay."""
    scale = inspection.figure_scale
    x -= figure_offset(inspection)
    if x < 0:
        return None
    px, py = x / scale, y / scale
    result = inspection.result
    boxes, size = result.boxes, result.patch_size
    inside = (
        (boxes[:, 0] <= px)
        & (px < boxes[:, 0] + size)
        & (boxes[:, 1] <= py)
        & (py < boxes[:, 1] + size)
    )
    if not inside.any():
        return None
    centres = boxes + size / 2
    distance = np.where(inside, np.hypot(centres[:, 0] - px, centres[:, 1] - py), np.inf)
    return int(distance.argmin())


def overlay(inspection: Inspection, opacity: float = HEAT_OPACITY) -> Image.Image:
    """The scan's figure (render_figure: the heat map at `opacity`, or a crack map's crack
    line) with the marked patches outlined: magenta crack, green not crack."""
    image = render_figure(inspection.result, inspection.photo, opacity)
    if not inspection.marks:
        return image
    draw = ImageDraw.Draw(image)
    scale, size = inspection.figure_scale, inspection.result.patch_size
    line = max(2, round(4 * scale))
    for index, label in inspection.marks.items():
        x, y = inspection.result.boxes[index] * scale
        side = size * scale
        draw.rectangle((x, y, x + side - 1, y + side - 1), outline=MARK_COLOURS[label], width=line)
    return image
