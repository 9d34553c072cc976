"""Getting a data set's archive onto disk: download (resumable), verify, unpack, place.

One path for METU's RAR and any source's archive (data.sources.NAME.download): the
archive is a local file (`archive=`) or downloaded beside the root (resumed with HTTP
Range, retried, checked against its size and sha256), unpacked into a scratch folder
beside the root, and only then placed: METU's images are flattened into ROOT/Negative
and ROOT/Positive (`ensure_dataset`, what `crack-data download` and data.download=true
run); another source keeps its own layout (SDNET2018's D/CD, D/UD, ...), which its
`classes` mapping reads (`ensure_source`). A marker file records where the data came
from. Both do nothing when the root holds the data already, so they are safe to call
before every training run.

Archive rules (docs/data.md): no entry or link lands outside the scratch folder, and
links, hard links and special files an archive holds are dropped before anything is
read, so only regular image files reach the root; unpacking stops at a size bound
(data.unpack_limit_gib, data.sources.NAME.download.unpack_limit_gib) and cleans up; an
archive's size and sha256, when known, are checked whether downloaded or local.

Python reads ZIP itself. RAR needs an external tool: `unar` (Debian/Ubuntu package
unar, Homebrew unar) is tried first because it checks every file's checksum and reads
all RAR 4 archives, solid ones included; `bsdtar` (libarchive; package libarchive-tools,
built into macOS and Windows 10+ as tar) takes the RAR 5 variants unar 1.10 cannot
parse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from crack_lightning.data.sources import (
    SourceSpec,
    class_folders,
    is_image_name,
    scan_source,
)
from crack_lightning.errors import DataError
from crack_lightning.io import move_into_place, write_json
from crack_lightning.progress import progress as progress_of
from crack_lightning.progress import track
from crack_lightning.settings import CLASS_NAMES

log = logging.getLogger(__name__)

MARKER_NAME = ".download.json"
CHUNK = 1 << 16
GIB = 1 << 30
# what unpacking may write when the caller names no bound: conf/ sets the same
# (data.unpack_limit_gib, data.sources.NAME.download.unpack_limit_gib)
UNPACK_LIMIT_GIB = 4.0
WATCH_SECONDS = 0.5  # how often the size of what a RAR tool wrote is measured


def amount(size: int) -> str:
    """Bytes for a message: in GiB, or MiB below a tenth of one."""
    return f"{size / GIB:.2f} GiB" if size >= GIB / 10 else f"{size / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class UnpackLimit:
    """The most bytes unpacking one archive may write, and the setting that says so."""

    gib: float = UNPACK_LIMIT_GIB
    setting: str = "data.unpack_limit_gib"

    @property
    def bytes(self) -> int:
        return int(self.gib * GIB)

    def refuse(self, archive: Path, what: str) -> DataError:
        return DataError(
            f"archive={archive} {what}, more than {self.setting}={self.gib:g} GiB allows: it "
            f"is not the data set's archive, or a bomb. Nothing was kept; raise "
            f"{self.setting} if the archive really unpacks to that much."
        )


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


def verify_archive(
    path: Path, size: int | None, sha256: str | None, label: str | None = None
) -> str:
    """Check size (cheap) then sha256; return the sha256. A mismatch is a DataError that
    names the file (as `label`, e.g. the setting that gave it), the expected and the
    actual value."""
    label = label or str(path)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DataError(
            f"{label} has {actual:,} bytes, the data set's archive has {size:,}: it is "
            f"incomplete or another file."
        )
    digest = sha256_of(path)
    if sha256 is not None and digest != sha256.lower():
        raise DataError(
            f"{label} has sha256 {digest}, expected {sha256}: the file is corrupted or another one."
        )
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


# --- unpacking -----------------------------------------------------------------------------

RAR_MAGIC = b"Rar!\x1a\x07"
ZIP_MAGIC = b"PK\x03\x04"
RAR_TOOLS = ("unar", "bsdtar")
# what unar and bsdtar print when they cannot read a RAR variant (not: a damaged file)
UNSUPPORTED_MARKERS = (
    "Archive parsing failed",
    "Couldn't recognize the archive format",
    "support unavailable",
    "Unrecognized archive format",
)
INSTALL_HINT = (
    "Install one of them (Debian/Ubuntu: `sudo apt-get install unar`, or `make setup`, which "
    "does it; macOS: `brew install unar`), or unpack the archive yourself and point "
    "data.root at the folder that holds Negative/ and Positive/."
)


def archive_kind(path: Path) -> str:
    """'rar' or 'zip', told by the file's first bytes rather than its name."""
    with path.open("rb") as handle:
        head = handle.read(8)
    if head.startswith(RAR_MAGIC):
        return "rar"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    raise DataError(
        f"archive={path} is neither a RAR nor a ZIP file (it starts with {head[:8]!r}). Pass "
        f"the data set's 'Concrete Crack Images for Classification.rar' or a ZIP of it."
    )


