"""Run the explorer with uvicorn: check the address first, print the URL once it answers,
stop cleanly on Ctrl-C."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
import webbrowser
from urllib.parse import quote

from flowdb.errors import FlowdbError
from flowdb.explorer.security import allowed_note, check_host_patterns, is_loopback, new_token

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8047
STOPPED = "flowdb explorer stopped"


def url_for(host: str, port: int, path: str = "/", token: str | None = None) -> str:
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host  # a name the Host check accepts
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}{path}" + (f"?token={token}" if token else "")


def check_address(host: str, port: int) -> None:
    """Fail in one line when the address cannot be bound (in use, not this machine's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise FlowdbError(f"port {port} on {host} is in use (another flowdb serve?); "
                                  "pass --port to use another") from None
            raise FlowdbError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


class _QuietStop(logging.Filter):
    """Requests still running at Ctrl-C are cancelled and answered 503 (app.StopsCleanly); uvicorn's
    own ERROR line about cancelling them is not news to the user who pressed Ctrl-C."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Cancel %s running task(s)")


def serve(connect, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, feature: str | None = None,
          open_browser: bool = False, allow_hosts: tuple[str, ...] = (), echo=print) -> None:
    import uvicorn

    from flowdb.explorer.app import create_app

    check_host_patterns(allow_hosts)
    check_address(host, port)
    db = connect()  # a managed server is started now, and a wrong address fails here in one line
    token = new_token()
    # Off loopback, or reached through other names (a proxy's), every request needs the token.
    loopback = is_loopback(host) and not allow_hosts
    app = create_app(lambda: db, host=host, token=token, require_token=not loopback, allow_hosts=allow_hosts,
                     port=port)
    path = "/" if feature is None else "/feature/" + quote(feature)
    url = url_for(host, port, path, token)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=3))

    def announce():
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            echo(f"flowdb explorer on {db.where}: {url}")
            if not is_loopback(host):  # reached by other machines: by which names, and how to add one
                echo(allowed_note(app.state.allowed_hosts))
            echo("(the token in the URL is needed " + ("for every request" if not loopback else "to steer")
                 + "; Ctrl-C stops the explorer)")
            if open_browser:
                webbrowser.open(url)

    threading.Thread(target=announce, daemon=True).start()
    logging.getLogger("uvicorn.error").addFilter(_QuietStop())
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for, but not always
        pass
    finally:
        db.close()
    if not server.started:  # Server.run returns, rather than exits, when its startup failed
        raise FlowdbError(f"the explorer could not start on {host}:{port} (see the lines above)")
    echo(STOPPED)  # a started server's run() returns once a signal (Ctrl-C) has shut it down
