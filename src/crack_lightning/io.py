"""Every file written or read with care, in one place.

- Writes are atomic: the file is written beside its final name, synced to disk and renamed
  over the old one, so a kill (or a full disk) leaves the previous file whole. Training's
  checkpoints are saved through here too (training/callbacks.py, AtomicCheckpointIO).
- Moves into place (downloads, unpacked folders, staged data sets) are one rename.
- PyTorch files are read with `weights_only=True`: tensors and plain containers only,
  never pickled code.
- A write that the disk or the place explains (full, read-only, no permission, a file
  where a folder should be) is a WriteError naming the file and the cause, so commands
  print one `error:` line; any other failure (a bug) keeps its traceback.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from io import StringIO
from pathlib import Path
from typing import IO, Any

from crack_lightning.errors import CrackLightningError, WriteError

TEMP_SUFFIX = ".partial"
# causes of a failed write that lie in the disk or the place, not in the code
WRITE_FAILURES = {
    errno.ENOSPC,  # a full disk
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,  # a read-only file system
    errno.EACCES,  # no permission
    errno.EPERM,
    errno.ENOTDIR,  # a file where a folder should be
    errno.EEXIST,
    errno.EISDIR,
    errno.ENOENT,  # a folder that cannot hold files (/proc) or vanished
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.EIO,  # a failing disk
}


def temp_path(path: Path) -> Path:
    """Where path is written before it is renamed into place: same folder, hidden, unique
    to this writer (two processes, or two objects of one, may write the same target)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def write_cause(err: BaseException) -> OSError | None:
    """The OSError with a WRITE_FAILURES cause behind err, if any (torch.save reports a
    full disk as a RuntimeError raised while handling it)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in WRITE_FAILURES:
            return current
        current = current.__cause__ or current.__context__
    return None


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing parent of path that is not a folder, if one is."""
    for parent in Path(path).parents:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


def write_failure(path: Path, cause: OSError, setting: str | None = None) -> str:
    """One line: which file could not be written, and why."""
    where = f"{setting}={path}" if setting else str(path)
    blocker = file_in_the_way(path)
    if blocker is not None:
        reason = f"{blocker} is a file, not a folder"
    elif cause.errno == errno.ENOENT:
        reason = f"{path.parent} cannot hold new files ({cause.strerror})"
    else:
        reason = cause.strerror or os.strerror(cause.errno)
    if setting:
        return f"cannot write {where}: {reason}; choose another place."
    return (
        f"cannot write {where}: {reason}; free space or fix the folder and run again (any "
        f"earlier {path.name} is unchanged)."
    )


@contextmanager
def write_errors(path: Path, setting: str | None = None) -> Iterator[None]:
    """Failures to write path that the disk or the place explains, as a WriteError naming
    path (and the setting that chose it); every other error passes unchanged."""
    try:
        yield
    except CrackLightningError:
        raise
    except Exception as err:
        cause = write_cause(err)
        if cause is None:
            raise
        raise WriteError(write_failure(Path(path), cause, setting)) from err


def check_writable(path: Path, setting: str, folder: bool = False, make: bool = True) -> None:
    """Stop before any slow step if the file `setting` names (or, with folder=True, files
    inside the folder it names) cannot be written: the folder is made and a probe file
    created in it and removed at once. With make=False a folder that does not exist yet
    stays unmade (another program makes it: Hydra its run directory) and the nearest
    existing folder above it is probed instead."""
    path = Path(path)
    if not folder and path.is_dir():
        raise WriteError(f"{setting}={path} is a folder; name a file (inside it).")
    if folder and (path.exists() or path.is_symlink()) and not path.is_dir():
        raise WriteError(f"{setting}={path} is a file, not a folder; name a folder.")
    where = path if folder else path.parent
    with write_errors(path, setting):
        if make:
            where.mkdir(parents=True, exist_ok=True)
        else:
            where = nearest_existing(where)
            if not where.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(where))
        probe = temp_path(where / "probe")
        probe.open("xb").close()
        probe.unlink()


def nearest_existing(path: Path) -> Path:
    """path itself if it exists, else its nearest existing parent."""
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def write_atomically(
    path: Path, write: Callable[[IO[bytes]], None], clean_leftovers: bool = True
) -> None:
    """Write path via a synced temp file in its folder and an atomic rename. Leftover temp
    files of the same target (from killed runs) are removed afterwards unless other live
    writers may own them (`clean_leftovers=False`)."""
    path = Path(path)
    partial = temp_path(path)
    try:
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
    except BaseException:
        with suppress(OSError):  # its folder could not be made: there is nothing to remove
            partial.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)
    if clean_leftovers:
        for leftover in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """A text file (UTF-8), atomically."""
    write_atomically(Path(path), lambda handle: handle.write(text.encode()))


def write_csv(
    path: Path, header: Sequence[str], rows: Iterable[Sequence[Any] | Mapping[str, Any]]
) -> None:
    """A CSV table, atomically; a row given as a mapping is read by the header's names
    (a name it lacks is an empty cell)."""
    table = StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(header)
    for row in rows:
        writer.writerow([row.get(name, "") for name in header] if isinstance(row, Mapping) else row)
    write_text(path, table.getvalue())


def write_json(path: Path, value: Any) -> None:
    """A JSON file, indented, atomically; NaN and infinity are refused (not valid JSON)."""
    write_text(path, json.dumps(value, indent=2, allow_nan=False) + "\n")


def save_torch(value: Any, path: Path, clean_leftovers: bool = True) -> None:
    """torch.save, atomically."""
    import torch  # here, so that a command's --help and its checks start without torch

    write_atomically(Path(path), lambda handle: torch.save(value, handle), clean_leftovers)


def move_into_place(source: Path, target: Path) -> None:
    """Rename a finished file or folder over `target` (same filesystem: atomic), durably."""
    target = Path(target)
    os.replace(source, target)
    sync_folder(target.parent)


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load_safely(
    path: str | Path, setting: str, error: type[CrackLightningError], missing_hint: str
) -> Any:
    """torch.load(weights_only=True) with one-line errors that name the setting and file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{setting}={path} does not exist. {missing_hint}")
    if path.stat().st_size == 0:
        raise error(f"{setting}={path} is empty (0 bytes): not a PyTorch file. {missing_hint}")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe files
        raise error(
            f"{setting}={path} could not be read as a tensors-only PyTorch file: "
            f"{load_error_reason(err)}"
        ) from None


def load_error_reason(err: Exception) -> str:
    """torch.load's error in one line, without its advice to load with weights_only=False
    (which would run whatever code the file holds)."""
    if isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError):
        return f"cannot be read ({err.strerror})."  # not a fault of the file's bytes
    if isinstance(err, EOFError):
        return "the file ends early (cut short while being written or copied)."
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
        kept = [
            part
            for part in str(err).split("\n\n")
            if part.strip()
            and "weights_only" not in part
            and not part.startswith("Check the documentation")
        ]
        detail = " ".join(kept).strip()
        if "GLOBAL" not in detail:  # the unpickler met bytes that are no pickle at all
            return f"not a PyTorch file ({detail})."
        return f"it holds more than tensors, refused for safety ({detail})."
    if isinstance(err, KeyError | pickle.UnpicklingError | UnicodeDecodeError):
        return "not a PyTorch file."
    first = str(err).split(". ")[0].replace("\n", " ").strip()
    return f"corrupt or truncated ({type(err).__name__}: {first})."
