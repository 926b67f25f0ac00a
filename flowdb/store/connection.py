"""connect(): the Neo4j that holds flowdb's graphs, as configured (flags, NEO4J_* variables),
else flowdb's managed server, started when needed."""

from __future__ import annotations

from flowdb.errors import Neo4jUnavailable
from flowdb.settings import Neo4jSettings
from flowdb.store.database import Database, neo4j_errors
from flowdb.store.server import ManagedServer

BOLT_SCHEMES = ("bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc")


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
                                      notifications_min_severity="OFF", **_retries(settings))
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


# flowdb's managed server is one local process: once it is gone, the driver's 30 s of
# retries (meant for a cluster electing a new leader) only delay the one-line error.
MANAGED_RETRY_S = 5.0


def _retries(settings: Neo4jSettings) -> dict:
    return {"max_transaction_retry_time": MANAGED_RETRY_S} if settings.managed else {}
