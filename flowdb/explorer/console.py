"""The Cypher console: a statement run read-only behind flowdb's guard (the same check
and time limit as `flowdb cypher`), its rows as a table and, when it returns nodes,
relationships or paths, as a graph."""

from __future__ import annotations

from typing import Any

from flowdb.errors import QueryError, QueryTimeout
from flowdb.settings import query_timeout_s
from flowdb.store import guard
from flowdb.store.database import neo4j_errors

MAX_ROWS = 1_000  # rows a console answer shows; the rest are counted, not sent
MAX_BYTES = 8 << 20  # what one answer's rows and graph come to as JSON; past it, no record more is read
MAX_STATEMENT = 20_000  # characters
FETCH = 100  # records the driver holds at once: what is read past the bound stays small


class _Full(Exception):
    """The answer passed MAX_BYTES while a cell was being built."""


def run(db, statement: str, params: dict[str, Any] | None = None, timeout_s: float | None = None) -> dict:
    """{columns, rows, total, truncated, note, graph: {nodes, relationships}} of a read-only statement.

    Rows past MAX_ROWS are counted, not sent. The answer is measured as it is built: once it
    passes MAX_BYTES the row that passed it is dropped and no further record is read (total is
    then None: not counted), so neither the answer nor serve's memory grows with the statement's."""
    from neo4j import Query

    if not isinstance(statement, str) or not statement.strip():
        raise QueryError("give a Cypher statement")
    if len(statement) > MAX_STATEMENT:
        raise QueryError(f"the statement is longer than {MAX_STATEMENT} characters")
    if params is not None and not isinstance(params, dict):
        raise QueryError("parameters must be a JSON object of name: value")
    params = params or {}
    guard.check_read_only(db, statement, params)
    limit = timeout_s or getattr(db, "timeout_s", None) or query_timeout_s()  # the app's own limit
    graph = _Graph(MAX_BYTES)
    note = None
    try:
        with neo4j_errors(db), db.driver.session(database=db.database, default_access_mode="READ",
                                                 fetch_size=FETCH) as session:
            result = session.run(Query(statement, timeout=limit), params)
            columns = list(result.keys())
            graph.charge(sum(len(name) + 3 for name in columns))
            rows, total = [], 0
            for record in result:
                total += 1
                if total > MAX_ROWS:
                    continue
                try:
                    rows.append([graph.cell(value) for value in record.values()])
                except _Full:
                    total = None
                    note = (f"the answer passed {MAX_BYTES:,} bytes at row {len(rows) + 1}: "
                            f"{len(rows)} row(s) shown, the rest not read; return less "
                            "(LIMIT, a slice such as list[..100], fewer properties)")
                    break  # leaving the session discards the records not read
    except QueryTimeout:
        raise QueryTimeout(f"the statement ran past its {limit:g} s limit and was stopped") from None
    if total is not None and total > MAX_ROWS:
        note = f"{total:,} rows; the console shows the first {MAX_ROWS:,}"
    return {"columns": columns, "rows": rows, "total": total, "truncated": note is not None, "note": note,
            "graph": graph.document()}


class _Graph:
    """Nodes and relationships met in the answer, and each cell as JSON, measured as it is
    built: _Full once the answer's JSON passes `limit` bytes (each value charged what it takes
    as JSON text, a string by its characters)."""

    def __init__(self, limit: int):
        self.nodes: dict[str, dict] = {}
        self.relationships: dict[str, dict] = {}
        self.limit, self.spent = limit, 0

    def charge(self, size: int) -> None:
        self.spent += size
        if self.spent > self.limit:
            raise _Full

    def cell(self, value):
        from neo4j.graph import Node, Path, Relationship

        if isinstance(value, Node):
            return {"node": self._reference(self._node(value))}
        if isinstance(value, Relationship):
            return {"relationship": self._reference(self._relationship(value))}
        if isinstance(value, Path):
            nodes = [self._reference(self._node(n)) for n in value.nodes]
            return {"path": {"nodes": nodes, "relationships": [self._reference(self._relationship(r))
                                                               for r in value.relationships]}}
        if isinstance(value, list):
            self.charge(2 + len(value))  # brackets and commas
            return [self.cell(item) for item in value]
        if isinstance(value, dict):
            self.charge(2 + sum(len(key) + 4 for key in value))
            return {key: self.cell(item) for key, item in value.items()}
        if isinstance(value, float) and value != value:  # NaN is not JSON
            self.charge(4)
            return None
        if isinstance(value, str):
            self.charge((len(value) if value.isascii() else len(value.encode())) + 2)  # sent as UTF-8
            return value
        if isinstance(value, (int, float, bool)) or value is None:
            self.charge(len(repr(value)))
            return value
        text = str(value)  # temporal and spatial values
        self.charge(len(text) + 2)
        return text

    def _reference(self, name: str) -> str:
        self.charge(len(name) + 20)  # {"relationship": name}
        return name

    def _node(self, node) -> str:
        if node.element_id in self.nodes:
            props = self.nodes[node.element_id]["properties"]
            return props.get("key") or props.get("name") or node.element_id
        props = self.cell(dict(node.items()))
        self.charge(2 * len(node.element_id) + 40 + sum(len(label) + 3 for label in node.labels))
        self.nodes.setdefault(node.element_id, {"id": node.element_id, "labels": sorted(node.labels),
                                                "properties": props})
        return props.get("key") or props.get("name") or node.element_id

    def _relationship(self, rel) -> str:
        for end in (rel.start_node, rel.end_node):
            if end is not None and end.element_id not in self.nodes:
                self._node(end)
        if rel.element_id in self.relationships:
            return rel.type
        properties = self.cell(dict(rel.items()))
        self.charge(3 * len(rel.element_id) + len(rel.type) + 60)
        self.relationships.setdefault(rel.element_id, {
            "id": rel.element_id, "type": rel.type, "start": rel.start_node.element_id,
            "end": rel.end_node.element_id, "properties": properties})
        return rel.type

    def document(self) -> dict:
        return {"nodes": list(self.nodes.values()), "relationships": list(self.relationships.values())}
