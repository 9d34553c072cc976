"""An adaptation's before/after page (evaluation/before_after.py) built from hand-made
scores: one row per photo with both overlays inlined, the log table's figures, and a
warning exactly where a cracked tile found before is missed after."""

from __future__ import annotations

import base64
import re
from io import BytesIO
from pathlib import Path

from PIL import Image

from crack_lightning.evaluation.before_after import (
    PAGE_NAME,
    PhotoScans,
    before_after,
    before_after_html,
    write_before_after,
)


def page_rows(page: str, kind: str) -> list[tuple[bool, list[str]]]:
    """The page's rows of a table ("photo" or "folder"): (warned, cells)."""
    return [
        (lost == " lost", re.findall(r"<td>(.*?)</td>", body, re.S))
        for lost, body in re.findall(rf'<tr class="{kind}( lost)?">(.*?)</tr>', page, re.S)
    ]


def scores(cracked: int, found: int, alarms: int, **extra: float | None) -> dict:
    """A photo's or folder's figures as scan_masks gives them, P/R/F1 worked out here."""
    p = found / (found + alarms) if found + alarms else None
    r = found / cracked if cracked else None
    f1 = 2 * p * r / (p + r) if p and r else (0.0 if p is not None and r is not None else None)
    return {
        "cracked_patches": cracked,
        "found_patches": found,
        "false_alarms": alarms,
        "precision": p,
        "recall": r,
        "f1": f1,
    } | extra


def jpeg(shade: int) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", (8, 6), (shade, shade, shade)).save(buffer, format="JPEG")
    return buffer.getvalue()


def scans(name: str, photos: dict[str, dict], folder: dict) -> PhotoScans:
    return PhotoScans(
        f"{name}.ckpt",
        0.5,
        [{"folder": "site", "photos": len(photos)} | folder],
        photos,
        {photo: Path(f"{name}/{photo}_scan.png") for photo in photos},
        {"site": "64 px windows every 64 px"},
    )


def test_a_photo_that_loses_a_crack_found_before_is_warned_and_only_it():
    # wall: 3 cracked tiles, 2 found before and 1 after; deck: 1 found before, 2 after;
    # the folder finds 3 both times, so only wall is warned about, not the folder
    before = scans(
        "start",
        {"site/wall.png": scores(3, 2, 0), "site/deck.png": scores(2, 1, 1, pixel_f1=0.25)},
        scores(5, 3, 1),
    )
    after = scans(
        "adapted",
        {"site/wall.png": scores(3, 1, 1), "site/deck.png": scores(2, 2, 0, pixel_f1=0.5)},
        scores(5, 3, 1),
    )
    pictures = {
        figure: jpeg(shade)
        for shade, figure in enumerate([*before.figures.values(), *after.figures.values()])
    }
    page = before_after_html(before, after, pictures, "the site's validation photos")
    assert "<script" not in page.lower() and not re.search(r"https?://", page)

    rows = page_rows(page, "photo")
    assert [cells[0].split("</b>")[0] for _, cells in rows] == [
        "<b>site/wall.png",
        "<b>site/deck.png",
    ]
    assert [warned for warned, _ in rows] == [True, False]
    assert "WARNING: 1 cracked tile(s) found before adapting are missed after" in rows[0][1][0]
    for (_, cells), photo in zip(rows, ["site/wall.png", "site/deck.png"], strict=True):
        inlined = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', "".join(cells[1:3]))
        assert [base64.b64decode(i) for i in inlined] == [
            pictures[before.figures[photo]],
            pictures[after.figures[photo]],
        ]
    # found of the mask's cracked tiles, false alarms, P, R, F1, pixel F1 (by hand)
    assert rows[0][1][3:] == [
        "2 -&gt; 1 of 3",
        "0 -&gt; 1",
        "1.000 -&gt; 0.500",
        "0.667 -&gt; 0.333",
        "0.800 -&gt; 0.400",
        "n/a -&gt; n/a",
    ]
    assert rows[1][1][3:] == [
        "1 -&gt; 2 of 2",
        "1 -&gt; 0",
        "0.500 -&gt; 1.000",
        "0.500 -&gt; 1.000",
        "0.500 -&gt; 1.000",
        "0.250 -&gt; 0.500",
    ]
    # the folder line is the logged table's, without a warning in either
    table = before_after(before.rows, after.rows)
    assert "WARNING" not in table
    assert page_rows(page, "folder") == [
        (False, [c.replace(">", "&gt;") for c in table.splitlines()[1].split(" | ")])
    ]
    assert page.count("WARNING") == 2  # the photo's row and "1 of 2 photos" above


def test_a_folder_finding_fewer_cracked_tiles_is_warned_in_the_log_and_on_the_page(tmp_path):
    before = scans("start", {"site/wall.png": scores(4, 3, 0)}, scores(4, 3, 0))
    after = scans("adapted", {"site/wall.png": scores(4, 1, 0)}, scores(4, 1, 0))
    table = before_after(before.rows, after.rows)
    assert table.splitlines()[1:] == [
        "site | 1 | 1.000 -> 1.000 | 0.750 -> 0.250 | 0.857 -> 0.400 | n/a -> n/a",
        f"WARNING site: 2 cracked tile(s) found before adapting are missed after (see the "
        f"overlays in {PAGE_NAME}).",
    ]
    # unreadable figures: the page says so instead of an image, and is written
    page_file = write_before_after(tmp_path / PAGE_NAME, before, after, "held out")
    page = page_file.read_text()
    ((warned, cells),) = page_rows(page, "folder")
    assert warned and cells[:2] == ["site", "1"]
    ((warned, cells),) = page_rows(page, "photo")
    assert warned and cells[1:3] == ["(no figure)", "(no figure)"]
    assert "WARNING: 2 cracked tile(s)" in cells[0]


def test_nothing_lost_means_no_warning_and_a_skipped_photo_is_named():
    before = scans("start", {"site/wall.png": scores(2, 1, 0)}, scores(2, 1, 0))
    after = scans(
        "adapted",
        {"site/wall.png": scores(2, 1, 0), "site/deck.png": scores(1, 1, 0)},
        scores(3, 2, 0),
    )
    page = before_after_html(before, after, {}, "held out")
    assert "WARNING" not in page and "WARNING" not in before_after(before.rows, after.rows)
    rows = page_rows(page, "photo")
    assert [warned for warned, _ in rows] == [False, False]
    assert rows[1][1][3] == "not scanned before"