def find_rar_tools(preferred: str | None = None) -> list[tuple[str, str]]:
    """(name, executable) of each RAR tool on PATH, in the order to try them.

    macOS and Windows ship libarchive's bsdtar as `tar`; it counts when it says so.
    """
    names = (preferred,) if preferred else RAR_TOOLS
    found = []
    for name in names:
        exe = shutil.which(name)
        if not exe and name == "bsdtar" and (tar := shutil.which("tar")) and _is_bsdtar(tar):
            exe = tar
        if exe:
            found.append((name, exe))
    if not found:
        raise DataError(
            f"Extracting a RAR archive needs the `{'` or `'.join(names)}` program, and none "
            f"is on PATH. {INSTALL_HINT}"
        )
    return found


def _is_bsdtar(exe: str) -> bool:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return "bsdtar" in out.stdout


def rar_command(tool: str, exe: str, archive: Path, dest: Path) -> list[str]:
    """A command that unpacks archive into dest, printing one line per file."""
    if tool == "unar":  # -D: no extra containing folder; -f: overwrite
        return [exe, "-f", "-D", "-o", str(dest), str(archive)]
    return [exe, "-x", "-v", "-f", str(archive), "-C", str(dest)]


def unpack_rar(
    archive: Path,
    dest: Path,
    tool: str | None = None,
    progress: bool = True,
    limit: UnpackLimit | None = None,
) -> str:
    """Unpack every member of a RAR archive into dest (emptied first); return the tool used.

    Neither tool reads every RAR variant (unar 1.10 fails on some RAR5 archives, bsdtar
    3.6 on solid RAR4 ones), so a tool that cannot parse the format hands the archive to
    the next. A damaged archive (a checksum or length error) stops at once. Both refuse
    to write through a link or outside dest; what they write is measured while they run
    and the tool stopped once it passes `limit`.
    """
    limit = limit or UnpackLimit()
    tools = find_rar_tools(tool)
    failures = []
    for name, exe in tools:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        command = rar_command(name, exe, archive, dest)
        code, tail = _run_counting_lines(command, name, progress, dest, limit.bytes)
        written = tree_size(dest)
        if written > limit.bytes:
            shutil.rmtree(dest, ignore_errors=True)
            raise limit.refuse(archive, f"unpacks to more than {amount(written)}")
        if code == 0:
            return name
        said = " / ".join(line.rstrip(".") for line in tail) or "no message"
        message = f"{name} exit code {code}: {said}"
        failures.append(message)
        if not any(marker in " ".join(tail) for marker in UNSUPPORTED_MARKERS):
            raise DataError(
                f"archive={archive} is damaged or incomplete ({message}). Delete it and "
                f"download it again."
            )
    raise DataError(
        f"No RAR tool could read archive={archive} ({'; '.join(failures)}). Install the "
        f"other tool (unar or bsdtar) too, or unpack the archive with another program "
        f"(WinRAR, 7-Zip, unrar) and point data.root at the folder that holds Negative/ and "
        f"Positive/."
    )


