"""Getting a source's archive onto disk: download (resumable), verify, unpack, place.

`ensure_source` does it alike for data.root's METU RAR and any data.sources.NAME.download
archive, unpacking into a scratch folder beside the root under the rules of docs/data.md
("Archive rules"). RAR needs `unar` (it checks every checksum and reads all RAR 4, solid
included) or else `bsdtar` (macOS's and Windows' tar: the RAR 5 variants unar cannot).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path

from crack_lightning.data import sources
from crack_lightning.data.sources import SourceSpec, class_folders, is_image_name, scan_source
from crack_lightning.errors import DataError
from crack_lightning.io import move_into_place, write_json
from crack_lightning.progress import progress as progress_of
from crack_lightning.progress import track
from crack_lightning.settings import CLASS_NAMES

log = logging.getLogger(__name__)

MARKER_NAME = ".download.json"
MIB, GIB = 1 << 20, 1 << 30
RAR_TOOLS = ("unar", "bsdtar")
# what unar and bsdtar print when they cannot read a RAR variant (not: a damaged file)
UNSUPPORTED = ("Archive parsing failed", "Couldn't recognize the archive format")
UNSUPPORTED += ("support unavailable", "Unrecognized archive format")
INSTALL_HINT = (
    "Install one of them (Debian/Ubuntu: `sudo apt-get install unar`, or `make setup`, which "
    "does it; macOS: `brew install unar`), or unpack the archive yourself and point "
    "data.root at the folder that holds Negative/ and Positive/."
)
OFFLINE_HINT = (
    "On a machine without internet, download the archive elsewhere (the DOI page "
    "doi:10.17632/5y9wdsg2zt.2, 'Concrete Crack Images for Classification.rar', 241 MB) "
    "and pass archive=PATH (data.archive=PATH in train.py)."
)


@dataclass(frozen=True)
class Source:
    """Where an archive comes from; images_per_class: each class's exact count, or None."""

    url: str | None
    size: int | None
    sha256: str | None
    images_per_class: int | None
    suffix: str = ".rar"


# Özgenel (2019), Mendeley Data V2, doi:10.17632/5y9wdsg2zt.2, CC BY 4.0. The publisher
# gives no checksum; the download logs the sha256 of what it fetched, so it can be pinned.
METU = Source(
    "https://data.mendeley.com/public-files/datasets/5y9wdsg2zt/files/"
    "8a70d8a5-bce9-4291-bab9-b48cfb3e87c3/file_downloaded",
    *(241_363_336, None, 20_000),
)


@dataclass(frozen=True)
class UnpackLimit:
    """The settings of these names (conf/'s defaults); `where`: data. or a source's download."""

    unpack_limit_gib: float = 4.0  # what unpacking one archive may write in all
    unpack_ratio_limit: float = 100.0  # per packed byte of a ZIP entry (photos: about 1)
    unpack_image_limit_mib: float = 256.0  # per image
    where: str = "data."

    def refuse(self, archive: Path, what: str, key: str = "unpack_limit_gib") -> DataError:
        unit = {"unpack_limit_gib": " GiB", "unpack_ratio_limit": ":1"}.get(key, " MiB")
        setting = f"{self.where}{key}"
        return DataError(
            f"archive={archive} {what}, more than {setting}={getattr(self, key):g}{unit} "
            f"allows: it is not the data set's archive, or a bomb. Nothing was kept; raise "
            f"{setting} if the archive really holds that."
        )


def amount(size: int) -> str:
    """Bytes for a message: in GiB, or MiB below a tenth of one."""
    return f"{size / GIB:.2f} GiB" if size >= GIB / 10 else f"{size / MIB:.1f} MiB"


