"""Who may use the explorer: loopback by default, a token anywhere else, and for every
request that could change something (a POST) the token and the page's own origin.

The token travels as Jupyter's does: printed once in the URL (?token=...), then kept
in an HttpOnly, SameSite=Strict cookie, so pages never hold it in script. The Host
header is checked against the names the server answers to (DNS rebinding) by HostCheck,
whose refusal names the Host it got, the names it takes and --allow-host.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
import socket
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse

COOKIE = "flowdb_explorer_token"
HEADER = "x-flowdb-token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def cookie_name(port: int | None) -> str:
    """Browsers keep cookies per host, not per port: each explorer's has its port in its name."""
    return COOKIE if port is None else f"{COOKIE}_{port}"


def new_token() -> str:
    return secrets.token_urlsafe(24)


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Host header values to answer: loopback names, the bound address and, bound to every
    interface, this machine's names (or "*" when the user says so with --allow-host '*')."""
    names = {*LOOPBACK_NAMES, host, *extra}
    if host in ("0.0.0.0", "::"):
        names.update({socket.gethostname(), socket.getfqdn()})
        try:
            names.update(socket.gethostbyname_ex(socket.gethostname())[2])
        except OSError:
            pass  # no resolvable name: the names above still work
        names.update(_outward_address())
    return sorted(names)


def _outward_address() -> set[str]:
    """The address this machine reaches other machines from (the one a colleague types): a UDP
    socket's own address once pointed at a private address, which sends nothing."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.254.254.254", 1))
            return {probe.getsockname()[0]}
    except OSError:
        return set()  # no route off this machine: nobody else reaches it anyway


def allowed_note(names: list[str]) -> str:
    """The startup line of an explorer bound off loopback: the Host names it answers to, and how
    to add one."""
    return (f"the Host header may name {', '.join(names)}; "
            "to reach this explorer by another name, restart it with --allow-host NAME")


def check_host_patterns(patterns: tuple[str, ...]) -> None:
    """The --allow-host forms Starlette's Host check takes: a name, '*', or '*.domain'."""
    from flowdb.errors import FlowdbError

    for pattern in patterns:
        if not pattern or ("*" in pattern and pattern != "*" and not (pattern.startswith("*.")
                                                                      and "*" not in pattern[1:])):
            raise FlowdbError(f"--allow-host {pattern!r} is not a host name, '*', or '*.domain'")


_HOST = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]/\s]+)(?::[0-9]{1,5})?")
_NAME = re.compile(r"[A-Za-z0-9.\-\[\]:]+")


class HostCheck:
    """ASGI middleware: the Host header must name one of `allowed` ('*' any, '*.domain' a
    domain's names), as Starlette's TrustedHostMiddleware checks it; a refusal is a 400 that
    names the Host it got, the names allowed, and --allow-host."""

    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, allowed
        self.patterns = [pattern.lower() for pattern in allowed]

    async def __call__(self, scope, receive, send):
        if "*" in self.patterns or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        request = Request(scope)
        given = request.headers.get("host")
        problem = self.refusal(given)
        if problem:
            return await _refuse(request, problem, status=400)(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, given: str | None) -> str | None:
        """None for a Host this explorer answers to; else why not, and what to do."""
        names = ", ".join(self.allowed)
        if not given:
            return f"the request has no Host header; this explorer answers to {names}"
        parsed = _HOST.fullmatch(given)
        host = parsed["host"].lower() if parsed else None
        if host and any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in self.patterns):
            return None
        shown = host or given
        add = shown if host and _NAME.fullmatch(host) else "NAME"
        return (f"the Host header names {shown!r}, which this explorer does not answer to (it answers to "
                f"{names}); to reach it by that name, restart flowdb serve with --allow-host {add}")


class TokenGuard:
    """ASGI middleware: token checks for every request off loopback, and for every POST."""

    def __init__(self, app, token: str, require_for_reads: bool, port: int | None = None):
        self.app, self.token, self.require_for_reads = app, token, require_for_reads
        self.cookie = cookie_name(port)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        given = request.query_params.get("token")
        if given is not None and self._valid(given) and request.method == "GET":
            # Keep it in a cookie and drop it from the address bar (and from history).
            query = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + (f"?{urlencode(query)}" if query else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict")
            return await response(scope, receive, send)
        authorised = self._valid(request.headers.get(HEADER) or request.cookies.get(self.cookie) or given or "")
        if request.method not in ("GET", "HEAD"):
            problem = None if authorised else "this request needs the explorer's token"
            problem = problem or _cross_origin(request)
            if problem:
                return await _refuse(request, problem)(scope, receive, send)
        elif self.require_for_reads and not authorised:
            return await _refuse(request, "this explorer needs its token: open the URL that flowdb serve "
                                          "printed (it ends in ?token=...)")(scope, receive, send)
        return await self.app(scope, receive, send)

    def _valid(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())


def _cross_origin(request: Request) -> str | None:
    """None when the request comes from a page of this server; else why it is refused."""
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin is not None:
        return None if origin == own else f"requests from {origin} are refused (only this server's own pages)"
    if request.headers.get("sec-fetch-site") in ("same-origin", None):
        return None
    return "requests from other sites are refused (only this server's own pages)"


def _refuse(request: Request, message: str, status: int = 403):
    if request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", ""):
        return JSONResponse({"error": message}, status_code=status)
    return PlainTextResponse(f"{status}: {message}", status_code=status)
