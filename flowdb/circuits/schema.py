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
"""

from __future__ import annotations

import hashlib
import json
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
    """A checked graph file: the document, the sha256 of its bytes and of its content."""

    path: str
    document: GraphDocument
    file_digest: str  # sha256 of the file's bytes: provenance
    content_digest: str  # sha256 of the canonical JSON of what is stored: "the same graph"

    @property
    def slug(self) -> str:
        return self.document.metadata.slug


def read_graph_file(path: str | Path) -> GraphFile:
    """The file checked whole, or a GraphFileError naming the file and the field."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise GraphFileError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise GraphFileError(f"{name}: not JSON (not UTF-8 text: {exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise GraphFileError(f"{name}: not JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    return check_graph(data, name, hashlib.sha256(raw).hexdigest())


def check_graph(data: Any, name: str, file_digest: str = "") -> GraphFile:
    if not isinstance(data, dict):
        raise GraphFileError(f"{name}: the top level must be a JSON object with metadata, qParams, nodes "
                             f"and links, got {type(data).__name__}")
    try:
        document = GraphDocument.model_validate(data)
    except ValidationError as exc:
        raise GraphFileError(f"{name}: {_explain(exc)}") from None
    _check_references(document, name)
    return GraphFile(name, document, file_digest, content_digest(document))


def content_digest(document: GraphDocument) -> str:
    text = json.dumps(document.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


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


def _check_references(document: GraphDocument, name: str) -> None:
    seen: set[str] = set()
    for i, node in enumerate(document.nodes):
        if node.feature_type not in KINDS:
            raise GraphFileError(f"{name}: nodes[{i}].feature_type: {node.feature_type!r} is not supported; "
                                 f"flowdb reads {', '.join(repr(k) for k in KINDS)}")
        if node.node_id in seen:
            raise GraphFileError(f"{name}: nodes[{i}].node_id: {node.node_id!r} occurs twice")
        seen.add(node.node_id)
    pairs: set[tuple[str, str]] = set()
    for i, link in enumerate(document.links):
        for end in ("source", "target"):
            if getattr(link, end) not in seen:
                raise GraphFileError(f"{name}: links[{i}].{end}: no node {getattr(link, end)!r} among nodes")
        if (link.source, link.target) in pairs:
            raise GraphFileError(f"{name}: links[{i}]: a second link {link.source} -> {link.target}")
        pairs.add((link.source, link.target))


_FIELD_NAMES = {name for model in (Metadata, QParams, Node, Link, GraphDocument) for name in model.model_fields}


def _explain(error: ValidationError) -> str:
    problem = error.errors()[0]
    field = ""
    loc = problem["loc"]
    for i, part in enumerate(loc):
        unknown_key = problem["type"] == "extra_forbidden" and i == len(loc) - 1
        if isinstance(part, str) and part not in _FIELD_NAMES and not unknown_key:
            continue  # a union member's tag ("str", "int") or a validator's name
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    if problem["type"] == "extra_forbidden":
        parent = {"qParams": QParams, "nodes": Node, "links": Link}.get(str(problem["loc"][0]), GraphDocument)
        if len(problem["loc"]) == 1:
            parent = GraphDocument
        return f"{field}: unknown key; valid keys: {', '.join(parent.model_fields)}"
    if problem["type"] == "missing":
        return f"{field}: missing"
    message = problem["msg"][0].lower() + problem["msg"][1:]
    given = json.dumps(problem.get("input"), default=str)
    if len(given) > 60:
        given = given[:57] + "..."
    return f"{field}: {message}, got {given}"
