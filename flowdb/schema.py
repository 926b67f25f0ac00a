"""Typed, strict schemas for what users write (manifests), with one-line errors.

Every table is a pydantic model that forbids unknown keys and does not coerce
types (a string is not a number, true is not 1). `explain` turns the first
validation error into one line naming the TOML table, the key and what is allowed.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Cosine = Annotated[float, Field(strict=True, ge=-1.0, le=1.0, allow_inf_nan=False)]
Level = Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)]
NonEmpty = Annotated[str, Field(strict=True, min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def explain(error: ValidationError, root: type[BaseModel], root_name: str) -> str:
    """One line for the first problem: where (as a TOML table), which key, what is wrong."""
    problem = error.errors()[0]
    loc = [str(part) for part in problem["loc"]]
    if loc and loc[-1] == "[key]":  # a table key outside a fixed set, e.g. [modules.resid]
        loc = loc[:-1]
        problem = {**problem, "type": "extra_forbidden"}
    parent, key = loc[:-1], loc[-1] if loc else ""
    where = f"[{'.'.join(parent)}]" if parent else root_name
    if problem["type"] == "extra_forbidden":
        valid = ", ".join(sorted(_fields_at(root, parent)))
        return f"unknown key(s) {key!r} in {where}; valid keys: {valid}"
    if problem["type"] == "missing":
        return f"missing required key {key!r} in {where}"
    given = problem.get("input")
    message = problem["msg"][0].lower() + problem["msg"][1:]
    return f"{key} in {where}: {message}, got {given!r}" if loc else f"{root_name}: {message}"


def _fields_at(model: Any, path: list[str]) -> list[str]:
    """The keys a table at `path` may have, walking the schema's annotations."""
    node = model
    for part in path:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(part)
            node = field.annotation if field else None
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            return []
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    if typing.get_origin(node) is dict:
        key_type = typing.get_args(node)[0]
        return [str(a) for a in typing.get_args(key_type)] if typing.get_origin(key_type) is typing.Literal else []
    return []


def _unwrap(node: Any) -> Any:
    """Optional[X] -> X."""
    args = [a for a in typing.get_args(node) if a is not type(None)]
    if typing.get_origin(node) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return node
