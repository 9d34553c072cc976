"""Getting the METU data set onto disk: download (resumable), verify, unpack, count.

`ensure_dataset` is what `crack-data download` and `data.download=true`
run. It does nothing when the root already holds the full data set, so it is safe to
call before every training run.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from crack_lightning.data.archives import extract_images, is_image
from crack_lightning.data.layout import CLASS_NAMES, find_class_dirs
from crack_lightning.errors import DataError
from crack_lightning.io import move_into_place
from crack_lightning.progress import progress as progress_of

log = logging.getLogger(__name__)

MARKER_NAME = ".download.json"
CHUNK = 1 << 16


@dataclass(frozen=True)
class Source:
    """Where an archive comes from and what it must look like."""

    url: str
    size: int | None
    sha256: str | None
    images_per_class: int
    suffix: str = ".rar"


# Özgenel (2019), Mendeley Data V2, doi:10.17632/5y9wdsg2zt.2, CC BY 4.0. The publisher
# gives no checksum; `download` logs the sha256 of what it fetched, so it can be pinned.
METU = Source(
    url=(
        "https://data.mendeley.com/public-files/datasets/5y9wdsg2zt/files/"
        "8a70d8a5-bce9-4291-bab9-b48cfb3e87c3/file_downloaded"
    ),
    size=241_363_336,
    sha256=None,
    images_per_class=20_000,
)

OFFLINE_HINT = (
    "On a machine without internet, download the archive elsewhere (the DOI page "
    "doi:10.17632/5y9wdsg2zt.2, 'Concrete Crack Images for Classification.rar', 241 MB) "
    "and pass archive=PATH (data.archive=PATH in train.py)."
)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(path: Path, size: int | None, sha256: str | None) -> str:
    """Check size (cheap) then sha256; return the sha256. A mismatch is a DataError."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DataError(
            f"{path} has {actual:,} bytes, the data set's archive has {size:,}: it is "
            f"incomplete or another file."
        )
    digest = sha256_of(path)
    if sha256 is not None and digest != sha256.lower():
        raise DataError(f"{path} has sha256 {digest}, expected {sha256}: the file is corrupted.")
    return digest


class _Retry(Exception):
    """The connection broke or the server failed; worth another attempt."""


