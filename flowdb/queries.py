"""Cypher query templates: .cypher files with a header, loaded once.

Header lines at the top of each file ("// key: value"):
    // name: lineage
    // answers: what question the query answers
    // param: feature string required  the feature, PACK/LAYER/MODULE/INDEX
    // param: t_res float 0.0  residual edges below this cosine are not followed
    // columns: key, layer, module, ...
Parameters are always passed to Neo4j as Cypher parameters, never spliced into
the text. The CLI and the Python API read the same files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from flowdb.errors import QueryError

PARAM_TYPES = {"string": str, "int": int, "float": float, "bool": bool}
_HEADER = re.compile(r"^//\s*(\w+):\s*(.*)$")
_PARAM_USE = re.compile(r"\$([A-Za-z_]\w*)")


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any  # None when required
    required: bool
    doc: str

    def coerce(self, value: Any) -> Any:
        if value is None or not isinstance(value, str) or self.type == "string":
            return value
        try:
            if self.type == "bool":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return PARAM_TYPES[self.type](value)
        except ValueError:
            raise QueryError(f"parameter {self.name} must be {self.type}, got {value!r}") from None


@dataclass(frozen=True)
class Template:
    name: str
    answers: str
    params: tuple[Param, ...]
    columns: tuple[str, ...]
    cypher: str
    path: str

    def bind(self, given: dict[str, Any]) -> dict[str, Any]:
        """Check and coerce parameters; defaults fill what is not given."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise QueryError(f"template {self.name} has no parameter(s) {', '.join(unknown)}; "
                             f"its parameters: {', '.join(known) or 'none'}")
        bound = {}
        for param in self.params:
            if param.name in given:
                bound[param.name] = param.coerce(given[param.name])
            elif param.required:
                raise QueryError(f"template {self.name} needs parameter {param.name} ({param.doc})")
            else:
                bound[param.name] = param.default
        return bound

    def used_params(self) -> set[str]:
        body = "\n".join(ln for ln in self.cypher.splitlines() if not ln.lstrip().startswith("//"))
        return set(_PARAM_USE.findall(body))


def parse_template(text: str, path: str) -> Template:
    header: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.startswith("//"):
            break
        match = _HEADER.match(line)
        if match:
            header.setdefault(match.group(1), []).append(match.group(2).strip())
    for key in ("name", "answers", "columns"):
        if key not in header:
            raise QueryError(f"{path}: template header lacks '// {key}:'")
    params = tuple(_parse_param(spec, path) for spec in header.get("param", []))
    columns = tuple(c.strip() for c in header["columns"][0].split(","))
    return Template(header["name"][0], " ".join(header["answers"]), params, columns, text, path)


def _parse_param(spec: str, path: str) -> Param:
    parts = spec.split(None, 3)
    if len(parts) < 3 or parts[1] not in PARAM_TYPES:
        raise QueryError(f"{path}: bad param line {spec!r}; "
                         "expected 'NAME TYPE (required|DEFAULT) DOC'")
    name, type_name, default = parts[:3]
    doc = parts[3] if len(parts) > 3 else ""
    if default == "required":
        return Param(name, type_name, None, True, doc)
    value = None if default == "null" else Param(name, type_name, None, False, doc).coerce(default)
    return Param(name, type_name, value, False, doc)


def _template_dir() -> Path:
    installed = resources.files("flowdb").joinpath("queries")
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parent.parent / "queries"  # a source checkout


@lru_cache(maxsize=1)
def templates() -> dict[str, Template]:
    found: dict[str, Template] = {}
    for path in sorted(_template_dir().glob("*.cypher")):
        template = parse_template(path.read_text(), str(path))
        if template.name in found:
            raise QueryError(f"two templates are named {template.name}: "
                             f"{found[template.name].path} and {path}")
        found[template.name] = template
    return found


def get_template(name: str) -> Template:
    known = templates()
    if name not in known:
        raise QueryError(f"no query template named {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def run_template(db, name: str, params: dict[str, Any] | None = None):
    """Run a template in a read transaction; returns a pandas DataFrame."""
    import pandas as pd

    from neo4j.exceptions import Neo4jError

    template = get_template(name)
    bound = template.bind(params or {})
    try:
        rows = db.read(template.cypher, **bound)
    except Neo4jError as exc:
        first_line = (exc.message or str(exc)).strip().splitlines()[0]
        raise QueryError(f"template {name} failed in Neo4j: {first_line}") from None
    if rows and list(rows[0]) != list(template.columns):
        raise QueryError(f"template {name} returned columns {list(rows[0])}, "
                         f"but its header declares {list(template.columns)}")
    frame = pd.DataFrame(rows, columns=list(template.columns))
    for column in frame.columns:  # keep integer columns integer where rows mix in nulls
        values = frame[column].dropna()
        if len(values) and frame[column].dtype == float and all(isinstance(r[column], int) for r in rows if r[column] is not None):
            frame[column] = frame[column].astype("Int64")
    return frame
