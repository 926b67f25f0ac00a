"""Where flowdb keeps its files and which Neo4j it talks to.

Connection settings come from flags, else from the conventional NEO4J_URI,
NEO4J_USERNAME, NEO4J_PASSWORD and NEO4J_DATABASE variables. With no URI at all,
flowdb uses (and starts) its managed local server, which requires the user
neo4j and the password kept in FLOWDB_HOME/neo4j/password (see flowdb.store.server).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from flowdb.errors import ConfigError, Neo4jUnavailable

DEFAULT_MANAGED_PORT = 7688  # not 7687, so a user's own Neo4j is never shadowed
DEFAULT_PAGECACHE_MB = 1024
DEFAULT_QUERY_TIMEOUT_S = 60.0  # no template a researcher waits for runs longer by default
QUERY_TIMEOUT_RANGE_S = (0.1, 86_400.0)  # a tenth of a second to a day
_JAVA_SIZE = re.compile(r"^[1-9]\d*[kKmMgG]?$")  # -Xmx's syntax: bytes, or k/m/g
_ADMIN_MEMORY = re.compile(r"^(?:[1-9]\d*[kKmMgG]?|(?:100|[1-9]\d?)%)$")  # neo4j-admin: a size or a percentage


def flowdb_home() -> Path:
    """The one directory for flowdb's Neo4j jars, data, logs and caches."""
    return Path(os.environ.get("FLOWDB_HOME") or Path.home() / ".flowdb").expanduser()


def home_dir(*parts: str) -> Path:
    """FLOWDB_HOME/parts..., each level created 0700 (or made so): a folder created with
    parents=True would get the umask's 0755 instead."""
    path = private_dir(flowdb_home())
    for part in parts:
        path = private_dir(path / part)
    return path


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


def private_dirs(path: Path) -> Path:
    """Create path and whichever of its parents are missing, each 0700; existing ones are
    left as they are (an atlas may live anywhere the user points it)."""
    missing, folder = [], path
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
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


# --- environment variables: each checked here, so a bad value is one line naming it ----

def env_int(name: str, default: int | None, low: int, high: int) -> int | None:
    """An integer variable in [low, high]; default when unset or empty."""
    return _env_number(name, default, low, high, int, "a whole number")


def env_float(name: str, default: float, low: float, high: float) -> float:
    """A finite number variable in [low, high]; default when unset or empty."""
    return _env_number(name, default, low, high, float, "a number")


def _env_number(name, default, low, high, parse, what: str):
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:  # NaN fails the comparison too
        shown = [f"{bound:g}" if isinstance(bound, float) else str(bound) for bound in (low, high)]
        raise ConfigError(f"{name}={text!r}: give {what} from {shown[0]} to {shown[1]}")
    return value


def env_pattern(name: str, default: str | None, pattern: re.Pattern, what: str) -> str | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not pattern.match(text):
        raise ConfigError(f"{name}={text!r}: give {what}")
    return text


def managed_port() -> int:
    return env_int("FLOWDB_NEO4J_PORT", DEFAULT_MANAGED_PORT, 1, 65535)


def page_cache_mb() -> int:
    return env_int("FLOWDB_NEO4J_PAGECACHE_MB", DEFAULT_PAGECACHE_MB, 8, 1 << 24)


def java_heap(name: str, default: str) -> str:
    """FLOWDB_NEO4J_HEAP or FLOWDB_NEO4J_ADMIN_HEAP: a size for java -Xmx."""
    return env_pattern(name, default, _JAVA_SIZE, "a Java heap size such as 4g, 512m or 2048k")


def query_timeout_s() -> float:
    return env_float("FLOWDB_QUERY_TIMEOUT", DEFAULT_QUERY_TIMEOUT_S, *QUERY_TIMEOUT_RANGE_S)


def import_threads() -> int | None:
    return env_int("FLOWDB_IMPORT_THREADS", None, 1, 1024)


def import_memory() -> str | None:
    return env_pattern("FLOWDB_IMPORT_MEMORY", None, _ADMIN_MEMORY,
                       "a size such as 4g or 512m, or a share of memory such as 80%")


def check_environment() -> None:
    """Check every FLOWDB_* variable flowdb reads, so a bad one fails before any work."""
    managed_port(), page_cache_mb(), query_timeout_s(), import_threads(), import_memory()
    java_heap("FLOWDB_NEO4J_HEAP", ""), java_heap("FLOWDB_NEO4J_ADMIN_HEAP", "")


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
