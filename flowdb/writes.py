"""Files flowdb writes: whole or not at all, and a failed write named in one line.

atomic_write gives a dot-name beside the target (Parquet and CSV readers skip
dot-names), renamed onto the target only once written whole, removed otherwise.
write_errors turns an OSError while writing into a WriteError that names the path:
a full disk (ENOSPC, a quota, a file-size limit) says so and what to do.
writer_lock keeps one writer per folder (an atlas, a link atlas).
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flowdb.errors import BusyError, DiskFullError, FlowdbError, WriteError
from flowdb.settings import private_dirs

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


@contextmanager
def atomic_write(path: str | Path, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; it replaces `path` when the block
    ends well and is removed when it fails. It keeps path's suffix, so writers that pick
    their format by suffix pick the same one. private: mode 0600, else what the umask
    gives a new file."""
    path = Path(path)
    with write_errors(path):
        if private:
            private_dirs(path.parent)  # folders as private as the 0600 file mkstemp makes
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
        os.close(fd)
    partial = Path(name)
    try:
        with write_errors(path):
            if not private:  # mkstemp makes 0600; a file the user asked for gets the usual mode
                os.chmod(partial, 0o666 & ~_UMASK)
            yield partial
            os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def write_errors(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into one line that names it."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc) from None


def write_error(path: str | Path, exc: OSError) -> WriteError:
    code = exc.errno  # Arrow's IO errors carry it too
    if code in NO_SPACE:
        return DiskFullError(f"no space left on the device to write {path}; nothing of it was kept: "
                             "free some space and run again")
    if code == errno.EFBIG:
        return DiskFullError(f"{path} would be larger than this system allows a file to be "
                             "(file-size limit); nothing of it was kept")
    reason = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return WriteError(f"cannot write {path} ({reason})")


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once: setting it to read it is a race with other threads creating files


@contextmanager
def writer_lock(root: Path):
    """One writer per atlas directory (an OS lock: released when its process dies)."""
    try:
        private_dirs(root)
        handle = os.fdopen(os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600), "a+")
    except OSError as exc:
        raise FlowdbError(f"cannot write an atlas in {root} ({exc.strerror}); choose another --out") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"{root} is being written by another flowdb command; "
                            "wait for it to finish, then run again") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
