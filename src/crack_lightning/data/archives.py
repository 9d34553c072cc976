"""Unpacking the data set's RAR (or a ZIP) archive into ROOT/Negative and ROOT/Positive.

Python reads ZIP itself. RAR needs an external tool: `unar` (Debian/Ubuntu package
unar, Homebrew unar) is tried first because it checks every file's checksum and reads
all RAR 4 archives, solid ones included; `bsdtar` (libarchive; package libarchive-tools,
built into macOS and Windows 10+ as tar) takes the RAR 5 variants unar 1.10 cannot
parse. Either tool unpacks into a scratch folder beside the root; only the class
folders' regular image files are then moved into place, so stray paths or links in an
archive cannot write or point elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from collections import deque
from pathlib import Path

from crack_lightning.data.layout import CLASS_NAMES, IMG_EXTENSIONS
from crack_lightning.errors import DataError
from crack_lightning.io import move_into_place
from crack_lightning.progress import progress as progress_of
from crack_lightning.progress import track

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


def unpack_rar(archive: Path, dest: Path, tool: str | None = None, progress: bool = True) -> str:
    """Unpack every member of a RAR archive into dest (emptied first); return the tool used.

    Neither tool reads every RAR variant (unar 1.10 fails on some RAR5 archives, bsdtar
    3.6 on solid RAR4 ones), so a tool that cannot parse the format hands the archive to
    the next. A damaged archive (a checksum or length error) stops at once.
    """
    tools = find_rar_tools(tool)
    failures = []
    for name, exe in tools:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        code, tail = _run_counting_lines(rar_command(name, exe, archive, dest), name, progress)
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


def _run_counting_lines(command: list[str], name: str, progress: bool) -> tuple[int, list[str]]:
    """Run command; one progress step per output line (one per file); exit code, last lines."""
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
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.strip())
                bar.update(1)
            return proc.wait(), list(tail)
    except OSError as err:
        raise DataError(f"Could not run {command[0]}: {err}. {INSTALL_HINT}") from None


def unpack_zip(archive: Path, dest: Path, progress: bool = True) -> None:
    """Unpack a ZIP member by member; zipfile checks each CRC and drops '..' from paths."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for member in track(members, "Unpacking", "file", progress):
                zf.extract(member, dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise DataError(
            f"archive={archive} is not a readable ZIP ({err}). The file is damaged or "
            f"incomplete: delete it and download it again."
        ) from None


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


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


def extract_images(
    archive: Path, root: Path, progress: bool = True, rar_tool: str | None = None
) -> dict[str, int]:
    """Unpack archive and move its class folders' images to root/Negative, root/Positive.

    Returns the number of images moved per class. A scratch folder beside root holds the
    unpacked files meanwhile and is removed afterwards, whatever happens.
    """
    kind = archive_kind(archive)
    scratch = root.parent / f".{root.name}.unpacking"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        if kind == "zip":
            unpack_zip(archive, scratch, progress)
        else:
            unpack_rar(archive, scratch, rar_tool, progress)
        counts = {}
        for name, folder in find_unpacked_classes(scratch).items():
            target = root / name
            target.mkdir(parents=True, exist_ok=True)
            images = sorted(
                p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and is_image(p)
            )
            for path in images:
                move_into_place(path, target / path.name)
            counts[name] = len(images)
        return counts
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
