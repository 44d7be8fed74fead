"""Opening input files safely: only regular files, within size limits, folders walked to a bound.

Every file a user hands the pipeline (a release's splits, a probe source, the rehearsal prompts,
the params file) is opened with :func:`open_regular`: ``O_NONBLOCK`` so that a named pipe cannot
block the open, then ``fstat`` on the opened descriptor (no race between the check and the read),
and anything but a regular file is refused at once. A missing file, a dangling symbolic link, a
link loop, a directory, a pipe, a device and a socket each get their own words.
:func:`read_lines` then bounds each line and the whole file. Folder walks (:func:`walk`) stop at
:data:`MAX_DEPTH` levels and :data:`MAX_ENTRIES` entries instead of recursing without end.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

MAX_DEPTH = 16  # folder levels below a release folder
MAX_ENTRIES = 10_000  # files and folders in a release folder, at every depth together
MAX_LINE_BYTES = 1_000_000  # one JSONL record (the text limits of params.data are far below)
MAX_FILE_BYTES = 1 << 30  # one input file (1 GiB)


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the rule broken."""

    def __init__(self, file: Path | str, line: int | None, rule: str):
        self.file, self.line, self.rule = str(file), line, rule
        super().__init__(f"{file}:{line}: {rule}" if line else f"{file}: {rule}")


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def not_a_file(mode: int) -> str | None:
    """Why a file of this ``st_mode`` cannot be read as input, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return f"is {_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}, not a regular file"


def open_error(path: Path, exc: OSError) -> str:
    """The rule an ``OSError`` from opening ``path`` breaks, in words."""
    if exc.errno == errno.ENOENT:
        if os.path.islink(path):
            return f"dangling symbolic link (to {os.readlink(path)}, which does not exist)"
        return "file is missing"
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (the link leads back to itself)"
    if exc.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENXIO:
        return "is a socket or a device without a reader, not a regular file"
    if exc.errno == errno.ENAMETOOLONG:
        return "the path is too long"
    return f"cannot be opened ({exc.strerror or exc})"


def open_regular(path: Path | str, max_bytes: int = MAX_FILE_BYTES) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file of at most ``max_bytes``;
    otherwise a :class:`DataError` that says what it is instead. Never blocks."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise DataError(path, None, open_error(path, exc)) from None
    except ValueError:  # a NUL in the path
        raise DataError(repr(str(path)), None, "the path holds a NUL character") from None
    try:
        info = os.fstat(fd)
        why = not_a_file(info.st_mode)
        if why is None and info.st_size > max_bytes:
            why = f"file is {info.st_size} bytes, over the limit of {max_bytes}"
        if why:
            raise DataError(path, None, why)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: Path | str) -> None:
    """Raise what :func:`open_regular` raises, without reading."""
    open_regular(path).close()


def read_bytes(path: Path | str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The whole file, checked like :func:`open_regular`."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while read
        raise DataError(path, None, f"file is over the limit of {max_bytes} bytes")
    return data


def read_text(path: Path | str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The whole file as UTF-8 text; a byte that is not UTF-8 is named."""
    data = read_bytes(path, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(path, line, f"not valid UTF-8 (byte 0x{data[exc.start]:02x})") from None


def read_lines(
    path: Path | str, max_line_bytes: int = MAX_LINE_BYTES, max_bytes: int = MAX_FILE_BYTES
) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a regular file; a line over ``max_line_bytes`` is an error
    naming it, and so is a file that grows past ``max_bytes`` while read."""
    total = 0
    with open_regular(path, max_bytes) as f:
        for lineno in itertools.count(1):
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            if len(raw) > max_line_bytes and not (
                len(raw) == max_line_bytes + 1 and raw.endswith(b"\n")
            ):
                raise DataError(path, lineno, f"line is longer than {max_line_bytes} bytes")
            total += len(raw)
            if total > max_bytes:
                raise DataError(path, None, f"file is over the limit of {max_bytes} bytes")
            yield lineno, raw


def walk(
    folder: Path, max_depth: int = MAX_DEPTH, max_entries: int = MAX_ENTRIES
) -> Iterator[Path]:
    """Every entry below ``folder`` (links listed, not followed), breadth first, without
    recursion; a :class:`DataError` past ``max_depth`` levels or ``max_entries`` entries."""
    level, seen = [Path(folder)], 0
    for _ in range(max_depth + 1):
        below: list[Path] = []
        for d in level:
            try:
                with os.scandir(d) as entries:
                    children = sorted(entries, key=lambda e: e.name)
            except OSError as exc:
                raise DataError(d, None, f"folder cannot be listed ({exc.strerror})") from None
            for entry in children:
                seen += 1
                if seen > max_entries:
                    raise DataError(
                        folder, None, f"holds more than {max_entries} files and folders"
                    )
                yield Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    below.append(Path(entry.path))
        if not below:
            return
        level = below
    raise DataError(folder, None, f"folders nested deeper than {max_depth} levels")
