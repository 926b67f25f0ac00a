"""Cypher query templates: .cypher files with a header, loaded once.

Header lines at the top of each file ("// key: value"):
    // name: lineage
    // answers: what question the query answers
    // param: feature string required  the feature, PACK/LAYER/MODULE/INDEX
    // param: t_res float 0.0  residual edges below this cosine are not followed
    // columns: key, layer, module, ...
    // feature: res     (optional) the feature parameter must name a feature of this module
    // choices: kind fan-out, fan-in, chain-end   (optional) the only values a string parameter takes
Parameters are always passed to Neo4j as Cypher parameters, never spliced into
the text. The CLI and the Python API read the same files.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from flowdb.errors import NotFound, QueryError, QueryTimeout, number_text
from flowdb.packs.manifest import MAX_K  # no build stores more matches per module
from flowdb.settings import QUERY_TIMEOUT_RANGE_S, query_timeout_s

PARAM_TYPES = {"string": str, "int": int, "float": float, "bool": bool}
MAX_LAYER = 1_000_000
MAX_LIMIT = 1_000_000
# Bounds (inclusive) of the parameters templates share by name: a value outside them
# would give an empty or meaningless answer, or overflow Neo4j's 64-bit integers.
PARAM_RANGES = {"max_rank": (1, MAX_K), "limit": (1, MAX_LIMIT), "layer": (0, MAX_LAYER),
                "first_layer": (0, MAX_LAYER), "last_layer": (0, MAX_LAYER),
                "t_res": (-1.0, 1.0), "t_mod": (-1.0, 1.0),
                # attribution graphs (flowdb.circuits): strongest-paths follows at most 8 links
                "min_graphs": (1, MAX_LIMIT), "max_length": (1, 8), "min_weight": (0.0, math.inf)}
INT64 = (-(1 << 63), (1 << 63) - 1)
_HEADER = re.compile(r"^//\s*(\w+):\s*(.*)$")
_PARAM_USE = re.compile(r"\$([A-Za-z_]\w*)")


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any  # None when required
    required: bool
    doc: str
    choices: tuple[str, ...] = ()  # empty: any value of the type

    def coerce(self, value: Any) -> Any:
        """Text (from the CLI) parsed, other values (from Python) checked: the same rules."""
        if value is None:
            return None
        if isinstance(value, str) and self.type != "string":
            return self._in_range(self._parse(value))
        expected = {"string": (str,), "int": (numbers.Integral,), "float": (numbers.Real,),
                    "bool": (bool, np.bool_)}[self.type]
        if isinstance(value, (bool, np.bool_)) != (self.type == "bool") or not isinstance(value, expected):
            raise QueryError(f"parameter {self.name} must be {self.type}, got {value!r}")
        # numpy scalars (a layer read from a DataFrame, say) become plain Python values
        return self._in_range({"int": int, "float": float, "bool": bool, "string": str}[self.type](value))

    def _in_range(self, value: Any) -> Any:
        if self.choices and value not in self.choices:
            raise QueryError(f"parameter {self.name} must be one of {', '.join(self.choices)}; got {value!r}")
        if self.type == "float" and not math.isfinite(value):
            raise QueryError(f"parameter {self.name} must be a finite number, got {value!r}")
        low, high = PARAM_RANGES.get(self.name, INT64 if self.type == "int" else (-math.inf, math.inf))
        if self.type in ("int", "float") and not low <= value <= high:
            raise QueryError(f"parameter {self.name} must be from {number_text(low)} to {number_text(high)}, "
                             f"got {number_text(value)}")
        return value

    def _parse(self, value: str) -> Any:
        try:
            if self.type == "bool":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return PARAM_TYPES[self.type](value)
        except (ValueError, OverflowError):
            raise QueryError(f"parameter {self.name} must be {self.type}, got {value!r}") from None


@dataclass(frozen=True)
class Template:
    name: str
    answers: str
    params: tuple[Param, ...]
    columns: tuple[str, ...]
    cypher: str
    path: str
    feature_module: str | None = None  # "// feature: res": the feature parameter must be of this module

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
    params = _with_choices(tuple(_parse_param(spec, path) for spec in header.get("param", [])),
                           header.get("choices", []), path)
    columns = tuple(c.strip() for c in header["columns"][0].split(","))
    return Template(header["name"][0], " ".join(header["answers"]), params, columns, text, path,
                    (header.get("feature") or [None])[0])


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


def _with_choices(params: tuple[Param, ...], specs: list[str], path: str) -> tuple[Param, ...]:
    """Params with the values "// choices: NAME a, b, c" allows them; the default must be one."""
    allowed = {}
    for spec in specs:
        name, _, values = spec.partition(" ")
        allowed[name] = tuple(v.strip() for v in values.split(",") if v.strip())
    by_name = {p.name: p for p in params}
    for name, values in allowed.items():
        if name not in by_name or by_name[name].type != "string" or not values:
            raise QueryError(f"{path}: bad choices line for {name!r}; expected "
                             "'NAME a, b, c' after a string parameter NAME")
    chosen = tuple(Param(p.name, p.type, p.default, p.required, p.doc, allowed.get(p.name, ()))
                   for p in params)
    for param in chosen:
        if param.choices and param.default is not None and param.default not in param.choices:
            raise QueryError(f"{path}: the default of {param.name} is not one of its choices")
    return chosen


def _template_dir() -> Path:
    installed = resources.files("flowdb").joinpath("queries")
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parents[2] / "queries"  # a source checkout


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


def run_template(db, name: str, params: dict[str, Any] | None = None, timeout_s: float | None = None):
    """Run a template in a read transaction; returns a pandas DataFrame.

    A traversal over a deep graph can grow without bound (paths multiply with
    max_rank at every layer), so the server stops any template after timeout_s
    (default $FLOWDB_QUERY_TIMEOUT, else 60) and the error says how to
    narrow it.

    When the pack it reads is not completely built, the frame's attrs["warning"]
    says so and an IncompleteBuildWarning is issued."""
    import warnings

    import pandas as pd

    from flowdb.store import graph

    template = get_template(name)
    bound = template.bind(params or {})
    checked_timeout(timeout_s)
    # One round trip for what the answer's notes need and which typed keys exist:
    # on a warm server the template itself takes a few milliseconds.
    pack = _pack_of(bound)
    context = graph.query_context(db, pack, _references(bound))
    bound = resolve_references(db, bound, context.existing)
    if _pack_of(bound) != pack:  # the references were Neuronpedia URLs or ids
        pack = _pack_of(bound)
        context = graph.query_context(db, pack, [])
    check_against_pack(db, template, bound, pack, context.record)
    link_note = check_link(db, bound.get("link"))
    note = thresholds_note(template, bound, context.rules if pack else None)
    if note == OLD_BUILD:
        raise QueryError(f"template {name}: pack {_pack_of(bound)!r} was built by an older flowdb that "
                         "stored no per-edge thresholds; pass t_res/t_mod or every_edge=true, or ingest "
                         "it again with --replace")
    limit = checked_timeout(timeout_s)
    try:
        rows = db.read(template.cypher, timeout_s=limit, **bound)
    except QueryTimeout:
        raise QueryError(f"template {name} ran past its {limit:g} s limit and was stopped: lower max_rank, "
                         "narrow the layers (first_layer/last_layer where it has them), or raise "
                         "--timeout") from None
    if rows and list(rows[0]) != list(template.columns):
        raise QueryError(f"template {name} returned columns {list(rows[0])}, "
                         f"but its header declares {list(template.columns)}")
    frame = pd.DataFrame(rows, columns=list(template.columns))
    for column in frame.columns:  # keep integer columns integer where rows mix in nulls
        values = frame[column].dropna()
        integers = all(isinstance(r[column], int) for r in rows if r[column] is not None)
        if len(values) and frame[column].dtype == float and integers:
            frame[column] = frame[column].astype("Int64")
    frame.attrs["thresholds"] = note
    warning = "; ".join(w for w in (pack_warning(pack, context.record), link_note) if w)
    if warning:
        frame.attrs["warning"] = warning
        warnings.warn(warning, IncompleteBuildWarning, stacklevel=2)
    return frame


def checked_timeout(timeout_s: float | None) -> float:
    """The server-side limit for one read: timeout_s, checked, else $FLOWDB_QUERY_TIMEOUT (60)."""
    low, high = QUERY_TIMEOUT_RANGE_S
    if timeout_s is None:
        return query_timeout_s()
    if isinstance(timeout_s, bool) or not (isinstance(timeout_s, numbers.Real) and low <= timeout_s <= high):
        raise QueryError(f"timeout_s must be a number of seconds from {number_text(low)} to {number_text(high)}, "
                         f"got {timeout_s!r}")
    return float(timeout_s)


def check_against_pack(db, template: Template, bound: dict[str, Any], pack: str, record) -> None:
    """Refuse what the pack read cannot answer, naming what it has, rather than return no rows:
    an unknown pack, a layer or module it lacks, a max_rank above its k, a feature of the
    wrong module."""
    from flowdb.store import graph

    if bound.get("pack") is not None and (record is None or "~" in pack):
        graph.require_pack(db, pack)  # raises, naming the stored packs
    if record is None:
        return
    where = f"pack {pack!r}"
    layer = bound.get("layer")
    if layer is not None and not record.first_layer <= layer <= record.last_layer:
        raise QueryError(f"{where} has layers {record.first_layer}-{record.last_layer}; "
                         f"layer {layer} is not among them")
    born_in = [m for m in record.plan.get("modules", []) if m != "res"]
    if bound.get("module") is not None and bound["module"] not in born_in:
        raise QueryError(f"template {template.name}: module {bound['module']!r} is not one residual "
                         f"features are born in; {where} has {', '.join(born_in) or 'none'}")
    max_rank = bound.get("max_rank")
    if max_rank is not None and record.k is not None and max_rank > record.k:
        raise QueryError(f"max_rank {max_rank} is above {where}'s k={record.k}: it stores each feature's "
                         f"top {record.k} match(es) per module; give max_rank 1 to {record.k}, or ingest "
                         f"it again with --k {max_rank} --replace")
    feature = bound.get("feature")
    if template.feature_module and feature is not None:
        module = str(feature).split("/")[2] if str(feature).count("/") == 3 else None
        if module != template.feature_module:
            raise QueryError(f"template {template.name} starts at a {template.feature_module} feature, "
                             f"and {feature} is of module {module}: flowdb matches only {template.feature_module} "
                             f"features to their predecessors (flowdb query descendants -p feature={feature} "
                             "shows what it feeds)")


def check_link(db, name: str | None) -> str | None:
    """Refuse a link set that is not stored, naming those that are; a note when it is not complete."""
    from flowdb.store import graph

    if name is None:
        return None
    found = graph.read_link(db, name)
    if found is None:
        names = [row["name"] for row in graph.list_links(db)]
        raise NotFound(f"no link set named {name!r} in {db.where}; stored link sets: "
                       f"{', '.join(names) if names else 'none; run flowdb link A B first'}")
    if found["status"] == "complete":
        return None
    return (f"link set {name!r} is {found['status']} ({len(found['places_done'])} place(s) stored); "
            "its answers may miss features: run flowdb link again")


class IncompleteBuildWarning(UserWarning):
    """A query read a pack whose build is not complete."""

def records(frame) -> list[dict]:
    """A DataFrame's rows as JSON-ready dicts: missing values (NaN, NA, NaT) become None."""
    import pandas as pd

    return [{column: json_ready(value, pd) for column, value in row.items()}
            for row in frame.to_dict(orient="records")]


