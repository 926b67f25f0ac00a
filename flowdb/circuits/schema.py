"""One attribution-graph file, read and checked whole before anything is stored.

The format is circuit-tracer 0.5.0's graph JSON (circuit_tracer/frontend/graph_models.py),
which Neuronpedia's graph viewer reads too:

    {metadata: {slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold, ...},
     qParams: {pinnedIds, supernodes, linkType, clickedId, sg_pos},
     nodes: [{node_id, feature, layer, ctx_idx, feature_type, token_prob, is_target_logit,
              run_idx, reverse_ctx_idx, jsNodeId, clerp, influence, activation}],
     links: [{source, target, weight}]}

Types are strict (a string is not a number, true is not 1); unknown node, link or qParams
keys are refused with the valid ones; metadata may carry more keys (info, feature_details,
generation_settings, ...), kept as they are. Every problem is one line naming the file and
the field, e.g. "g.json: links[3].target: no node 'x' among nodes".

A file is read as a stream (ijson): a node or link is held only while it is checked, and
what a graph keeps in memory while checked is its node ids and link pairs. Writing reads
the file again, nodes then links, in batches.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flowdb.errors import FlowdbError
from flowdb.schema import NonEmpty

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]

# feature_type -> the kind flowdb stores. Others (lorsa attention features, say) are refused.
KINDS = {
    "cross layer transcoder": "feature",
    "transcoder": "feature",
    "mlp reconstruction error": "error",
    "embedding": "embedding",
    "logit": "logit",
}
NODE_FIELDS = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
               "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation")


class GraphFileError(FlowdbError):
    """A graph file that does not parse or breaks the graph JSON schema; nothing of it is stored."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    slug: NonEmpty
    scan: str
    prompt_tokens: list[str]
    prompt: str
    transcoder_list: list[str] = []
    node_threshold: Number | None = None
    schema_version: int | None = None


class QParams(_Strict):
    # What is not given reads as circuit-tracer's create_graph_files writes it, so an export
    # carries every field its server's model requires.
    pinnedIds: list[str] = []
    supernodes: list[list[str]] = []
    linkType: str = "both"
    clickedId: str = ""
    sg_pos: str = ""


class Node(_Strict):
    node_id: NonEmpty
    feature: int | None
    layer: str | int
    ctx_idx: int
    feature_type: str
    token_prob: Number = 0.0
    is_target_logit: bool = False
    run_idx: int = 0
    reverse_ctx_idx: int = 0
    jsNodeId: str | None = None
    clerp: str = ""
    influence: Number | None = None
    activation: Number | None = None

    @model_validator(mode="before")
    @classmethod
    def _js_node_id(cls, data: Any) -> Any:
        # circuit-tracer's default: a node without a jsNodeId shows under its node_id
        if isinstance(data, dict) and "jsNodeId" not in data and isinstance(data.get("node_id"), str):
            return {**data, "jsNodeId": data["node_id"]}
        return data


class Link(_Strict):
    source: NonEmpty
    target: NonEmpty
    weight: Number


class GraphDocument(_Strict):
    metadata: Metadata
    qParams: QParams
    nodes: list[Node]
    links: list[Link]


@dataclass(frozen=True)
class GraphFile:
    """A checked graph: its metadata and qParams, how many nodes and links, the sha256 of the
    file's bytes and of its content. nodes() and links() read them again, one at a time, from
    the file (or from the document checked in memory)."""

    path: str
    metadata: Metadata
    qparams: QParams
    n_nodes: int
    n_links: int
    file_digest: str  # sha256 of the file's bytes: provenance
    content_digest: str  # sha256 of the canonical JSON of what is stored: "the same graph"
    document: GraphDocument | None = None  # only when checked in memory (check_graph)

    @property
    def slug(self) -> str:
        return self.metadata.slug

    def nodes(self) -> Iterator[Node]:
        if self.document is not None:
            return iter(self.document.nodes)
        return (Node.model_validate(value) for value in _items(self.path, "nodes"))

    def links(self) -> Iterator[Link]:
        if self.document is not None:
            return iter(self.document.links)
        return (Link.model_validate(value) for value in _items(self.path, "links"))


TOP = ("metadata", "qParams", "nodes", "links")
MAX_DEPTH = 32  # a graph nests four deep (qParams.supernodes); deeper is refused before it is built


