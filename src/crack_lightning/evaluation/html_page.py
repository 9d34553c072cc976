"""The offline HTML pages' one way of being written (mode=eval's report.html, mode=scan's
site_report.html, an adaptation's before_after.html): one file, images inlined as data:
URIs, no script and no external address, so the page opens anywhere without a network and
can be mailed as it is."""

from __future__ import annotations

import base64
import html
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child, td.path { text-align: left; }
.note { color: #555; }
"""
THUMBNAIL_SIDE = 320  # px, a scan figure's longest side: a 100-photo page stays a few MB


def inline_image(data: bytes, alt: str, mime: str = "image/png") -> str:
    """An <img> whose pixels are in the page (a data: URI)."""
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{encoded}">'


def image_png(image: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def thumbnail_jpeg(figure: Path) -> bytes | None:
    """The scan figure at THUMBNAIL_SIDE px on its longest side, as JPEG; None when it
    cannot be read."""
    try:
        with Image.open(figure) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            buffer = BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except OSError:
        return None
    return buffer.getvalue()


def html_page(title: str, body: str, style: str = "") -> str:
    """A whole page: `body` (HTML) under the shared style and `style` (CSS) of its own."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}{style}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )
