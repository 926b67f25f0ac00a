"""A connection to the Neo4j that holds flowdb's graphs, and the graph's schema."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from flowdb.errors import Neo4jUnavailable
from flowdb.settings import Neo4jSettings

# Feature nodes are keyed "PACK/LAYER/MODULE/INDEX"; the pack name in the key
# keeps several packs (and models) in one database without collisions.
SCHEMA = (
    "CREATE CONSTRAINT feature_key IF NOT EXISTS FOR (f:Feature) REQUIRE f.key IS UNIQUE",
    "CREATE CONSTRAINT pack_name IF NOT EXISTS FOR (p:Pack) REQUIRE p.name IS UNIQUE",
    "CREATE CONSTRAINT sae_key IF NOT EXISTS FOR (s:SAE) REQUIRE s.key IS UNIQUE",
    "CREATE CONSTRAINT explanation_id IF NOT EXISTS FOR (e:Explanation) REQUIRE e.id IS UNIQUE",
    "CREATE CONSTRAINT nowhere_pack IF NOT EXISTS FOR (n:Nowhere) REQUIRE n.pack IS UNIQUE",
    "CREATE INDEX feature_slot IF NOT EXISTS FOR (f:Feature) ON (f.pack, f.layer, f.module)",
)


class Database:
    """A driver plus the database name; use as a context manager to close it."""

    def __init__(self, driver, database: str | None, uri: str):
        self.driver = driver
        self.database = database
        self.uri = uri

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.driver.close()

    @contextmanager
    def session(self, **kwargs) -> Iterator[Any]:
        with self.driver.session(database=self.database, **kwargs) as session:
            yield session

    def read(self, cypher: str, **params) -> list[dict]:
        """Run a query in a read transaction and return its rows as dicts."""
        records, _, _ = self.driver.execute_query(
            cypher, params, database_=self.database, routing_="r")
        return [record.data() for record in records]

    def write(self, cypher: str, **params) -> list[dict]:
        records, _, _ = self.driver.execute_query(cypher, params, database_=self.database)
        return [record.data() for record in records]

    def write_in_batches(self, cypher: str, **params) -> None:
        """Run a query that commits as it goes (CALL ... IN TRANSACTIONS needs an
        auto-commit transaction)."""
        with self.session() as session:
            session.run(cypher, params).consume()

    def ensure_schema(self) -> None:
        for statement in SCHEMA:
            self.write(statement)


def connect(settings: Neo4jSettings | None = None) -> Database:
    """Connect to the configured Neo4j, starting the managed one when none is configured."""
    from neo4j import GraphDatabase
    from neo4j.exceptions import AuthError, DriverError, Neo4jError

    settings = settings or Neo4jSettings.resolve()
    auth = (settings.username, settings.password)
    if settings.managed:
        from flowdb.neo4j_server import ManagedServer

        server = ManagedServer.default()
        server.start()
        uri, auth = server.uri, None
    else:
        uri = settings.uri
    try:
        # Schema-less warnings ("property does not exist yet") are noise on a fresh graph.
        driver = GraphDatabase.driver(uri, auth=auth, connection_timeout=10,
                                      notifications_min_severity="OFF")
        driver.verify_connectivity()
    except AuthError as exc:
        raise Neo4jUnavailable(f"Neo4j at {uri} refused the credentials: {exc.message}") from None
    except (DriverError, Neo4jError, OSError, ValueError) as exc:
        raise Neo4jUnavailable(f"no Neo4j answers at {uri} ({type(exc).__name__})") from None
    return Database(driver, settings.database, uri)