def _run_counting_lines(
    command: list[str], name: str, progress: bool, dest: Path, limit: int
) -> tuple[int, list[str]]:
    """Run command; one progress step per output line (one per file); exit code, last lines.

    A watcher measures dest every WATCH_SECONDS and kills the tool once dest holds more
    than `limit` bytes (the caller measures once more and refuses).
    """
    tail: deque[str] = deque(maxlen=3)
    try:
        with (
            subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
            ) as proc,
            progress_of(None, f"Unpacking ({name})", "file", progress) as bar,
        ):
            done = threading.Event()
            watcher = threading.Thread(
                target=_watch_size, args=(proc, dest, limit, done), daemon=True
            )
            watcher.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.strip())
                bar.update(1)
            code = proc.wait()
            done.set()
            watcher.join()
            return code, list(tail)
    except OSError as err:
        raise DataError(f"Could not run {command[0]}: {err}. {INSTALL_HINT}") from None


def _watch_size(proc: subprocess.Popen, dest: Path, limit: int, done: threading.Event) -> None:
    """Kill proc once what it wrote under dest passes limit bytes."""
    while not done.wait(WATCH_SECONDS):
        if tree_size(dest) > limit:
            proc.kill()
            return


def tree_size(folder: Path) -> int:
    """Bytes in the files under folder (links not followed; vanished files skipped)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def unpack_zip(
    archive: Path, dest: Path, progress: bool = True, limit: UnpackLimit | None = None
) -> None:
    """Unpack a ZIP member by member into regular files and folders (a link entry becomes
    a file holding its target; '..', drive and root parts are dropped from names, as
    zipfile does); zipfile checks each CRC. The sizes the ZIP declares are checked against
    `limit` first, and the bytes really written are counted too (declared sizes can lie)."""
    limit = limit or UnpackLimit()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            declared = sum(m.file_size for m in members)
            if declared > limit.bytes:
                biggest = max(members, key=lambda m: m.file_size)
                raise limit.refuse(
                    archive,
                    f"declares {amount(declared)} unpacked ({biggest.filename}: "
                    f"{amount(biggest.file_size)})",
                )
            written = 0
            for member in track(members, "Unpacking", "file", progress):
                target = zip_target(dest, member.filename)
                if member.is_dir() or target == dest:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as source, target.open("wb") as out:
                    while block := source.read(CHUNK):
                        written += len(block)
                        if written > limit.bytes:
                            raise limit.refuse(
                                archive, f"unpacks to more than it declares ({member.filename})"
                            )
                        out.write(block)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise DataError(
            f"archive={archive} is not a readable ZIP ({err}). The file is damaged or "
            f"incomplete: delete it and download it again."
        ) from None


def zip_target(dest: Path, name: str) -> Path:
    """Where a ZIP entry goes under dest: zipfile's rule (drive, root, '.', '..' and empty
    parts dropped), so that no entry lands outside dest."""
    name = os.path.splitdrive(name.replace("\\", "/"))[1]
    parts = [part for part in name.split("/") if part not in ("", ".", "..")]
    return dest.joinpath(*parts)


def drop_links(folder: Path) -> list[str]:
    """Remove from an unpacked folder whatever is not a plain folder or a regular file of
    its own (links, hard links too, FIFOs, devices), so that nothing read, walked or moved
    afterwards can lead outside; return what was removed, relative to folder."""
    removed = []
    for dirpath, dirnames, names in os.walk(folder):  # links to folders are listed, not walked
        for name in dirnames + names:
            path = Path(dirpath) / name
            info = path.lstat()
            plain = stat.S_ISDIR(info.st_mode) or (
                stat.S_ISREG(info.st_mode) and info.st_nlink == 1
            )
            if not plain:
                path.unlink()
                removed.append(path.relative_to(folder).as_posix())
        dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).is_dir()]
    if removed:
        log.warning(
            "The archive held %d links or special files, not unpacked: %s",
            len(removed),
            ", ".join(removed[:5]) + (" ..." if len(removed) > 5 else ""),
        )
    return removed


def find_unpacked_classes(folder: Path) -> dict[str, Path]:
    """The Negative/ and Positive/ folders (any case, any depth) of an unpacked archive."""
    found: dict[str, list[Path]] = {name: [] for name in CLASS_NAMES}
    for dirpath, dirnames, _ in os.walk(folder):
        for dirname in dirnames:
            for name in CLASS_NAMES:
                if dirname.lower() == name.lower():
                    found[name].append(Path(dirpath) / dirname)
    if any(len(paths) != 1 for paths in found.values()):
        listing = {
            name: [str(p.relative_to(folder)) for p in paths] for name, paths in found.items()
        }
        raise DataError(
            f"The archive must hold exactly one Negative/ and one Positive/ folder of images; "
            f"found {listing}. Is it the METU 'Concrete Crack Images for Classification' "
            f"archive (doi:10.17632/5y9wdsg2zt.2)?"
        )
    return {name: paths[0] for name, paths in found.items()}


@contextmanager
def unpacked(
    archive: Path,
    root: Path,
    progress: bool,
    rar_tool: str | None = None,
    limit: UnpackLimit | None = None,
) -> Iterator:
    """The archive unpacked into a scratch folder beside root, its links and special
    files dropped; removed whatever happens."""
    kind = archive_kind(archive)
    scratch = root.parent / f".{root.name}.unpacking"
    _remove(scratch)
    scratch.mkdir(parents=True)
    try:
        if kind == "zip":
            unpack_zip(archive, scratch, progress, limit)
        else:
            unpack_rar(archive, scratch, rar_tool, progress, limit)
        drop_links(scratch)
        yield scratch
    finally:
        _remove(scratch)


def _remove(path: Path) -> None:
    """Remove a folder (or a link or file in its place) without following links."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def regular_images(folder: Path, scratch: Path, recursive: bool) -> list[Path]:
    """The regular image files in an unpacked folder that really lie inside scratch (links
    neither followed nor taken, nor a linked folder's files), so stray paths or links in
    an archive cannot make unpacking read, move or write anything outside."""
    if recursive:  # links to folders are not walked (but folder itself may be one)
        found = [Path(d) / n for d, _, names in os.walk(folder) for n in names]
    else:
        found = list(folder.iterdir())
    inside = scratch.resolve()
    return sorted(
        p
        for p in found
        if is_image_name(p.name)
        and p.is_file()
        and not p.is_symlink()
        and p.resolve().is_relative_to(inside)
    )


