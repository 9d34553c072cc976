"""A minimal writer of RAR 4 archives with stored (uncompressed) files, for tests.

No Python package writes RAR, and the `rar` program is not free software. Stored RAR 4
is simple (RAR 4 technote: marker, archive header, one header per file, end block,
each header guarded by the low 16 bits of its CRC-32), and unar and bsdtar read it like
any RAR: enough to run the data set's own layout through the real RAR tools.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

MARKER = b"Rar!\x1a\x07\x00"
DOS_TIME = (2019 - 1980) << 25 | 1 << 21 | 1 << 16  # 2019-01-01 00:00:00


def _block(head_type: int, flags: int, body: bytes) -> bytes:
    head = struct.pack("<BHH", head_type, flags, 7 + len(body)) + body
    return struct.pack("<H", zlib.crc32(head) & 0xFFFF) + head


def write_rar4(
    path: Path, files: Mapping[str, bytes], links: Mapping[str, str] | None = None
) -> Path:
    """Write files (archive name with '/' -> content) as a stored, non-solid RAR 4, after
    `links` (name -> target) as Unix symbolic links (the target stored as the data), so
    that a file may try to land through one."""
    out = bytearray(MARKER)
    out += _block(0x73, 0, b"\x00" * 6)  # archive header: two reserved fields
    entries = [(name, target.encode(), 0o120777) for name, target in (links or {}).items()]
    entries += [(name, data, 0o100644) for name, data in files.items()]
    for name, data, mode in entries:
        encoded = name.replace("/", "\\").encode()  # RAR 4 separates with backslashes
        body = struct.pack(
            "<IIBIIBBHI",
            len(data),  # packed size
            len(data),  # unpacked size
            3,  # host OS: Unix
            zlib.crc32(data),
            DOS_TIME,
            20,  # version needed: 2.0
            0x30,  # method: store
            len(encoded),
            mode,  # attributes: Unix mode (a regular file or a link)
        )
        out += _block(0x74, 0x8000, body + encoded) + data  # 0x8000: data follows
    out += _block(0x7B, 0x4000, b"")  # end of archive
    path.write_bytes(bytes(out))
    return path
