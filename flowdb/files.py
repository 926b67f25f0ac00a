"""The one check every reader of a user's file makes before opening it.

flowdb reads manifests, SAE files, label files and atlas parts only when they are
regular files (or symlinks to one): opening a FIFO blocks until someone writes to
it, and a device such as /dev/zero never ends. Small formats also have a size bound,
checked before a byte is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from flowdb.errors import FlowdbError

# A manifest or an SAE's cfg.json is a few kilobytes; a thousand times that is not one.
SMALL_FILE_BYTES = 1 << 20

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def regular_file(path: str | Path, what: str, *, max_bytes: int | None = None,
                 error: type[FlowdbError] = FlowdbError, where: str = "") -> Path:
    """`path` when it is a regular file (symlinks followed) of at most `max_bytes`.

    Otherwise `error` in one line, "{where}{path}: ...", naming what it is instead.
    OSError from stat (FileNotFoundError above all) is left to the caller, which
    knows how to word a missing file."""
    path = Path(path)
    mode_size = os.stat(path)
    if not stat.S_ISREG(mode_size.st_mode):
        kind = next((name for test, name in _KINDS if test(mode_size.st_mode)), "not a file")
        raise error(f"{where}{path}: {kind}, not a regular file; flowdb reads the {what} only "
                    "from a regular file (or a symlink to one)")
    if max_bytes is not None and mode_size.st_size > max_bytes:
        raise error(f"{where}{path}: {mode_size.st_size} bytes, more than the {max_bytes} bytes "
                    f"a {what} can take")
    return path


def read_small_text(path: str | Path, what: str, *, error: type[FlowdbError] = FlowdbError,
                    where: str = "", max_bytes: int = SMALL_FILE_BYTES) -> str:
    """The text of a small regular file, read no further than `max_bytes` (so a file
    that grows after the check is still not read without end)."""
    regular_file(path, what, max_bytes=max_bytes, error=error, where=where)
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{where}{path}: more than the {max_bytes} bytes a {what} can take")
    return data.decode("utf-8")


def read_config_text(directory: Path, name: str, *, error: type[FlowdbError], where: str) -> str:
    """The text of a source directory's small config file (an SAE's cfg.json, a transcoder
    set's config.yaml); `error` in one line, starting with `where`, for a directory that
    is not there, a missing file, or one that cannot be read as text."""
    if not directory.is_dir():
        raise error(f"{where}: no such directory")
    try:
        return read_small_text(directory / name, name, error=error, where=f"{where}: ")
    except FileNotFoundError:
        raise error(f"{where}: missing {name}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{where}: unreadable {name} ({type(exc).__name__}: {exc})") from None
