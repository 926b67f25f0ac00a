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
MAX_STATEMENT = 20_000  # characters


def run(db, statement: str, params: dict[str, Any] | None = None, timeout_s: float | None = None) -> dict:
    """{columns, rows, truncated, graph: {nodes, relationships}} of a read-only statement."""
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
    graph = _Graph()
    try:
        with neo4j_errors(db), db.driver.session(database=db.database, default_access_mode="READ") as session:
            result = session.run(Query(statement, timeout=limit), params)
            columns = list(result.keys())
            rows, total = [], 0
            for record in result:
                total += 1
                if total <= MAX_ROWS:
                    rows.append([graph.cell(value) for value in record.values()])
    except QueryTimeout:
        raise QueryTimeout(f"the statement ran past its {limit:g} s limit and was stopped") from None
    return {"columns": columns, "rows": rows, "total": total, "truncated": total > MAX_ROWS,
            "graph": graph.document()}


class _Graph:
    """Nodes and relationships met in the answer, and each cell as JSON."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}
        self.relationships: dict[str, dict] = {}

    def cell(self, value):
        from neo4j.graph import Node, Path, Relationship

        if isinstance(value, Node):
            return {"node": self._node(value)}
        if isinstance(value, Relationship):
            return {"relationship": self._relationship(value)}
        if isinstance(value, Path):
            nodes = [self._node(n) for n in value.nodes]
            return {"path": {"nodes": nodes, "relationships": [self._relationship(r) for r in value.relationships]}}
        if isinstance(value, list):
            return [self.cell(item) for item in value]
        if isinstance(value, dict):
            return {key: self.cell(item) for key, item in value.items()}
        if isinstance(value, float) and value != value:  # NaN is not JSON
            return None
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        return str(value)  # temporal and spatial values

    def _node(self, node) -> str:
        props = {k: self.cell(v) for k, v in node.items()}
        self.nodes.setdefault(node.element_id, {"id": node.element_id, "labels": sorted(node.labels),
                                                "properties": props})
        return props.get("key") or props.get("name") or node.element_id

    def _relationship(self, rel) -> str:
        for end in (rel.start_node, rel.end_node):
            if end is not None and end.element_id not in self.nodes:
                self._node(end)
        self.relationships.setdefault(rel.element_id, {
            "id": rel.element_id, "type": rel.type, "start": rel.start_node.element_id,
            "end": rel.end_node.element_id, "properties": {k: self.cell(v) for k, v in rel.items()}})
        return rel.type

    def document(self) -> dict:
        return {"nodes": list(self.nodes.values()), "relationships": list(self.relationships.values())}