def read_graph_file(path: str | Path) -> GraphFile:
    """The file checked whole, streamed (a node or link is held only while it is checked), or
    a GraphFileError naming the file and the field."""
    name = str(path)
    small: dict[str, Any] = {}
    ids: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    counts = {"nodes": 0, "links": 0}
    digests = {"nodes": hashlib.sha256(), "links": hashlib.sha256()}
    deferred = False  # links came before the nodes were complete: their references are checked after

    hasher = hashlib.sha256()
    for kind, key, index, value in _parts(name, hasher):
        if kind == "small":
            small[key] = value
            continue
        if key == "nodes":
            node = _validated(Node, value, name, ("nodes", index))
            _check_node(node, index, ids, name)
            digests["nodes"].update(_canonical(node))
        else:
            link = _validated(Link, value, name, ("links", index))
            if "nodes_done" in small:
                _check_link(link, index, ids, pairs, name)
            else:
                deferred = True
            digests["links"].update(_canonical(link))
        counts[key] += 1
    if deferred:
        for index, value in enumerate(_items(name, "links")):
            _check_link(Link.model_validate(value), index, ids, pairs, name)
    metadata = _validated(Metadata, small["metadata"], name, ("metadata",))
    qparams = _validated(QParams, small["qParams"], name, ("qParams",))
    return GraphFile(name, metadata, qparams, counts["nodes"], counts["links"], hasher.hexdigest(),
                     _content(metadata, qparams, digests["nodes"], digests["links"]))


def check_graph(data: Any, name: str, file_digest: str = "") -> GraphFile:
    """A graph already in memory (a parsed document), checked as read_graph_file checks a file."""
    if not isinstance(data, dict):
        raise GraphFileError(f"{name}: the top level must be a JSON object with metadata, qParams, nodes "
                             f"and links, got {type(data).__name__}")
    try:
        document = GraphDocument.model_validate(data)
    except ValidationError as exc:
        raise GraphFileError(f"{name}: {_explain(exc)}") from None
    ids: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    digests = {"nodes": hashlib.sha256(), "links": hashlib.sha256()}
    for index, node in enumerate(document.nodes):
        _check_node(node, index, ids, name)
        digests["nodes"].update(_canonical(node))
    for index, link in enumerate(document.links):
        _check_link(link, index, ids, pairs, name)
        digests["links"].update(_canonical(link))
    return GraphFile(name, document.metadata, document.qParams, len(document.nodes), len(document.links),
                     file_digest, _content(document.metadata, document.qParams, digests["nodes"], digests["links"]),
                     document)


def _canonical(model: BaseModel) -> bytes:
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _content(metadata: Metadata, qparams: QParams, nodes, links) -> str:
    digest = hashlib.sha256(_canonical(metadata) + _canonical(qparams))
    digest.update(nodes.digest() + links.digest())
    return digest.hexdigest()


def _validated(model: type[BaseModel], value: Any, name: str, where: tuple) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise GraphFileError(f"{name}: {_explain(exc, where)}") from None


def _check_node(node: Node, index: int, ids: set[str], name: str) -> None:
    if node.feature_type not in KINDS:
        raise GraphFileError(f"{name}: nodes[{index}].feature_type: {node.feature_type!r} is not supported; "
                             f"flowdb reads {', '.join(repr(k) for k in KINDS)}")
    if node.node_id in ids:
        raise GraphFileError(f"{name}: nodes[{index}].node_id: {node.node_id!r} occurs twice")
    ids.add(node.node_id)


def _check_link(link: Link, index: int, ids: set[str], pairs: set[tuple[str, str]], name: str) -> None:
    for end in ("source", "target"):
        if getattr(link, end) not in ids:
            raise GraphFileError(f"{name}: links[{index}].{end}: no node {getattr(link, end)!r} among nodes")
    if (link.source, link.target) in pairs:
        raise GraphFileError(f"{name}: links[{index}]: a second link {link.source} -> {link.target}")
    pairs.add((link.source, link.target))


class _Hashing:
    """A binary file that hashes what is read from it."""

    def __init__(self, handle, hasher):
        self.handle, self.hasher = handle, hasher

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.hasher.update(data)
        return data


def _items(name: str, key: str) -> Iterator[Any]:
    for kind, found, _, value in _parts(name):
        if kind == "item" and found == key:
            yield value


