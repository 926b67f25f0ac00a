"""Where flowdb keeps its files and which Neo4j it talks to.

Connection settings come from flags, else from the conventional NEO4J_URI,
NEO4J_USERNAME, NEO4J_PASSWORD and NEO4J_DATABASE variables. With no URI at all,
flowdb uses (and starts) its managed local server, which requires the user
neo4j and the password kept in FLOWDB_HOME/neo4j/password (see flowdb.neo4j_server).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from flowdb.errors import Neo4jUnavailable

DEFAULT_MANAGED_PORT = 7688  # not 7687, so a user's own Neo4j is never shadowed


def flowdb_home() -> Path:
    """The one directory for flowdb's Neo4j jars, data, logs and caches."""
    return Path(os.environ.get("FLOWDB_HOME") or Path.home() / ".flowdb").expanduser()


def private_dir(path: Path) -> Path:
    """Create `path` readable by its owner only (0700), or take group and other
    access away from an existing one: it holds the managed server's password."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = path.stat().st_mode
    except OSError as exc:
        raise Neo4jUnavailable(f"cannot create the directory {path} ({exc.strerror}); "
                               "set FLOWDB_HOME to a directory you can write") from None
    if mode & stat.S_ISVTX:  # /tmp and the like: shared by design, never ours to lock
        raise Neo4jUnavailable(
            f"{path} is a shared directory (sticky bit set); point FLOWDB_HOME at a directory "
            "of flowdb's own, e.g. ~/.flowdb")
    make_private(path)
    return path


def make_private(path: Path) -> None:
    """Take group and other permissions away from one file or directory."""
    try:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077 and not path.is_symlink():
            os.chmod(path, mode & ~0o077)
    except FileNotFoundError:
        pass
    except PermissionError:
        raise Neo4jUnavailable(
            f"cannot make {path} private to its owner (it belongs to another user); "
            "point FLOWDB_HOME at a directory of your own") from None


def managed_port() -> int:
    return int(os.environ.get("FLOWDB_NEO4J_PORT") or DEFAULT_MANAGED_PORT)


@dataclass(frozen=True)
class Neo4jSettings:
    uri: str | None  # None means the managed local server
    username: str
    password: str
    database: str | None

    @property
    def managed(self) -> bool:
        return self.uri is None

    @classmethod
    def resolve(
        cls,
        uri: str | None = None,
        username: str | None = None,
        password: str | None = None,
        database: str | None = None,
    ) -> Neo4jSettings:
        env = os.environ
        return cls(
            uri=uri or env.get("NEO4J_URI") or None,
            username=username or env.get("NEO4J_USERNAME") or "neo4j",
            password=password or env.get("NEO4J_PASSWORD") or "password",
            database=database or env.get("NEO4J_DATABASE") or None,
        )
