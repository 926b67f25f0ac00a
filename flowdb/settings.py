"""Where flowdb keeps its files and which Neo4j it talks to.

Connection settings come from flags, else from the conventional NEO4J_URI,
NEO4J_USERNAME, NEO4J_PASSWORD and NEO4J_DATABASE variables. With no URI at all,
flowdb uses (and starts) its managed local server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MANAGED_PORT = 7688  # not 7687, so a user's own Neo4j is never shadowed


def flowdb_home() -> Path:
    """The one directory for flowdb's Neo4j jars, data, logs and caches."""
    return Path(os.environ.get("FLOWDB_HOME") or Path.home() / ".flowdb").expanduser()


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
    ) -> "Neo4jSettings":
        env = os.environ
        return cls(
            uri=uri or env.get("NEO4J_URI") or None,
            username=username or env.get("NEO4J_USERNAME") or "neo4j",
            password=password or env.get("NEO4J_PASSWORD") or "password",
            database=database or env.get("NEO4J_DATABASE") or None,
        )