MISSING = "null"  # how a table shows a missing value, whatever its column's type


def table_text(frame) -> str:
    """A frame as a text table in which every missing value reads MISSING (pandas shows NaN,
    <NA> or None, by column type)."""
    shown = frame.copy()
    for column in shown.columns:
        if shown[column].dtype.kind != "f":  # float columns keep their formatting; na_rep marks them
            shown[column] = shown[column].astype(object).where(shown[column].notna(), MISSING)
    return shown.to_string(index=False, na_rep=MISSING)


def csv_text(frame) -> str:
    """A frame as CSV: list and map cells as JSON (not Python's repr), missing values empty."""
    import json

    import pandas as pd

    def cell(value):
        return json.dumps(json_ready(value, pd)) if isinstance(value, (list, tuple, dict)) else value

    written = frame.copy()
    for column in written.columns:
        if written[column].dtype == object:
            written[column] = written[column].map(cell)
    return written.to_csv(index=False)


def json_ready(value, pd):
    """Missing values (at any depth of lists and maps) as None."""
    if isinstance(value, dict):
        return {key: json_ready(item, pd) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item, pd) for item in value]
    try:
        return None if pd.isna(value) else value
    except (TypeError, ValueError):
        return value


FEATURE_PARAMS = ("feature",)  # one feature reference
FEATURE_LIST_PARAMS = ("source", "target")  # comma-separated feature references


