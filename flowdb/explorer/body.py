"""The one reader of a request's JSON body, for every POST endpoint: bounded in bytes and in
nesting, so that a body nested 100,000 deep is a 400 that says so, not a RecursionError; and
the one checker of the settings such a body holds (settings(): typed, bounded, no unknown key)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from flowdb.errors import QueryError, number_text

MAX_BYTES = 1 << 20  # a statement, its parameters and the steering settings fit many times over
MAX_DEPTH = 32  # arrays and objects inside one another
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


class BodyRefused(QueryError):
    """A request body that is too large, too deep, or not JSON."""


async def read_json(request) -> object | None:
    """The body's JSON value (None for an empty body); BodyRefused past MAX_BYTES or MAX_DEPTH."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BYTES:
        raise BodyRefused(f"the request body is larger than {MAX_BYTES:,} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BYTES:
            raise BodyRefused(f"the request body is larger than {MAX_BYTES:,} bytes")
    if not raw.strip():
        return None
    if depth(bytes(raw)) > MAX_DEPTH:
        raise BodyRefused(f"the request body nests arrays and objects more than {MAX_DEPTH} deep")
    try:
        return json.loads(bytes(raw))
    except (ValueError, RecursionError):
        raise BodyRefused("the request body is not JSON") from None


def depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text (brackets inside strings skipped);
    read before json.loads, whose recursion such nesting would exhaust."""
    deepest = level = 0
    for bracket in _BRACKET.findall(_STRING.sub(b'""', raw)):
        level += 1 if bracket in (b"[", b"{") else -1
        deepest = max(deepest, level)
    return deepest


@dataclass(frozen=True)
class Setting:
    """One field of a JSON object a POST sends: its JSON type (str, float: any number, int: a
    whole number), its default when absent or null, and its bounds."""

    name: str
    kind: type
    default: object = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    max_chars: int | None = None


def settings(body: object, fields: tuple[Setting, ...], what: str) -> dict:
    """The body's values by field name, each checked against its Setting (a bool is not a number,
    a string is not a number, an object is not a string); QueryError naming the field otherwise,
    and for a key no field has."""
    if not isinstance(body, dict):
        raise QueryError(f"send the {what} as a JSON object")
    known = {field.name: field for field in fields}
    for key in body:
        if key not in known:
            raise QueryError(f"unknown setting {key!r}; the settings are {', '.join(known)}")
    return {field.name: _checked(field, body.get(field.name)) for field in fields}


def _checked(field: Setting, value: object) -> object:
    if value is None:
        return field.default
    if field.kind is str:
        if not isinstance(value, str):
            raise QueryError(f"{field.name} must be a string, got {json_shown(value)}")
        if field.choices and value not in field.choices:
            raise QueryError(f"{field.name} must be one of {', '.join(field.choices)}, got {value!r}")
        if field.max_chars is not None and len(value) > field.max_chars:
            raise QueryError(f"{field.name} must be at most {field.max_chars} characters, got {len(value)}")
        return value
    whole = field.kind is int
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (whole and isinstance(value, float) and not value.is_integer()):
        raise QueryError(f"{field.name} must be {'a whole number' if whole else 'a number'}, got {json_shown(value)}")
    if not field.low <= value <= field.high:  # NaN and infinities fail here too
        raise QueryError(f"{field.name} must be from {number_text(field.low)} to {number_text(field.high)}, "
                         f"got {number_text(value)}")
    return field.kind(value)


def json_shown(value: object) -> str:
    """A JSON value as a message names it: true, false, a number, a quoted string, an object."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    return number_text(value)
