"""The flow explorer's web app (Starlette): pages, and the JSON API under /api/ they use.

Pages are Jinja2 shells (autoescaped) whose script fetches the API and writes every
value as text (textContent), so a label is never markup. plotly.js comes from the
plotly wheel flowdb already depends on; nothing is fetched from a CDN.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from flowdb.analysis.specs import SCHEDULES, STRATEGIES, GenerationSpec, SteeringSpec
from flowdb.errors import (
    DatabaseError,
    FlowdbError,
    Neo4jUnavailable,
    NotFound,
    QueryError,
    QueryTimeout,
)
from flowdb.explorer import console, data
from flowdb.explorer.assets import STATIC, TEMPLATES, plotly_js
from flowdb.explorer.body import BodyRefused, Setting, read_json, settings
from flowdb.explorer.security import HostCheck, TokenGuard, allowed_hosts
from flowdb.explorer.steer_jobs import Busy, SteeringRunner
from flowdb.store.features import is_reference
from flowdb.views import marks

log = logging.getLogger("flowdb.explorer")
SEARCH_LIMIT = 20
PLOT_LOCK = threading.Lock()  # pyplot's figure registry is shared by every worker thread
STEERING_SETTINGS = (  # what POST /api/steer/start takes; the defaults are the panel's
    Setting("feature", str, "", max_chars=2000),
    Setting("prompt", str, "", max_chars=2000),
    Setting("strategy", str, "cumulative", choices=STRATEGIES),
    Setting("schedule", str, "exponential", choices=SCHEDULES),
    Setting("s", float, 3.0, -100, 100),
    Setting("alpha", float, 0.25, 0, 10),
    Setting("max_new_tokens", int, 36, 1, 256),
)


class Connection:
    """One driver for the app's life, made on first use; a failed connect is retried by the
    next request, and the driver itself reconnects once a stopped server is back."""

    def __init__(self, connect: Callable[[], object], timeout_s: float | None = None):
        self._connect, self._db, self._lock = connect, None, threading.Lock()
        self.timeout_s = timeout_s

    def __call__(self):
        with self._lock:
            if self._db is None:
                self._db = data.TimeLimited(self._connect(), self.timeout_s)
            return self._db


def status_of(exc: Exception) -> int:
    if isinstance(exc, Busy):
        return 409
    if isinstance(exc, QueryTimeout):
        return 504
    if isinstance(exc, Neo4jUnavailable):
        return 503
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, DatabaseError):
        return 502
    return 400 if isinstance(exc, (FlowdbError, ValueError)) else 500


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def create_app(connect: Callable[[], object], *, host: str = "127.0.0.1", token: str,
               require_token: bool = False, allow_hosts: tuple[str, ...] = (),
               timeout_s: float | None = None, port: int | None = None) -> Starlette:
    """The explorer over the database connect() opens. require_token: every request needs
    the token (any non-loopback bind); POSTs always do."""
    db = Connection(connect, timeout_s)
    steering = SteeringRunner(db)
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.autoescape = True

    def page(name: str, title: str, **context):
        async def endpoint(request: Request):
            values = {key: await run_in_threadpool(value, request) if callable(value) else value
                      for key, value in context.items()}
            return templates.TemplateResponse(request, f"{name}.html", {
                "title": title.format(**request.path_params), "page": name, "config": json.dumps(marks.view_config()),
                **values})
        return endpoint

    def api(function):
        """A JSON endpoint: function(request) runs in a worker thread; a flowdb error is a
        one-line {"error": ...} with its HTTP status, never a traceback."""
        async def endpoint(request: Request):
            try:
                body = await read_json(request) if request.method == "POST" else None
            except BodyRefused as exc:
                return JSONResponse({"error": one_line(exc)}, status_code=400)
            try:
                result = await run_in_threadpool(function, request, body)
            except (FlowdbError, ValueError) as exc:
                return JSONResponse({"error": one_line(exc)}, status_code=status_of(exc))
            if isinstance(result, Response):
                return result
            return JSONResponse(result)
        return endpoint

    def key_of(request: Request) -> str:
        """A stored key as it stands (what it names is checked by the read that uses it),
        any other reference resolved to one."""
        from flowdb.store.features import is_key, resolve_feature

        text = request.path_params["key"].strip()
        return text if is_key(text) else resolve_feature(db(), text)

    def api_packs(request, body):
        return {"packs": data.packs(db())}

    def api_pack(request, body):
        return data.pack_detail(db(), request.path_params["name"])

    def api_search(request, body):
        from flowdb.store.features import resolve_feature
        from flowdb.store.search import search_labels

        text = request.query_params.get("q", "").strip()
        if not text:
            return {"feature": None, "results": []}
        if is_reference(text):
            return {"feature": resolve_feature(db(), text), "results": []}
        limit = data.bounded(request.query_params.get("limit"), "limit", SEARCH_LIMIT, 1, 200)
        pack = request.query_params.get("pack") or None
        results = search_labels(db(), text, pack=pack, limit=limit)
        for row in results:  # the explanation's own type stays; its source is who wrote it
            row["type"], row["source"] = row["source"], data.label_source(row["source"])
        return {"feature": None, "results": results}

    def api_feature(request, body):
        return data.feature_detail(db(), key_of(request))

    def api_flow(request, body):
        params = request.query_params
        return data.flow(db(), key_of(request), data.EdgeFilter.parse(params), data.parse_depth(params.get("depth")))

    def api_neighbours(request, body):
        params = request.query_params
        cap = data.bounded(params.get("cap"), "cap", data.NEIGHBOUR_CAP, 1, 500)
        return data.neighbours(db(), key_of(request), data.EdgeFilter.parse(params), cap)

    def api_table(template: str):
        def run(request, body):
            from flowdb.store.templates import records, run_template

            key = key_of(request)
            flt = data.EdgeFilter.parse(request.query_params)
            frame = run_template(db(), template, {"feature": key, **flt.params()})
            return {"columns": list(frame.columns), "rows": records(frame),
                    "note": frame.attrs.get("thresholds"), "warning": frame.attrs.get("warning")}
        return run

    def api_family(request, body):
        """The family template: the feature's relatives in linked packs (above_only, limit as there)."""
        from flowdb.store.templates import records, run_template

        given = {name: request.query_params[name] for name in ("above_only", "limit")
                 if request.query_params.get(name)}
        frame = run_template(db(), "family", {"feature": key_of(request), **given})
        return {"columns": list(frame.columns), "rows": records(frame), "warning": frame.attrs.get("warning")}

    def api_download(request, body):
        from flowdb.store.templates import csv_text
        from flowdb.views.graph_json import flow_graph_json, slug_for

        key = key_of(request)
        view = data.flow(db(), key, data.EdgeFilter.parse(request.query_params),
                         data.parse_depth(request.query_params.get("depth")))
        if view["too_big"]:
            raise QueryError(view["too_big"]["message"])
        frame = data.flow_frame(view)
        fmt = request.path_params["fmt"]
        name = slug_for(key)
        if fmt == "json":
            from flowdb.store.graph import require_pack

            document = flow_graph_json(frame, require_pack(db(), view["pack"]).model, slug=name)
            return Response(json.dumps(document, indent=1), media_type="application/json",
                            headers=_attachment(f"{name}.json"))
        if fmt == "csv":
            return Response(csv_text(frame), media_type="text/csv", headers=_attachment(f"{name}.csv"))
        if fmt in ("png", "svg"):
            from flowdb.views.plots import plot_flow

            with PLOT_LOCK, tempfile.TemporaryDirectory(prefix="flowdb-explorer-") as folder:
                out = plot_flow(frame, Path(folder) / f"{name}.{fmt}", f"{key} (flowdb explorer view)")
                content = out.read_bytes()
            media = "image/png" if fmt == "png" else "image/svg+xml"
            return Response(content, media_type=media, headers=_attachment(f"{name}.{fmt}"))
        raise QueryError(f"no download format {fmt!r}; use json, csv, png or svg")

    def api_graphs(request, body):
        from flowdb.circuits.store import list_graphs

        return {"graphs": list_graphs(db())}

    def api_graph(request, body):
        """The pruned subgraph a graph page draws: ?nodes=N feature and error nodes, ?links=N
        links, ?suggest=false without flowdb's supernode suggestions."""
        from flowdb.circuits import subgraph

        params = request.query_params
        suggest = params.get("suggest") or "true"
        if suggest not in ("true", "false"):
            raise QueryError(f"parameter suggest must be true or false, got {suggest!r}")
        return subgraph.read_subgraph(
            db(), request.path_params["slug"],
            node_cap=data.bounded(params.get("nodes"), "nodes", subgraph.NODE_CAP, 1, subgraph.MAX_NODE_CAP),
            link_cap=data.bounded(params.get("links"), "links", subgraph.LINK_CAP, 1, subgraph.MAX_LINK_CAP),
            suggest=suggest == "true")

    def api_feature_graphs(request, body):
        from flowdb.circuits.subgraph import graphs_of_feature

        return graphs_of_feature(db(), key_of(request))

    def api_templates(request, body):
        from flowdb.store.templates import templates as all_templates

        return {"templates": [{"name": t.name, "answers": t.answers,
                               "params": [{"name": p.name, "type": p.type, "required": p.required,
                                           "default": p.default, "doc": p.doc} for p in t.params]}
                              for t in all_templates().values()]}

    def api_template(request, body):
        from flowdb.store.templates import records, run_template

        params = {k: v for k, v in request.query_params.items() if v != ""}
        frame = run_template(db(), request.path_params["name"], params)
        return {"columns": list(frame.columns), "rows": records(frame),
                "note": frame.attrs.get("thresholds"), "warning": frame.attrs.get("warning")}

    def api_cypher(request, body):
        if not isinstance(body, dict):
            raise QueryError("send {\"statement\": ..., \"params\": {...}}")
        return console.run(db(), body.get("statement"), body.get("params"))

    def steering_pack(request) -> str | None:
        """The pack a steering question is about: ?pack=NAME, or ?feature= any feature reference."""
        from flowdb.store.features import is_key, resolve_feature

        params = request.query_params
        if params.get("pack"):
            return params["pack"]
        text = (params.get("feature") or "").strip()
        if not text:
            return None
        return (text if is_key(text) else resolve_feature(db(), text)).split("/", 1)[0]

    def api_steer_status(request, body):
        """Whether steering can run (for a pack or a feature's pack, when one is named), and the latest run."""
        return steering.status(steering_pack(request))

    def feature_steering_message(request) -> str | None:
        """The feature page's steering panel: disabled with this reason, when there is one."""
        from flowdb.store.features import is_key

        text = request.path_params["key"].strip()
        try:
            return steering.unavailable(text.split("/", 1)[0] if is_key(text) else key_of(request).split("/", 1)[0])
        except FlowdbError:
            return steering.unavailable()  # the page itself says what is wrong with the feature

    def api_steer(request, body):
        from flowdb.store.features import resolve_feature

        given = settings(body, STEERING_SETTINGS, "steering settings")
        feature = resolve_feature(db(), given.pop("feature"))
        prompt, tokens = given.pop("prompt") or GenerationSpec.prompt, given.pop("max_new_tokens")
        spec = SteeringSpec(seed_feature=feature, **given)
        return {"job": steering.start(spec, GenerationSpec(prompt=prompt, max_new_tokens=tokens))}

    def api_steer_cancel(request, body):
        return steering.cancel()

    def search_page(request: Request):
        """A reference goes straight to its feature page; words show the label matches."""
        text = request.query_params.get("q", "").strip()
        if text and is_reference(text):
            try:
                from flowdb.store.features import resolve_feature

                key = resolve_feature(db(), text)
                return RedirectResponse(f"/feature/{quote(key)}", status_code=303)
            except FlowdbError:
                pass  # the results page shows the message the API gives
        return None

    search_shell = page("search", "Search")
    graph_shell = page("graph", "Graph {slug}")

    def error_page(request: Request, message: str, status_code: int = 404):
        return templates.TemplateResponse(request, "error.html", {
            "title": "Not found", "page": "error", "config": "{}", "message": message}, status_code=status_code)

    def stored_graph(slug: str) -> bool:
        """False when no graph has the slug; any other trouble is left for the page's API
        call to report (a stopped Neo4j, say)."""
        from flowdb.circuits.store import require_graph

        try:
            require_graph(db(), slug)
        except NotFound:
            return False
        except FlowdbError:
            pass
        return True

    async def graph_page(request: Request):
        slug = request.path_params["slug"]
        if not await run_in_threadpool(stored_graph, slug):
            return error_page(request, f"No attribution graph {slug!r} is stored: see Attribution graphs.")
        return await graph_shell(request)

    async def search(request: Request):
        redirect = await run_in_threadpool(search_page, request)
        return redirect or await search_shell(request)

    async def plotly(request: Request):
        return FileResponse(plotly_js(), media_type="text/javascript",
                            headers={"Cache-Control": "max-age=86400"})

    async def not_found(request: Request, exc: HTTPException):
        if exc.status_code == 405:  # a route that exists, asked with another method: JSON, as the API's errors
            allowed = (exc.headers or {}).get("Allow", "")
            return JSONResponse({"error": f"{request.method} is not allowed at {request.url.path}; "
                                          f"it takes {allowed}"}, status_code=405, headers={"Allow": allowed})
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": f"no such address: {request.url.path}"}, status_code=exc.status_code)
        return error_page(request, f"Nothing at {request.url.path}.", exc.status_code)

    async def server_error(request: Request, exc: Exception):
        log.error("explorer: %s at %s: %s", type(exc).__name__, request.url.path, one_line(exc))
        return JSONResponse({"error": f"internal error ({type(exc).__name__}): {one_line(exc)}"}, status_code=500)

    routes = [
        Route("/", page("packs", "Packs")),
        Route("/pack/{name}", page("pack", "Pack {name}")),
        Route("/feature/{key:path}", page("feature", "{key}", steering_message=feature_steering_message)),
        Route("/search", search),
        Route("/console", page("console", "Cypher console")),
        Route("/graphs", page("graphs", "Attribution graphs")),
        Route("/graph/{slug:path}", graph_page),
        Route("/static/plotly.min.js", plotly),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
        Route("/api/packs", api(api_packs)),
        Route("/api/packs/{name}", api(api_pack)),
        Route("/api/search", api(api_search)),
        Route("/api/features/{key:path}", api(api_feature)),
        Route("/api/download/{fmt}/{key:path}", api(api_download)),
        Route("/api/flow/{key:path}", api(api_flow)),
        Route("/api/neighbours/{key:path}", api(api_neighbours)),
        Route("/api/lineage/{key:path}", api(api_table("lineage"))),
        Route("/api/descendants/{key:path}", api(api_table("descendants"))),
        Route("/api/family/{key:path}", api(api_family)),
        Route("/api/graphs", api(api_graphs)),
        Route("/api/graphs/{slug:path}", api(api_graph)),
        Route("/api/feature-graphs/{key:path}", api(api_feature_graphs)),
        Route("/api/templates", api(api_templates)),
        Route("/api/templates/{name}", api(api_template)),
        Route("/api/cypher", api(api_cypher), methods=["POST"]),
        Route("/api/steer", api(api_steer_status)),
        Route("/api/steer/start", api(api_steer), methods=["POST"]),
        Route("/api/steer/cancel", api(api_steer_cancel), methods=["POST"]),
    ]
    # The database is the caller's: connect() made it, and whoever called create_app closes it.
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: server_error})
    app.add_middleware(RefusesControlCharacters)
    app.add_middleware(StopsCleanly)
    app.add_middleware(TokenGuard, token=token, require_for_reads=require_token, port=port)
    app.state.allowed_hosts = allowed_hosts(host, allow_hosts)
    app.add_middleware(HostCheck, allowed=app.state.allowed_hosts)
    app.state.connection = db
    return app


class RefusesControlCharacters:
    """ASGI middleware: an address holding a control character (%0A, %1B, ...) is refused, naming
    it escaped, before any route reads it (a stripped key would name another feature, an error
    quoting it raw would name an address that exists)."""

    CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.CONTROL.search(scope["path"]):
            response = JSONResponse({"error": f"the address {scope['path']!r} holds a control character"},
                                    status_code=400)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class StopsCleanly:
    """ASGI middleware: a request still running when the server stops (Ctrl-C on flowdb serve
    cancels it) answers 503 in JSON, if it has not begun answering, and ends there: no
    CancelledError traceback in the server's terminal."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            if not started:
                response = JSONResponse({"error": "the explorer stopped while this request ran"}, status_code=503)
                with contextlib.suppress(Exception):
                    await response(scope, receive, send)


def _attachment(name: str) -> dict:
    return {"Content-Disposition": f'attachment; filename="{name}"'}