def resolve_references(db, bound: dict[str, Any], known: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Feature references (keys, Neuronpedia URLs or ids) resolved to stored keys;
    keys in `known` are already known to exist."""
    from flowdb.store.features import resolve_feature

    def resolve(reference: str) -> str:
        text = str(reference).strip()
        return text if text in known else resolve_feature(db, text)

    resolved = dict(bound)
    for name in FEATURE_PARAMS:
        if resolved.get(name) is not None:
            resolved[name] = resolve(resolved[name])
    for name in FEATURE_LIST_PARAMS:
        if resolved.get(name) is not None:
            resolved[name] = ",".join(resolve(part) for part in str(resolved[name]).split(",") if part.strip())
    return resolved


def _references(bound: dict[str, Any]) -> list[str]:
    parts = [bound[name] for name in FEATURE_PARAMS if bound.get(name) is not None]
    for name in FEATURE_LIST_PARAMS:
        if bound.get(name) is not None:
            parts.extend(str(bound[name]).split(","))
    return [str(part).strip() for part in parts if str(part).strip()]


def thresholds_note(template: Template, bound: dict[str, Any], rules: list[str] | None) -> str | None:
    """Which cut-offs an answer applied, for the output to say; rules: those stored
    with the pack read (None when no single pack is read)."""
    names = {p.name for p in template.params}
    if "t_res" not in names:
        return None
    if bound.get("every_edge"):
        return "every stored edge (every_edge): no thresholds applied"
    given = {name: bound[name] for name in ("t_res", "t_mod") if name in names and bound.get(name) is not None}
    parts = [f"{name}={value:g} given" for name, value in given.items()]
    if len(given) < len({"t_res", "t_mod"} & names):
        stored = "; ".join(rules) if rules is not None else "each pack's own"
        if not stored:
            return OLD_BUILD
        rest = "otherwise the thresholds" if given else "the thresholds"
        parts.append(f"{rest} stored with the build ({stored})")
    return "; ".join(parts)


OLD_BUILD = "no thresholds recorded"  # a pack stored before builds recorded per-edge thresholds


def _pack_of(bound: dict[str, Any]) -> str:
    feature = bound.get("feature") or bound.get("source") or ""
    return bound.get("pack") or str(feature).split("/", 1)[0]


def pack_warning(pack: str, record) -> str | None:
    """A note when a query reads a pack that is not completely built."""
    if record is None or record.complete:
        return None
    return (f"pack {pack!r} is incomplete ({record.status}, layers done: "
            f"{len(record.layers_done)} of {record.last_layer - record.first_layer + 1}); "
            "its answers may miss features and edges")
