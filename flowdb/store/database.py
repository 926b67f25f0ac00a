"""A connection to the Neo4j that holds flowdb's graphs.

Every driver and server error passes through `neo4j_errors`, the one place that
turns them into a one-line FlowdbError naming the server, the database and what
to do. The graph's data model and its statements live in flowdb.store.graph.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from flowdb.errors import DatabaseError, Neo4jUnavailable, QueryError, QueryTimeout, first_line


class ServerDisk(Protocol):
    """What a Database knows of a server whose disk it can see (flowdb's managed one)."""

    def require_space(self, needed: int, what: str) -> None: ...

# The driver logs each retry against a lost server as a WARNING, which Python prints on
# stderr when no handler is set: a killed server gave ten such lines before flowdb's one.
# An application that configures logging still gets them.
logging.getLogger("neo4j").addHandler(logging.NullHandler())


class Database:
    """A driver plus the database name; use as a context manager to close it."""

    def __init__(self, driver, database: str | None, uri: str, username: str | None = None,
                 server: ServerDisk | None = None):
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
            f"{where} refused the credentials ({first_line(exc)}); check NEO4J_USERNAME and "
            "NEO4J_PASSWORD (flowdb's managed server keeps its password in "
            "FLOWDB_HOME/neo4j/password)") from None
    except (neo.ServiceUnavailable, neo.SessionExpired) as exc:
        what = f"lost the connection to {where}" if db else f"no Neo4j answers at {uri}"
        raise Neo4jUnavailable(f"{what} ({first_line(exc)}); is it running? "
                               "(flowdb neo4j status)") from None
    except neo.ConfigurationError as exc:
        raise Neo4jUnavailable(f"cannot connect to {uri!r}: {first_line(exc)} "
                               "(a Neo4j URI is bolt://HOST:PORT or neo4j://HOST:PORT)") from None
    except neo.Neo4jError as exc:
        code = exc.code or ""
        if code.endswith("DatabaseNotFound"):
            raise DatabaseError(
                f"{where} has no database {database!r}; set NEO4J_DATABASE (or --database) "
                "to one that exists, or leave it unset for the server's default") from None
        if code.endswith("ParameterMissing"):  # the user's statement, not the server, is at fault
            raise QueryError(f"the statement uses a parameter it was not given ({first_line(exc)}); "
                             "pass it with the statement's parameters") from None
        if "TransactionTimedOutClientConfiguration" in code:
            raise QueryTimeout(f"{where} stopped a query at the time limit it was given") from None
        if code.startswith("Neo.TransientError") or code.endswith(("Terminated", "TransactionTimedOut")):
            raise DatabaseError(f"{where} stopped the transaction ({first_line(exc)}); "
                                "nothing of it was kept: run the command again") from None
        if "ConstraintValidationFailed" in code:
            raise DatabaseError(
                f"{where} refused a write that conflicts with stored data ({first_line(exc)}); "
                "is another flowdb command writing the same pack?") from None
        if code.endswith("Forbidden") or code.startswith("Neo.ClientError.Security"):
            raise DatabaseError(f"{where} refused: {first_line(exc)}") from None
        raise DatabaseError(f"{where} ({database or 'default database'}) refused the statement: "
                            f"{first_line(exc)}") from None
    except (neo.DriverError, OSError) as exc:
        raise Neo4jUnavailable(f"{where}: {type(exc).__name__}: {first_line(exc)}; "
                               "is it running? (flowdb neo4j status)") from None
