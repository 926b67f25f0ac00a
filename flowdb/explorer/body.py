"""The one reader of a request's JSON body, for every POST endpoint: bounded in bytes and in
nesting, so that a body nested 100,000 deep is a 400 that says so, not a RecursionError."""

from __future__ import annotations

import json
import re

from flowdb.errors import QueryError

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