def fetch(
    url: str,
    dest: Path,
    size: int | None = None,
    sha256: str | None = None,
    retries: int = 5,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> str:
    """Download url to dest through dest.part, resuming it with HTTP Range; return sha256.

    A dropped connection is retried (up to `retries` times, waiting `retry_wait` seconds,
    doubled each time) from where it stopped; an interrupted process resumes on the next
    call. The finished file must have `size` bytes and `sha256`, else it is deleted.
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, size, timeout, progress)
            break
        except _Retry as err:
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise DataError(
                    f"Downloading {url} failed {retries + 1} times ({err}); {have:,} bytes "
                    f"are kept in {part}. Run the same command again to resume. {OFFLINE_HINT}"
                ) from None
            wait = retry_wait * 2**attempt
            log.warning(
                "Download interrupted at %s bytes (%s); resuming in %.0f s", have, err, wait
            )
            time.sleep(wait)
    try:
        digest = verify_archive(part, size, sha256)
    except DataError as err:
        part.unlink()
        raise DataError(
            f"{err} It was deleted; run the command again to download it afresh."
        ) from None
    move_into_place(part, dest)
    return digest


def _fetch_once(url: str, part: Path, size: int | None, timeout: float, progress: bool) -> None:
    """One HTTP request: append to part from its current length (or restart at 0)."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset >= size:
        if offset == size:
            return
        part.unlink()  # longer than the archive: not ours to resume
        offset = 0
    headers = {"User-Agent": "crack-lightning"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing after offset: the server's file is shorter
            part.unlink()
            raise _Retry("the partial file did not match the server's; starting afresh") from None
        if err.code >= 500 or err.code == 429:
            raise _Retry(f"HTTP {err.code} {err.reason}") from None
        raise DataError(
            f"Downloading {url} failed: HTTP {err.code} {err.reason}. {OFFLINE_HINT}"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, socket.gaierror):  # no DNS: offline, retrying will not help
            raise DataError(
                f"Cannot download {url}: the host name does not resolve ({reason}); this "
                f"machine looks offline. {OFFLINE_HINT}"
            ) from None
        raise _Retry(f"cannot connect: {reason}") from None
    with response:
        if offset and response.status != 206:  # the server ignored Range: start again
            offset = 0
        elif offset and not response.headers.get("Content-Range", "").startswith(
            f"bytes {offset}-"
        ):
            part.unlink()
            raise _Retry("the server sent another part of the file than asked for")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        if size is not None and total is not None and total != size:
            raise DataError(
                f"{url} serves {total:,} bytes, the data set's archive has {size:,}: the "
                f"address no longer points at the archive. {OFFLINE_HINT}"
            )
        received = offset
        with (
            part.open("r+b" if offset else "wb") as out,
            progress_of(total or size, "Downloading", "B", progress, initial=offset) as bar,
        ):
            out.seek(offset)
            out.truncate()
            try:
                while block := response.read(CHUNK):
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as err:
                raise _Retry(f"connection lost: {err!r}") from None
        if total is not None and received < total:
            raise _Retry(f"connection closed after {received:,} of {total:,} bytes")


def count_images(root: Path) -> dict[str, int]:
    """Images (by file extension) in each class folder of root; 0 for a missing folder."""
    try:
        dirs = find_class_dirs(root)
    except DataError:
        return {name: 0 for name in CLASS_NAMES}
    return {name: sum(1 for p in dirs[name].iterdir() if is_image(p)) for name in CLASS_NAMES}


def is_complete(root: Path, images_per_class: int) -> bool:
    return root.is_dir() and all(n == images_per_class for n in count_images(root).values())


def ensure_dataset(
    root: str | Path,
    archive: str | Path | None = None,
    source: Source | None = None,
    keep_archive: bool = False,
    progress: bool = True,
    retries: int = 5,
    retry_wait: float = 2.0,
) -> Path:
    """Make root hold source's (default: METU) images per class: download and/or unpack.

    Does nothing when root already holds them. With `archive`, nothing is downloaded: that
    local RAR or ZIP file (perhaps a repack, so its size is not compared) is unpacked, and
    unpacking (checksums) and counting tell whether it is whole. Otherwise the archive is
    downloaded beside root (ROOT.rar), verified, unpacked, and deleted unless
    `keep_archive`.
    """
    root = Path(root)
    source = source or METU
    expected = source.images_per_class
    if is_complete(root, expected):
        log.info("%s already holds %s images per class: nothing to do", root, f"{expected:,}")
        return root
    if root.exists() and any(root.iterdir()):
        counts = count_images(root)
        raise DataError(
            f"data.root={root} is not empty but does not hold {expected:,} images per class "
            f"(found {counts}). Move or delete it, or choose another data.root, then run the "
            f"download again."
        )
    if archive is not None:
        path = Path(archive)
        if not path.is_file():
            raise DataError(f"archive={path} does not exist. {OFFLINE_HINT}")
        digest = sha256_of(path)
        downloaded = False
    else:
        path = root.with_name(root.name + source.suffix)
        if path.exists():  # downloaded before, but unpacking did not finish
            try:
                digest = verify_archive(path, source.size, source.sha256)
            except DataError as err:
                raise DataError(f"{err} Delete it and run the download again.") from None
        else:
            log.info("Downloading %s to %s", source.url, path)
            digest = fetch(
                source.url,
                path,
                source.size,
                source.sha256,
                retries=retries,
                retry_wait=retry_wait,
                progress=progress,
            )
        log.info("Archive %s: sha256 %s", path, digest)
        downloaded = True
    counts = extract_images(path, root, progress=progress)
    if any(n != expected for n in counts.values()):
        raise DataError(
            f"The archive {path} held {counts} images, not {expected:,} per class: it is not "
            f"the complete data set. {root} was left as unpacked, for a look; delete it "
            f"before trying again."
        )
    marker = {"source": str(archive) if archive else source.url, "sha256": digest, **counts}
    (root / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    if downloaded and not keep_archive:
        path.unlink()
    log.info("%s is ready: %s", root, counts)
    return root