def _parts(name: str, hasher=None) -> Iterator[tuple[str, str, int, Any]]:
    """("small", key, 0, value) for metadata and qParams, ("item", key, i, value) for each node
    and link, ("small", "nodes_done", 0, None) once the nodes array ends: one pass of ijson's
    basic events, depth counted here (a row is built only while it is read)."""
    import ijson
    from ijson.common import ObjectBuilder

    try:
        handle = open(name, "rb")  # closed below, also when the generator is dropped
    except OSError as exc:
        raise GraphFileError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    seen: set[str] = set()
    try:
        reader = _Hashing(handle, hasher) if hasher is not None else handle
        depth, key, builder, build_depth, array, index = 0, None, None, 0, None, 0
        for event, value in ijson.basic_parse(reader, use_float=True):
            if depth == 0:
                if event != "start_map":
                    raise GraphFileError(f"{name}: the top level must be a JSON object with metadata, qParams, "
                                         "nodes and links")
                depth = 1
                continue
            if builder is None:
                if depth == 1 and event == "map_key":
                    if value not in TOP:
                        raise GraphFileError(f"{name}: {value}: unknown key; valid keys: {', '.join(TOP)}")
                    key = value
                    seen.add(key)
                    continue
                if depth == 1 and event == "end_map":
                    depth = 0
                    continue
                if depth == 1 and key in ("nodes", "links"):
                    if event != "start_array":
                        given = "an object" if event == "start_map" else json.dumps(value, default=str)
                        raise GraphFileError(f"{name}: {key}: input should be a valid list, got {given}")
                    array, index, depth = key, 0, 2
                    continue
                if depth == 2 and event == "end_array":
                    if array == "nodes":
                        yield "small", "nodes_done", 0, None
                    array, depth = None, 1
                    continue
                builder, build_depth = ObjectBuilder(), depth
            builder.event(event, value)
            if event in ("start_map", "start_array"):
                depth += 1
                if depth > MAX_DEPTH:
                    raise GraphFileError(f"{name}: {key}: nested more than {MAX_DEPTH} deep")
            elif event in ("end_map", "end_array"):
                depth -= 1
            if depth == build_depth:
                if array is None:
                    yield "small", key, 0, builder.value
                else:
                    yield "item", array, index, builder.value
                    index += 1
                builder = None
        while hasher is not None and reader.read(1 << 16):
            pass  # the digest is of every byte
    except ijson.JSONError as exc:
        text = exc.args[0] if exc.args else ""
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)  # yajl's own: bytes
        raise GraphFileError(f"{name}: not JSON ({(text.strip().splitlines() or ['?'])[0]})") from None
    except UnicodeDecodeError as exc:
        raise GraphFileError(f"{name}: not JSON (not UTF-8 text: {exc.reason})") from None
    except OSError as exc:
        raise GraphFileError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    finally:
        handle.close()
    for key in TOP:
        if key not in seen:
            raise GraphFileError(f"{name}: {key}: missing")


def kind_of(node: Node) -> str:
    return KINDS[node.feature_type]


def transcoder_index(node: Node) -> int | None:
    """The transcoder feature index of a feature node ("{layer}_{index}_{pos}"), else None."""
    parts = node.node_id.split("_")
    if KINDS[node.feature_type] != "feature" or len(parts) != 3:
        return None
    try:
        return int(parts[1])
    except ValueError:
        return None


_FIELD_NAMES = {name for model in (Metadata, QParams, Node, Link, GraphDocument) for name in model.model_fields}


def _explain(error: ValidationError, where: tuple = ()) -> str:
    problem = error.errors()[0]
    field = ""
    loc = (*where, *problem["loc"])
    for i, part in enumerate(loc):
        unknown_key = problem["type"] == "extra_forbidden" and i == len(loc) - 1
        if isinstance(part, str) and part not in _FIELD_NAMES and not unknown_key:
            continue  # a union member's tag ("str", "int") or a validator's name
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    if problem["type"] == "extra_forbidden":
        parent = {"qParams": QParams, "nodes": Node, "links": Link}.get(str(loc[0]), GraphDocument)
        if len(loc) == 1:
            parent = GraphDocument
        return f"{field}: unknown key; valid keys: {', '.join(parent.model_fields)}"
    if problem["type"] == "missing":
        return f"{field}: missing"
    message = problem["msg"][0].lower() + problem["msg"][1:]
    given = json.dumps(problem.get("input"), default=str)
    if len(given) > 60:
        given = given[:57] + "..."
    return f"{field}: {message}, got {given}"
