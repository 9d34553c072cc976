"""Fetching a source's archive (data.sources.NAME.download) and unpacking it, layout kept.

METU's archive is flattened into ROOT/Negative, ROOT/Positive (data/download.py); a
source such as SDNET2018 keeps its own layout (D/CD, D/UD, ...), which its `classes`
mapping reads. Download, resume, retries and verification are data/download.py's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from crack_lightning.data.archives import archive_kind, unpack_rar, unpack_zip
from crack_lightning.data.download import MARKER_NAME, fetch, sha256_of, verify_archive
from crack_lightning.data.sources import SourceSpec, class_folders, parse_sources, scan_source
from crack_lightning.errors import DataError
from crack_lightning.io import move_into_place

log = logging.getLogger(__name__)


def ensure_sources(config: Mapping, progress: bool = True) -> None:
    """Download the sources whose download.enabled is true and whose root lacks them."""
    for spec in parse_sources(config):
        if spec.download and spec.download.get("enabled"):
            ensure_source(spec, progress=progress)


def is_ready(spec: SourceSpec) -> bool:
    """Whether root already holds images in every class folder the mapping names."""
    try:
        return bool(scan_source(spec))
    except DataError:
        return False


def ensure_source(
    spec: SourceSpec, progress: bool = True, retries: int = 5, retry_wait: float = 2.0
) -> Path:
    """Make spec.root hold the source: download (resumable) or take a local archive,
    verify, unpack with the archive's layout. A no-op when root holds it already."""
    where = f"data.sources.{spec.name}"
    settings = spec.download or {}
    root = spec.root
    if is_ready(spec):
        log.info("%s already holds %s: nothing to download", root, spec.name)
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(
            f"{where}.root={root} is not empty but lacks the source's class folders "
            f"({spec.classes}). Move or delete it, or choose another root, then run again."
        )
    archive = settings.get("archive")
    if archive is not None:
        path = Path(archive)
        if not path.is_file():
            raise DataError(f"{where}.download.archive={path} does not exist.")
        digest, downloaded = sha256_of(path), False
    else:
        url = settings.get("url")
        if not url:
            raise DataError(f"{where}.download.url is not set; set it or download.archive.")
        path = root.with_name(root.name + ".zip")
        size, sha256 = settings.get("size"), settings.get("sha256")
        if path.exists():  # fetched before, unpacking did not finish
            digest = verify_archive(path, size, sha256)
        else:
            log.info("Downloading %s to %s", url, path)
            digest = fetch(url, path, size, sha256, retries, retry_wait, progress=progress)
        downloaded = True
    log.info("Archive %s: sha256 %s", path, digest)
    unpack_layout(path, spec, progress)
    counts = {label: len(folders) for label, folders in class_folders(spec).items()}
    marker = {"source": str(archive or settings.get("url")), "sha256": digest, "folders": counts}
    (root / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    if downloaded and not settings.get("keep_archive"):
        path.unlink()
    log.info("%s is ready", root)
    return root


def unpack_layout(archive: Path, spec: SourceSpec, progress: bool) -> None:
    """Unpack into a scratch folder and move the shallowest folder holding the class
    folders to spec.root; the scratch folder goes whatever happens."""
    root = spec.root
    scratch = root.parent / f".{root.name}.unpacking"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        if archive_kind(archive) == "zip":
            unpack_zip(archive, scratch, progress)
        else:
            unpack_rar(archive, scratch, progress=progress)
        top = _layout_top(scratch, spec)
        if top is None:
            raise DataError(
                f"The archive {archive} holds no folders matching data.sources.{spec.name}."
                f"classes ({spec.classes}); is it the right archive?"
            )
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists():
            root.rmdir()  # empty: checked by ensure_source
        move_into_place(top, root)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _layout_top(scratch: Path, spec: SourceSpec) -> Path | None:
    """The shallowest folder under scratch where the source's class mapping finds images."""
    candidates = sorted(
        (Path(d) for d, _, _ in os.walk(scratch)), key=lambda p: (len(p.parts), str(p))
    )
    for folder in candidates:
        if is_ready(dataclasses.replace(spec, root=folder)):
            return folder
    return None