def verify_archive(path: Path, size: int | None, sha256: str | None, label: str, fix: str) -> str:
    """Check size (cheap) then sha256, naming the file as `label`; return the sha256."""
    actual, digest = path.stat().st_size, hashlib.sha256()
    if size is not None and actual != size:
        raise DataError(
            f"{label} has {actual:,} bytes, the data set's archive has {size:,}: it is "
            f"incomplete or another file. {fix}"
        )
    with path.open("rb") as handle:
        while block := handle.read(MIB):
            digest.update(block)
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        raise DataError(
            f"{label} has sha256 {digest.hexdigest()}, expected {sha256}: the file is "
            f"corrupted or another one. {fix}"
        )
    return digest.hexdigest()


def fetch(
    url: str,
    dest: Path,
    size: int | None = None,
    sha256: str | None = None,
    retries: int = 5,
    retry_wait: float = 2.0,
    progress: bool = True,
    offline_hint: str = OFFLINE_HINT,
) -> str:
    """Download url to dest through dest.part, resumed and retried; deleted unless it has
    `size` bytes and `sha256`. Returns its sha256."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        if (err := _fetch_once(url, part, size, progress, offline_hint)) is None:
            break
        have = part.stat().st_size if part.exists() else 0
        if attempt == retries:
            raise DataError(
                f"Downloading {url} failed {retries + 1} times ({err}); {have:,} bytes "
                f"are kept in {part}. Run the same command again to resume. {offline_hint}"
            )
        wait = retry_wait * 2**attempt
        log.warning("Download interrupted at %s bytes (%s); resuming in %.0f s", have, err, wait)
        time.sleep(wait)
    fix = "It was deleted; run the command again to download it afresh."
    try:
        digest = verify_archive(part, size, sha256, str(part), fix)
    except DataError:
        part.unlink()
        raise
    move_into_place(part, dest)
    return digest


def _fetch_once(url: str, part: Path, size: int | None, progress: bool, hint: str) -> str | None:
    """One HTTP request, appending to part from its length (or from 0): why to retry, or None."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset >= size:
        if offset == size:
            return None
        part.unlink()  # longer than the archive: not ours to resume
        offset = 0
    headers = {"User-Agent": "crack-lightning"} | ({"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing after offset: the server's file is shorter
            part.unlink()
            return "the partial file did not match the server's; starting afresh"
        if err.code >= 500 or err.code == 429:
            return f"HTTP {err.code} {err.reason}"
        raise DataError(f"Downloading {url} failed: HTTP {err.code} {err.reason}. {hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, socket.gaierror):  # no DNS: offline, retrying will not help
            raise DataError(
                f"Cannot download {url}: the host name does not resolve ({reason}); this "
                f"machine looks offline. {hint}"
            ) from None
        return f"cannot connect: {reason}"
    with response:
        ranged = response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
        if offset and response.status != 206:  # the server ignored Range: start again
            offset = 0
        elif offset and not ranged:
            part.unlink()
            return "the server sent another part of the file than asked for"
        length = response.headers.get("Content-Length")
        received, total = offset, offset + int(length) if length is not None else None
        if size is not None and total is not None and total != size:
            raise DataError(
                f"{url} serves {total:,} bytes, the data set's archive has {size:,}: the "
                f"address no longer points at the archive. {hint}"
            )
        with (
            part.open("r+b" if offset else "wb") as out,
            progress_of(total or size, "Downloading", "B", progress, initial=offset) as bar,
        ):
            out.seek(offset)
            out.truncate()
            try:
                while block := response.read(1 << 16):
                    received += out.write(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as err:
                return f"connection lost: {err!r}"
        if total is not None and received < total:
            return f"connection closed after {received:,} of {total:,} bytes"
    return None


def unpack_rar(
    archive: Path,
    dest: Path,
    tool: str | None = None,
    progress: bool = True,
    limit: UnpackLimit | None = None,
) -> str:
    """Unpack with the first tool that parses the RAR's variant (unar 1.10 fails on some RAR5,
    bsdtar 3.6 on solid RAR4), stopped at the bound; neither writes through a link or
    outside dest. Returns the tool's name."""
    limit, failures, tools = limit or UnpackLimit(), [], []
    for name in (names := (tool,) if tool else RAR_TOOLS):
        exe = shutil.which(name)
        if not exe and name == "bsdtar" and (tar := shutil.which("tar")):
            with suppress(OSError, subprocess.SubprocessError):  # macOS's, Windows' tar
                said = subprocess.run(
                    [tar, "--version"], capture_output=True, text=True, timeout=10
                )
                exe = tar if "bsdtar" in said.stdout else None
        tools += [(name, exe)] if exe else []
    if not tools:
        raise DataError(
            f"Extracting a RAR archive needs the `{'` or `'.join(names)}` program, and none "
            f"is on PATH. {INSTALL_HINT}"
        )
    for name, exe in tools:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        command = (  # unar -D: no extra containing folder; -f: overwrite
            [exe, "-f", "-D", "-o", str(dest), str(archive)]
            if name == "unar"
            else [exe, "-x", "-v", "-f", str(archive), "-C", str(dest)]
        )
        with (
            tempfile.TemporaryFile("w+", errors="replace") as out,
            progress_of(None, f"Unpacking ({name})", "B", progress) as bar,
        ):
            try:
                proc = subprocess.Popen(command, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
            except OSError as err:
                raise DataError(f"Could not run {exe}: {err}. {INSTALL_HINT}") from None
            with proc:  # what it wrote is measured every half second
                shown = 0
                while proc.poll() is None:
                    with suppress(subprocess.TimeoutExpired):
                        proc.wait(0.5)
                    bar.update((size := tree_size(dest)) - shown)
                    if (shown := size) > limit.unpack_limit_gib * GIB:
                        proc.kill()
            out.seek(0)
            tail = [line.strip() for line in out.read().splitlines()[-3:]]
        if (written := tree_size(dest)) > limit.unpack_limit_gib * GIB:
            shutil.rmtree(dest, ignore_errors=True)
            raise limit.refuse(archive, f"unpacks to more than {amount(written)}")
        if proc.returncode == 0:
            return name
        said = " / ".join(line.rstrip(".") for line in tail) or "no message"
        failures.append(message := f"{name} exit code {proc.returncode}: {said}")
        if not any(marker in " ".join(tail) for marker in UNSUPPORTED):
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
    """zipfile checks CRCs, keeps every entry inside dest, writes a link as a file and no
    member past its declared size: so the declared sizes are bound, in all and per entry."""
    limit = limit or UnpackLimit()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            if (declared := sum(m.file_size for m in members)) > limit.unpack_limit_gib * GIB:
                big = max(members, key=lambda m: m.file_size)
                unpacked = f"{amount(declared)} unpacked ({big.filename}: {amount(big.file_size)})"
                raise limit.refuse(archive, f"declares {unpacked}")
            for m in members:  # an entry under 1 MiB is not judged by its ratio
                packed = max(m.compress_size, 1)
                if m.file_size > max(MIB, limit.unpack_ratio_limit * packed):
                    ratio = f"{amount(m.file_size)} packed {m.file_size / packed:,.0f}:1"
                    raise limit.refuse(
                        archive, f"holds {m.filename}, {ratio}", "unpack_ratio_limit"
                    )
            for member in track(members, "Unpacking", "file", progress):
                zf.extract(member, dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise DataError(
            f"archive={archive} is not a readable ZIP ({err}). The file is damaged or "
            f"incomplete: delete it and download it again."
        ) from None


def drop_links(folder: Path, archive: Path, limit: UnpackLimit) -> None:
    """Leave only folders and regular files of their own (no links, hard links, FIFOs,
    devices), so nothing read later leads outside; then bound each image's size."""
    removed, images = [], []
    for dirpath, dirnames, names in os.walk(folder):  # links to folders are listed, not walked
        for path in (Path(dirpath) / name for name in dirnames + names):
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                images += [(path, info.st_size)] if is_image_name(path.name) else []
            elif not stat.S_ISDIR(info.st_mode):
                path.unlink()
                removed.append(path.relative_to(folder).as_posix())
    if removed:
        shown = ", ".join(removed[:5]) + (" ..." if len(removed) > 5 else "")
        log.warning(
            "The archive held %d links or special files, not unpacked: %s", len(removed), shown
        )
    for path, size in images:
        if size > limit.unpack_image_limit_mib * MIB:
            what = f"holds the image {path.relative_to(folder).as_posix()}, {amount(size)}"
            raise limit.refuse(archive, what, "unpack_image_limit_mib")


def extract_images(
    archive: Path,
    spec: SourceSpec,
    progress: bool = True,
    rar_tool: str | None = None,
    limit: UnpackLimit | None = None,
) -> dict[str, int]:
    """Unpack into scratch, drop links, move the class folders' images into spec.root:
    METU's flat into ROOT/Negative and ROOT/Positive, another source's with the layout
    under the shallowest folder where its mapping finds images. Images per class."""
    root = spec.root
    with archive.open("rb") as handle:
        head = handle.read(8)
    if not head.startswith((b"Rar!\x1a\x07", b"PK\x03\x04")):
        raise DataError(
            f"archive={archive} is neither a RAR nor a ZIP file (it starts with {head!r}). "
            f"Pass the data set's 'Concrete Crack Images for Classification.rar' or a ZIP of it."
        )
    scratch = root.parent / f".{root.name}.unpacking"
    remove(scratch)
    scratch.mkdir(parents=True)
    try:
        if head.startswith(b"PK"):
            unpack_zip(archive, scratch, progress, limit)
        else:
            unpack_rar(archive, scratch, rar_tool, progress, limit)
        drop_links(scratch, archive, limit or UnpackLimit())
        folders = [Path(dirpath) / d for dirpath, dirs, _ in os.walk(scratch) for d in dirs]
        moves: dict[str, dict[Path, Path]] = {n: {} for n in CLASS_NAMES}  # image: its place
        if spec.shorthand:  # the one Negative/ and one Positive/ folder, any case, any depth
            found = {n: [f for f in folders if f.name.lower() == n.lower()] for n in CLASS_NAMES}
            if any(len(paths) != 1 for paths in found.values()):
                listing = {n: [str(p.relative_to(scratch)) for p in ps] for n, ps in found.items()}
                raise DataError(
                    f"The archive must hold exactly one Negative/ and one Positive/ folder of "
                    f"images; found {listing}. Is it the METU 'Concrete Crack Images for "
                    f"Classification' archive (doi:10.17632/5y9wdsg2zt.2)?"
                )
            for name, (folder,) in found.items():
                (root / name).mkdir(parents=True, exist_ok=True)
                images = [p for p in folder.iterdir() if p.is_file() and is_image_name(p.name)]
                moves[name] = {path: root / name / path.name for path in images}
        else:
            folders = sorted([scratch, *folders], key=lambda p: (len(p.parts), str(p)))
            top = next((f for f in folders if all(count_images(f, spec).values())), None)
            if top is None:
                raise DataError(
                    f"The archive {archive} holds no folders matching {spec.where}.classes "
                    f"({spec.classes}); is it the right archive?"
                )
            for path, label in scan_source(replace(spec, root=top)):
                moves[CLASS_NAMES[label]][Path(path)] = root / Path(path).relative_to(top)
        for path, target in sorted({k: v for m in moves.values() for k, v in m.items()}.items()):
            target.parent.mkdir(parents=True, exist_ok=True)
            move_into_place(path, target)
        return {name: len(images) for name, images in moves.items()}
    finally:
        remove(scratch)


def remove(path: Path) -> None:
    """Remove a folder (or a link or file in its place) without following links."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    shutil.rmtree(path, ignore_errors=True)


def root_spec(root: str | Path) -> SourceSpec:
    """The source data.root=DIR stands for (its split plays no part in fetching)."""
    return SourceSpec.from_root(root, "random", 0)


def count_images(root: Path, spec: SourceSpec | None = None) -> dict[str, int]:
    """Images per class under root by spec's mapping (default data.root's); 0s if lacking."""
    try:
        samples = scan_source(replace(spec or root_spec(root), root=root))
    except DataError:
        return dict.fromkeys(CLASS_NAMES, 0)
    return {name: sum(lab == label for _, lab in samples) for label, name in enumerate(CLASS_NAMES)}


def ensure_source(
    spec: SourceSpec,
    archive: str | Path | None = None,
    keep_archive: bool = False,
    source: Source | None = None,
    progress: bool = True,
    retries: int = 5,
    retry_wait: float = 2.0,
    **bounds: float,
) -> Path:
    """Make spec.root hold the source unless it does: get the archive, verify, extract, mark.
    A data.sources entry's download settings give url, size, sha256, and archive and
    keep_archive unless passed, and its own unpack bounds over those passed."""
    root, settings = spec.root, spec.download or {}
    where = "" if spec.shorthand else f"{spec.where}.download."
    if not spec.shorthand:
        source = source or Source(*map(settings.get, ("url", "size", "sha256")), None, ".zip")
        archive = archive or settings.get("archive")
        keep_archive = keep_archive or bool(settings.get("keep_archive"))
    source = source or METU  # its count per class is exact; a local copy may be a repack
    expected, counts = source.images_per_class, count_images(root, spec)
    if all(n == expected if expected else n for n in counts.values()):
        log.info("%s already holds %s: nothing to do", root, counts)
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(
            f"data.root={root} is not empty but does not hold {expected:,} images per class "
            f"(found {counts}). Move or delete it, or choose another data.root, then run the "
            f"download again."
            if spec.shorthand
            else f"{spec.where}.root={root} is not empty but lacks the source's class folders "
            f"({spec.classes}). Move or delete it, or choose another root, then run again."
        )
    size = None if archive and spec.shorthand else source.size
    if archive is not None:
        if not (path := Path(archive)).is_file():
            hint = "" if where else f" {OFFLINE_HINT}"  # where: a source's setting
            raise DataError(f"{where}archive={path} does not exist.{hint}")
        fix = f"Check {where}sha256 and {where}size, or pass the right archive."
        digest = verify_archive(path, size, source.sha256, f"{where}archive={path}", fix)
    elif not source.url:
        raise DataError(f"{where}url is not set; set it or {where}archive.")
    elif (path := root.with_name(root.name + source.suffix)).exists():
        fix = "Delete it and run the download again."
        digest = verify_archive(path, size, source.sha256, str(path), fix)
    else:
        hint = f"On a machine without internet, download it elsewhere and pass {where}archive=PATH."
        log.info("Downloading %s to %s", source.url, path)
        fetched = (retries, retry_wait, progress, hint if where else OFFLINE_HINT)
        digest = fetch(source.url, path, size, source.sha256, *fetched)
    log.info("Archive %s: sha256 %s", path, digest)
    bounds |= {k: settings[k] for k in sources.UNPACK_BOUNDS if k in settings}
    limit = UnpackLimit(**bounds, where=where or "data.")
    counts = extract_images(path, spec, progress, limit=limit)
    if expected and any(n != expected for n in counts.values()):
        raise DataError(
            f"The archive {path} held {counts} images, not {expected:,} per class: it is not "
            f"the complete data set. {root} was left as unpacked, for a look; delete it "
            f"before trying again."
        )
    folders = {"folders": {k: len(f) for k, f in class_folders(spec).items()}}
    marker = {"source": str(archive or source.url), "sha256": digest}
    write_json(root / MARKER_NAME, marker | (counts if spec.shorthand else folders))
    if archive is None and not keep_archive:
        path.unlink()
    log.info("%s is ready", root)
    return root