def place(files: Sequence[Path], top: Path, root: Path) -> None:
    """Move unpacked files from under top to the same relative paths under root."""
    for path in files:
        target = root / path.relative_to(top)
        target.parent.mkdir(parents=True, exist_ok=True)
        move_into_place(path, target)


def extract_images(
    archive: Path,
    root: Path,
    progress: bool = True,
    rar_tool: str | None = None,
    limit: UnpackLimit | None = None,
) -> dict[str, int]:
    """Unpack archive and move its class folders' images to root/Negative, root/Positive.

    Returns the number of images moved per class.
    """
    with unpacked(archive, root, progress, rar_tool, limit) as scratch:
        counts = {}
        for name, folder in find_unpacked_classes(scratch).items():
            images = regular_images(folder, scratch, recursive=False)
            (root / name).mkdir(parents=True, exist_ok=True)
            place(images, folder, root / name)
            counts[name] = len(images)
        return counts


def unpack_layout(
    archive: Path, spec: SourceSpec, progress: bool, limit: UnpackLimit | None = None
) -> None:
    """Unpack, find the shallowest folder holding the source's class folders, and move
    their images to spec.root with that folder's layout."""
    with unpacked(archive, spec.root, progress, limit=limit) as scratch:
        top = _layout_top(scratch, spec)
        if top is None:
            raise DataError(
                f"The archive {archive} holds no folders matching {spec.where}.classes "
                f"({spec.classes}); is it the right archive?"
            )
        folders = class_folders(dataclasses.replace(spec, root=top)).values()
        place(
            sorted({p for f in chain(*folders) for p in regular_images(f, scratch, True)}),
            top,
            spec.root,
        )


