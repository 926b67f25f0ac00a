"""Whether raw Cypher may run read-only: Neo4j's own planner decides.

`check_read_only` asks the server to plan the statement (`EXPLAIN`, in a read
transaction: nothing runs) and refuses it unless

- the planner calls it read-only (the summary's query type is "r");
- its plan holds no operator that reads files or URLs, commits on its own or
  administers the server (REFUSED_OPERATORS, any `Show...` or `Terminate...`
  command, anything planned for the system database);
- every procedure it calls is one of INTROSPECTION_PROCEDURES, and it calls no
  user-defined (plugin) function. Cypher's built-in functions are not procedures
  and are allowed.

A statement Neo4j cannot plan (a syntax error, an unknown procedure, two
statements) is refused with the server's own message. The decision rests on the
names in the server's plan, never on the statement's text, so case, comments,
backticks, whitespace and subqueries change nothing. `flowdb cypher` uses it;
`read` is the one call for anything else that runs a user's Cypher read-only.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

from flowdb.errors import QueryError, QueryTimeout, ReadOnlyRefused, StatementRejected

# Introspection a reader may call: the graph's labels, types, keys and schema, and
# the full-text index search. Everything else (dbms.*, db.clearQueryCaches,
# tx.setMetaData, plugins, ...) is refused.
INTROSPECTION_PROCEDURES = frozenset({
    "db.labels", "db.relationshipTypes", "db.propertyKeys",
    "db.schema.visualization", "db.schema.nodeTypeProperties", "db.schema.relTypeProperties",
    "db.index.fulltext.queryNodes", "db.index.fulltext.queryRelationships",
})
# Plan operators (the name before "@database") that a read transaction would still run.
REFUSED_OPERATORS = {
    "LoadCSV": "LOAD CSV reads files or URLs",
    "TransactionApply": "CALL ... IN TRANSACTIONS commits on its own",
    "TransactionForeach": "CALL ... IN TRANSACTIONS commits on its own",
    "AdministrationCommand": "administration commands are refused",
    "SystemProcedureCall": "administration commands are refused",
}
QUERY_TYPES = {"w": "writes", "rw": "reads and writes", "s": "is a schema or administration command"}
EXPLAIN = "EXPLAIN "  # the prefix shifts the server's column and offset figures
_POSITION = re.compile(r"\(line (\d+), column (\d+) \(offset: (\d+)\)\)")


def read(db, statement: str, params: dict[str, Any] | None = None, timeout_s: float | None = None) -> list[dict]:
    """Run raw Cypher read-only, after check_read_only lets it through; rows as dicts."""
    return read_table(db, statement, params, timeout_s)[1]


def read_table(db, statement: str, params: dict[str, Any] | None = None,
               timeout_s: float | None = None) -> tuple[list[str], list[dict]]:
    """read(), plus the result's column names in RETURN order (there with no rows too)."""
    check_read_only(db, statement, params)
    return db.read_table(statement, params or {}, timeout_s)


def read_frame(db, statement: str, params: dict[str, Any] | None = None, timeout_s: float | None = None):
    """Raw Cypher run read-only, as `flowdb cypher` and flowdb.cypher() run it: a pandas
    DataFrame whose columns follow RETURN (with no rows too); past timeout_s it is stopped."""
    import pandas as pd

    try:
        columns, rows = read_table(db, statement, params, timeout_s)
    except QueryTimeout:
        raise QueryError(f"the statement ran past its {timeout_s:g} s limit and was stopped") from None
    return pd.DataFrame(rows, columns=columns)


def check_read_only(db, statement: str, params: dict[str, Any] | None = None) -> None:
    """Raise ReadOnlyRefused or StatementRejected unless `statement` only reads."""
    summary = explain(db, statement, params)
    reason = refusal(summary, user_functions(db))
    if reason:
        raise ReadOnlyRefused(f"read-only guard: {reason}")


def explain(db, statement: str, params: dict[str, Any] | None = None):
    """The server's plan summary of `statement`, planned in a read transaction."""
    from neo4j.exceptions import ClientError

    from flowdb.store.database import neo4j_errors

    # One auto-commit run, not a managed transaction: those retry an unreachable server for 30 s.
    with neo4j_errors(db), db.driver.session(database=db.database, default_access_mode="READ") as session:
        try:
            summary = session.run(EXPLAIN + statement, params or {}).consume()
        except ClientError as exc:
            if (exc.code or "").startswith(("Neo.ClientError.Statement.", "Neo.ClientError.Procedure.")):
                raise StatementRejected(f"Neo4j rejects the statement: {_server_message(exc)}") from None
            raise
    return summary


def refusal(summary, plugin_functions: frozenset[str] = frozenset()) -> str | None:
    """Why a planned statement may not run read-only, or None when it may.

    plugin_functions: lower-case names of the server's user-defined functions."""
    for operator in _operators(summary.plan):
        name, _, database = operator["operatorType"].partition("@")
        details = operator.get("args", {}).get("Details", "")
        if name in REFUSED_OPERATORS:
            return REFUSED_OPERATORS[name]
        if name.startswith(("Show", "Terminate")) or database == "system":
            return "SHOW, TERMINATE and other administration commands are refused"
        if name == "ProcedureCall":
            procedure = details.partition("(")[0].replace("`", "").strip()
            if procedure not in INTROSPECTION_PROCEDURES:
                return (f"procedure {procedure} is not one of the introspection procedures allowed "
                        f"read-only ({', '.join(sorted(INTROSPECTION_PROCEDURES))})")
        called = _called_functions(operator)
        if called & plugin_functions:
            return f"user-defined function {sorted(called & plugin_functions)[0]} is not allowed read-only"
    if summary.query_type != "r":
        return f"Neo4j's planner says the statement {QUERY_TYPES.get(summary.query_type, summary.query_type)}"
    return None


def user_functions(db) -> frozenset[str]:
    """Lower-case names of the server's non-built-in functions (plugins), asked once per connection."""
    known = _USER_FUNCTIONS.get(db)
    if known is None:
        rows = db.read("SHOW FUNCTIONS YIELD name, isBuiltIn WHERE NOT isBuiltIn RETURN name")
        known = _USER_FUNCTIONS[db] = frozenset(row["name"].lower() for row in rows)
    return known


_USER_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# A call in the plan's printed expressions: a (dotted, possibly backticked) name and "(".
_CALL = re.compile(r"((?:`[^`]*`|[^\W\d]\w*)(?:\s*\.\s*(?:`[^`]*`|[^\W\d]\w*))*)\s*\(")


def _called_functions(operator: dict) -> set[str]:
    """Lower-case names that the operator's printed arguments call like functions."""
    texts = [value for value in operator.get("args", {}).values() if isinstance(value, str)]
    return {re.sub(r"[`\s]", "", match).lower() for text in texts for match in _CALL.findall(text)}


def _operators(plan):
    """Every operator of a plan tree, parents first."""
    stack = [plan]
    while stack:
        operator = stack.pop()
        yield operator
        stack.extend(operator.get("children", []))


def _server_message(exc) -> str:
    """The server's message in one line, positions counted in the user's statement."""
    text = (getattr(exc, "message", None) or str(exc)).strip().splitlines()[0]

    def shift(match: re.Match) -> str:
        line, column, offset = (int(group) for group in match.groups())
        column = max(column - len(EXPLAIN), 1) if line == 1 else column
        return f"(line {line}, column {column} (offset: {max(offset - len(EXPLAIN), 0)}))"

    return _POSITION.sub(shift, text)
