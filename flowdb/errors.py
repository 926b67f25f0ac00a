"""flowdb's exceptions. The CLI prints their message as one line and exits 1."""


class FlowdbError(Exception):
    """A problem the user can act on; the message says what and where."""


class ConfigError(FlowdbError):
    """An environment variable flowdb reads holds a value it cannot use."""


class ManifestError(FlowdbError):
    """The pack manifest is malformed or names something that does not exist."""


class PackError(FlowdbError):
    """SAE weights that cannot be matched: unreadable, mis-shaped or degenerate."""


class BuildConflict(FlowdbError):
    """The pack already exists in the database with other build parameters."""


class Neo4jUnavailable(FlowdbError):
    """No Neo4j answers at the configured address, or the managed one cannot start."""


class QueryError(FlowdbError):
    """An unknown template, a missing or unknown parameter, or a failing query."""


class NotFound(QueryError):
    """The pack, feature or Neuronpedia source asked for is not stored; the message says what is."""


class ReadOnlyRefused(QueryError):
    """Neo4j's plan of a statement run read-only shows it does more than read the graph."""


class StatementRejected(QueryError):
    """Neo4j cannot plan a statement (syntax, unknown procedure, several statements)."""


class DatabaseError(FlowdbError):
    """Neo4j answered but refused or stopped the work (unknown database, conflict, ...)."""


class QueryTimeout(DatabaseError):
    """A read ran past the time limit flowdb gave it, and the server stopped it."""


class BusyError(FlowdbError):
    """Another flowdb command holds the lock on the same pack."""


class StaleBuildError(FlowdbError):
    """The SAE files or manifest differ from what a stored graph was built from."""


class WriteError(FlowdbError):
    """A file flowdb writes could not be written; nothing half-written is left."""


class DiskFullError(WriteError):
    """No room: the device is full, or the write would pass a quota or file-size limit,
    or a build would not fit in the store's free space."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line: what a one-line error quotes."""
    text = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def number_text(value) -> str:
    """A number as an error message writes it: a whole number in full (999999999, not 1e+09),
    any other as %g."""
    if isinstance(value, int):
        return str(value)
    try:
        if float(value).is_integer() and abs(value) < 1e18:
            return str(int(value))
    except (TypeError, ValueError, OverflowError):
        return str(value)
    return f"{value:g}"