def _layout_top(scratch: Path, spec: SourceSpec) -> Path | None:
    """The shallowest folder under scratch where the source's class mapping finds images."""
    candidates = sorted(
        (Path(d) for d, _, _ in os.walk(scratch)), key=lambda p: (len(p.parts), str(p))
    )
    for folder in candidates:
        if is_ready(dataclasses.replace(spec, root=folder)):
            return folder
    return None


def get_archive(
    where: str,
    archive: str | Path | None,
    url: str | None,
    dest: Path,
    size: int | None,
    sha256: str | None,
    progress: bool,
    retries: int,
    retry_wait: float,
) -> tuple[Path, str, bool]:
    """(archive path, its sha256, whether it was downloaded): a local archive as given,
    or one downloaded to dest (resumed, or re-verified when fetched before)."""
    if archive is not None:
        path = Path(archive)
        if not path.is_file():
            hint = "" if where else f" {OFFLINE_HINT}"  # where: a source's setting
            raise DataError(f"{where}archive={path} does not exist.{hint}")
        try:  # a local archive is held to the same size and sha256 as a downloaded one
            digest = verify_archive(path, size, sha256, f"{where}archive={path}")
        except DataError as err:
            raise DataError(
                f"{err} Check {where}sha256 and {where}size, or pass the right archive."
            ) from None
        log.info("Archive %s: sha256 %s", path, digest)
        return path, digest, False
    if not url:
        raise DataError(f"{where}url is not set; set it or {where}archive.")
    if dest.exists():  # downloaded before, but unpacking did not finish
        try:
            digest = verify_archive(dest, size, sha256)
        except DataError as err:
            raise DataError(f"{err} Delete it and run the download again.") from None
    else:
        log.info("Downloading %s to %s", url, dest)
        digest = fetch(url, dest, size, sha256, retries, retry_wait, progress=progress)
    log.info("Archive %s: sha256 %s", dest, digest)
    return dest, digest, True


def finish(root: Path, marker: dict, archive: Path, delete: bool) -> None:
    """Record where the data came from; drop a downloaded archive unless kept."""
    write_json(root / MARKER_NAME, marker)
    if delete:
        archive.unlink()
    log.info("%s is ready", root)


