"""A connection to the Neo4j that holds flowdb's graphs.

Every driver and server error passes through `neo4j_errors`, the one place that
turns them into a one-line FlowdbError naming the server, the database and what
to do. The graph's data model and its statements live in flowdb.graph.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from flowdb.errors import DatabaseError, Neo4jUnavailable, QueryTimeout
from flowdb.settings import Neo4jSettings

if TYPE_CHECKING:
    from flowdb.neo4j_server import ManagedServer

BOLT_SCHEMES = ("bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc")

# The driver logs each retry against a lost server as a WARNING, which Python prints on
# stderr when no handler is set: a killed server gave ten such lines before flowdb's one.
# An application that configures logging still gets them.
logging.getLogger("neo4j").addHandler(logging.NullHandler())


class Database:
    """A driver plus the database name; use as a context manager to close it."""

    def __init__(self, driver, database: str | None, uri: str, username: str | None = None,
                 server: ManagedServer | None = None):
        self.driver = driver
        self.database = database
        self.uri = uri
        self.username = username
        self.server = server  # flowdb's managed server, whose disk flowdb can see; None: another

    @property
    def where(self) -> str:
        return f"{self.uri} (database {self.database or 'default'})"

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.driver.close()

    @contextmanager
    def session(self, **kwargs) -> Iterator[Any]:
        with neo4j_errors(self), self.driver.session(database=self.database, **kwargs) as session:
            yield session

    def read(self, cypher: str, timeout_s: float | None = None, **params) -> list[dict]:
        """Run a query in a read transaction and return its rows as dicts; with
        timeout_s, the server stops it (QueryTimeout) once it has run that long."""
        return self.read_with(cypher, params, timeout_s)

    def read_with(self, cypher: str, params: dict, timeout_s: float | None = None) -> list[dict]:
        """read() with the parameters as a dict: a user's may be named anything (timeout_s too)."""
        return self.read_table(cypher, params, timeout_s)[1]

    def read_table(self, cypher: str, params: dict, timeout_s: float | None = None) -> tuple[list[str], list[dict]]:
        """read_with() plus the result's column names, which a query with no rows has too."""
        from neo4j import Query

        query = Query(cypher, timeout=timeout_s) if timeout_s else cypher
        with neo4j_errors(self):
            records, _, keys = self.driver.execute_query(
                query, params, database_=self.database, routing_="r")
        return list(keys), [record.data() for record in records]

    def write(self, cypher: str, **params) -> list[dict]:
        with neo4j_errors(self):
            records, _, _ = self.driver.execute_query(cypher, params, database_=self.database)
        return [record.data() for record in records]

    def write_in_batches(self, cypher: str, **params) -> None:
        """Run a query that commits as it goes (CALL ... IN TRANSACTIONS needs an
        auto-commit transaction)."""
        with self.session() as session:
            session.run(cypher, params).consume()

    def ensure_schema(self) -> None:
        from flowdb.graph import ensure_schema

        ensure_schema(self)


@contextmanager
def neo4j_errors(db: Database | None = None, uri: str | None = None,
                 database: str | None = None) -> Iterator[None]:
    """Turn driver and server errors into one-line flowdb errors."""
    from neo4j import exceptions as neo

    uri = db.uri if db else uri
    database = db.database if db else database
    where = f"Neo4j at {uri}"
    try:
        yield
    except neo.AuthError as exc:
        raise Neo4jUnavailable(
            f"{where} refused the credentials ({_first_line(exc)}); check NEO4J_USERNAME and "
            "NEO4J_PASSWORD (flowdb's managed server keeps its password in "
            "FLOWDB_HOME/neo4j/password)") from None
    except (neo.ServiceUnavailable, neo.SessionExpired) as exc:
        what = f"lost the connection to {where}" if db else f"no Neo4j answers at {uri}"
        raise Neo4jUnavailable(f"{what} ({_first_line(exc)}); is it running? "
                               "(flowdb neo4j status)") from None
    except neo.ConfigurationError as exc:
        raise Neo4jUnavailable(f"cannot connect to {uri!r}: {_first_line(exc)} "
                               "(a Neo4j URI is bolt://HOST:PORT or neo4j://HOST:PORT)") from None
    except neo.Neo4jError as exc:
        code = exc.code or ""
        if code.endswith("DatabaseNotFound"):
            raise DatabaseError(
                f"{where} has no database {database!r}; set NEO4J_DATABASE (or --database) "
                "to one that exists, or leave it unset for the server's default") from None
        if "TransactionTimedOutClientConfiguration" in code:
            raise QueryTimeout(f"{where} stopped a query at the time limit it was given") from None
        if code.startswith("Neo.TransientError") or code.endswith(("Terminated", "TransactionTimedOut")):
            raise DatabaseError(f"{where} stopped the transaction ({_first_line(exc)}); "
                                "nothing of it was kept: run the command again") from None
        if "ConstraintValidationFailed" in code:
            raise DatabaseError(
                f"{where} refused a write that conflicts with stored data ({_first_line(exc)}); "
                "is another flowdb command writing the same pack?") from None
        if code.endswith("Forbidden") or code.startswith("Neo.ClientError.Security"):
            raise DatabaseError(f"{where} refused: {_first_line(exc)}") from None
        raise DatabaseError(f"{where} ({database or 'default database'}) refused the statement: "
                            f"{_first_line(exc)}") from None
    except (neo.DriverError, OSError) as exc:
        raise Neo4jUnavailable(f"{where}: {type(exc).__name__}: {_first_line(exc)}; "
                               "is it running? (flowdb neo4j status)") from None


def _first_line(exc: BaseException) -> str:
    text = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _host_and_port_parse(uri: str) -> bool:
    """Whether the URI's host and port read as such (a port of letters, or a broken IPv6
    address, would otherwise fail inside the driver with no message of flowdb's)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
        return parts.port is None or 0 < parts.port
    except ValueError:
        return False


def connect(settings: Neo4jSettings | None = None) -> Database:
    """Connect to the configured Neo4j, starting the managed one when none is configured.

    The database is checked too, so a wrong NEO4J_DATABASE fails here in one line."""
    from neo4j import GraphDatabase

    settings = settings or Neo4jSettings.resolve()
    if settings.managed:
        from flowdb.neo4j_server import ManagedServer

        server = ManagedServer.default()
        server.start()
        uri, auth = server.uri, server.auth()
    else:
        uri, auth = settings.uri, (settings.username, settings.password)
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        if scheme not in BOLT_SCHEMES or not _host_and_port_parse(uri):
            raise Neo4jUnavailable(f"cannot connect to {uri!r}: not a Neo4j URI "
                                   "(a Neo4j URI is bolt://HOST:PORT or neo4j://HOST:PORT)")
    with neo4j_errors(uri=uri, database=settings.database):
        # Schema-less warnings ("property does not exist yet") are noise on a fresh graph.
        driver = GraphDatabase.driver(uri, auth=auth, connection_timeout=10,
                                      notifications_min_severity="OFF")
    db = Database(driver, settings.database, uri, auth[0] if auth else None,
                  server if settings.managed else None)
    try:
        # A session, not execute_query: the latter retries an unreachable server for 30 s.
        with neo4j_errors(uri=uri, database=settings.database):
            driver.verify_connectivity()
            with driver.session(database=settings.database, default_access_mode="READ") as session:
                session.run("RETURN 1").consume()
    except BaseException:
        driver.close()
        raise
    return db