def count_images(root: Path) -> dict[str, int]:
    """Images in each class folder of root (data.root's layout); 0 when it lacks them."""
    try:
        samples = scan_source(SourceSpec.from_root(root, "random", 0))
    except DataError:
        return {name: 0 for name in CLASS_NAMES}
    return {
        name: sum(1 for _, lab in samples if lab == label) for label, name in enumerate(CLASS_NAMES)
    }


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
    unpack_limit_gib: float = UNPACK_LIMIT_GIB,
) -> Path:
    """Make root hold source's (default: METU) images per class: download and/or unpack.

    Does nothing when root already holds them. With `archive`, nothing is downloaded: that
    local RAR or ZIP file (perhaps a repack, so its size is not compared; a sha256 the
    source pins is) is unpacked, and unpacking (checksums) and counting tell whether it is
    whole. Otherwise the archive is downloaded beside root (ROOT.rar), verified, unpacked,
    and deleted unless `keep_archive`. Unpacking writes at most `unpack_limit_gib`
    (data.unpack_limit_gib).
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
    dest = root.with_name(root.name + source.suffix)
    size = None if archive else source.size  # a local copy may be a repack (a ZIP)
    path, digest, downloaded = get_archive(
        "", archive, source.url, dest, size, source.sha256, progress, retries, retry_wait
    )
    limit = UnpackLimit(unpack_limit_gib, "data.unpack_limit_gib")
    counts = extract_images(path, root, progress=progress, limit=limit)
    if any(n != expected for n in counts.values()):
        raise DataError(
            f"The archive {path} held {counts} images, not {expected:,} per class: it is not "
            f"the complete data set. {root} was left as unpacked, for a look; delete it "
            f"before trying again."
        )
    marker = {"source": str(archive) if archive else source.url, "sha256": digest, **counts}
    finish(root, marker, path, downloaded and not keep_archive)
    return root


def is_ready(spec: SourceSpec) -> bool:
    """Whether root already holds images in every class folder the mapping names."""
    try:
        return bool(scan_source(spec))
    except DataError:
        return False


def ensure_source(
    spec: SourceSpec,
    progress: bool = True,
    retries: int = 5,
    retry_wait: float = 2.0,
    unpack_limit_gib: float = UNPACK_LIMIT_GIB,
) -> Path:
    """Make spec.root hold the source (data.sources.NAME.download): download (resumable)
    or take a local archive, verify, unpack with the archive's layout. A no-op when root
    holds it already. A source that sets no download.unpack_limit_gib unpacks at most
    `unpack_limit_gib` (data.unpack_limit_gib)."""
    settings = spec.download or {}
    root = spec.root
    if is_ready(spec):
        log.info("%s already holds %s: nothing to download", root, spec.name)
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(
            f"{spec.where}.root={root} is not empty but lacks the source's class folders "
            f"({spec.classes}). Move or delete it, or choose another root, then run again."
        )
    path, digest, downloaded = get_archive(
        f"{spec.where}.download.",
        settings.get("archive"),
        settings.get("url"),
        root.with_name(root.name + ".zip"),
        settings.get("size"),
        settings.get("sha256"),
        progress,
        retries,
        retry_wait,
    )
    limit = UnpackLimit(
        settings.get("unpack_limit_gib", unpack_limit_gib),
        f"{spec.where}.download.unpack_limit_gib",
    )
    unpack_layout(path, spec, progress, limit)
    counts = {label: len(folders) for label, folders in class_folders(spec).items()}
    marker = {
        "source": str(settings.get("archive") or settings.get("url")),
        "sha256": digest,
        "folders": counts,
    }
    finish(root, marker, path, downloaded and not settings.get("keep_archive"))
    return root


def download_wanted(root: Path, download: bool | str, source: Source | None = None) -> bool:
    """data.download: true fetches unless root holds the data set (ensure_dataset checks);
    auto only on a first run, when root is missing or empty, or when a download beside it
    was left unfinished (its archive or .part file is there), so a folder of the user's
    own images is never touched."""
    if download != "auto":
        return bool(download)
    archive = root.with_name(root.name + (source or METU).suffix)
    unfinished = archive.exists() or archive.with_name(archive.name + ".part").exists()
    empty = not root.exists() or (root.is_dir() and not any(root.iterdir()))
    if empty:
        log.info(
            "data.root=%s holds no data set: downloading the METU data set (241 MB) into "
            "it (data.download=auto; data.download=false never downloads)",
            root,
        )
    elif unfinished:
        log.info("Finishing the download of the data set into data.root=%s", root)
    return empty or unfinished


def ensure_sources(
    specs: Sequence[SourceSpec],
    archive: str | Path | None = None,
    download: bool | str = False,
    unpack_limit_gib: float = UNPACK_LIMIT_GIB,
) -> None:
    """Fetch what the data set lacks before training: data.root's METU archive when
    data.archive is set or data.download asks for it (download_wanted); each source
    whose download.enabled is."""
    for spec in specs:
        if spec.shorthand and (archive is not None or download_wanted(spec.root, download)):
            ensure_dataset(spec.root, archive=archive, unpack_limit_gib=unpack_limit_gib)
        elif spec.download and spec.download.get("enabled"):
            ensure_source(spec, unpack_limit_gib=unpack_limit_gib)
