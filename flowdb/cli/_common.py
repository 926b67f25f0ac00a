"""What every command shares: the one place errors meet the user, the Neo4j options, and
how answers are printed."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys

import click

from flowdb.errors import FlowdbError


class FlowdbGroup(click.Group):
    """The one place where errors meet the user: one line on stderr, never a traceback.

    flowdb's own errors exit 1; an interrupt says what the command marked with on_interrupt
    says (else "interrupted") and exits 130, or 0 for serve; a closed output pipe exits 141
    quietly; anything unforeseen is named in one line too (FLOWDB_DEBUG=1 shows its traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except FlowdbError as exc:
            fail(str(exc), 1)
        except KeyboardInterrupt:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            note, status = getattr(command, "interrupted", INTERRUPTED)
            if status:
                fail(note, status)
            echo(note)
            sys.exit(0)
        except BrokenPipeError:
            # The reader went away (`flowdb ... | head`): stop quietly, as Unix tools do, and
            # point stdout at /dev/null so the interpreter's last flush has nowhere to fail.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except MemoryError:
            fail("out of memory", 1)
        except Exception as exc:
            if os.environ.get("FLOWDB_DEBUG"):
                raise
            message = (str(exc).strip().splitlines() or [""])[0]
            fail(f"unexpected {type(exc).__name__}: {message} (FLOWDB_DEBUG=1 shows the traceback)", 1)


INTERRUPTED = ("interrupted", 130)


def on_interrupt(note: str, status: int = 130):
    """What Ctrl-C makes a command say: a build how to resume; serve that it stopped (status 0,
    said as a plain line, as uvicorn does). Commands without one say "interrupted" and exit 130."""

    def mark(command: click.Command) -> click.Command:
        command.interrupted = (note, status)
        return command

    return mark


def resumes(build: str):
    """on_interrupt for a build that picks up where it stopped."""
    return on_interrupt(f"interrupted; a stopped {build} resumes where it ended when run again")


def fail(message: str, status: int):
    echo(f"Error: {shown(message, one_line=True)}", err=True)
    sys.exit(status)


# Control characters a terminal would act on: C0 (but tab and newline, which lay out lines),
# DEL and C1 (0x9b is a one-byte CSI). ESC starts every escape sequence (CSI, OSC 52 writing the
# clipboard, a window title), so escaping it alone defuses the sequence it begins.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_IN_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def shown(text, one_line: bool = False) -> str:
    """Text as the terminal gets it: every control character written as an escape (\\x1b, \\n),
    so a label, name or source read from the database cannot act on the terminal.
    one_line: newline and tab escaped too (a table cell, a one-line error)."""
    pattern = _CONTROL_IN_LINE if one_line else _CONTROL
    return pattern.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), str(text))


def echo(message="", err: bool = False, nl: bool = True) -> None:
    """click.echo behind the sanitiser: what every command prints goes through here."""
    click.echo(shown(message), err=err, nl=nl)


def connection_options(command):
    """--uri/--user/--password/--database, else NEO4J_* variables, else the managed server."""

    @click.option("--uri", help="Bolt URI (default: $NEO4J_URI, else flowdb's managed local Neo4j).")
    @click.option("--user", "username", help="User name (default: $NEO4J_USERNAME or neo4j).")
    @click.option("--password", help="Password (default: $NEO4J_PASSWORD).")
    @click.option("--database", help="Database name (default: $NEO4J_DATABASE or the server's default).")
    @functools.wraps(command)
    def wrapper(*args, uri, username, password, database, **kwargs):
        from flowdb.settings import Neo4jSettings

        settings = Neo4jSettings.resolve(uri, username, password, database)
        return command(*args, settings=settings, **kwargs)

    return wrapper


def open_db(settings):
    from flowdb.store.connection import connect

    return connect(settings)


def build_options(command):
    """What a build is made of beyond the manifest: k, thresholds, and where to search."""
    @click.option("--k", type=click.IntRange(1, 10),
                  help="Top-k predecessors per module (default: the manifest's, else 1).")
    @click.option("--t-res", type=float, help="Residual threshold (overrides [classify]).")
    @click.option("--t-mlp", type=float, help="MLP threshold (overrides [classify]).")
    @click.option("--t-att", type=float, help="Attention threshold (overrides [classify]).")
    @click.option("--threshold-rule", type=click.Choice(["auto", "fixed", "chance", "quantile"]),
                  help="Per-layer threshold rule (default: the manifest's, else auto).")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                  help="Where to search: auto takes a CUDA GPU when one is visible.")
    @functools.wraps(command)
    def wrapper(*args, manifest, k, t_res, t_mlp, t_att, threshold_rule, **kwargs):
        from flowdb.packs.manifest import load_manifest

        parsed = load_manifest(manifest, k=k)
        overrides = {key: value for key, value in (("t_res", t_res), ("t_mlp", t_mlp), ("t_att", t_att),
                                                   ("rule", threshold_rule)) if value is not None}
        if overrides:
            parsed = parsed.with_thresholds(overrides)
        return command(*args, manifest=parsed, **kwargs)

    return wrapper


def flow_graph_options(command):
    """The cut-offs of a flow graph: the build's own unless given."""

    @click.option("--t-res", type=float, help="Residual chain cut-off (default: the thresholds stored with the build).")
    @click.option("--t-mod", type=float, help="MLP/attention cut-off (default: the thresholds stored with the build).")
    @click.option("--every-edge", is_flag=True, help="Follow every stored edge, whatever its cosine.")
    @click.option("--max-rank", default=1, show_default=True, type=click.IntRange(1, 10))
    @functools.wraps(command)
    def wrapper(*args, t_res, t_mod, every_edge, max_rank, **kwargs):
        params = {"t_res": t_res, "t_mod": t_mod, "every_edge": every_edge, "max_rank": max_rank}
        return command(*args, params=params, **kwargs)

    return wrapper


def parse_params(pairs):
    params = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="-p")
        key, value = pair.split("=", 1)
        params[key.strip()] = value
    return params


def template_frame(db, name, params, timeout_s=None):
    """Run a query template; its notes (incomplete pack, thresholds applied) go to stderr."""
    from flowdb.store.templates import run_template

    with notes_said_once():
        frame = run_template(db, name, params, timeout_s=timeout_s)
    echo_notes(frame)
    return frame


@contextlib.contextmanager
def notes_said_once():
    """flowdb's warnings are said by echo_notes in one line, not again by Python."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def echo_notes(frame) -> None:
    for label, key in (("Warning", "warning"), ("Thresholds", "thresholds")):
        if frame.attrs.get(key):
            echo(f"{label}: {frame.attrs[key]}", err=True)


def echo_frame(frame, fmt: str) -> None:
    """A frame as a table, CSV or JSON. Table and CSV cells are escaped one by one (so a label
    stays one cell of one row); JSON keeps its own escapes (json.dumps writes control characters
    as \\u001b, and non-ASCII ones too), DEL added."""
    from flowdb.store.templates import csv_text, records, table_text

    if fmt == "json":
        text = json.dumps(records(frame), indent=2, default=str, allow_nan=False)
        echo(text.replace("\x7f", "\\u007f"))  # the one control character JSON leaves raw
        return
    frame = frame.rename(columns=lambda name: shown(name, one_line=True))
    for column in frame.columns:
        if frame[column].dtype.kind not in "biufcmM":  # object, or pandas' own string dtype
            frame[column] = frame[column].map(lambda v: shown(v, one_line=True) if isinstance(v, str) else v)
    if fmt == "csv":
        echo(csv_text(frame), nl=False)
    else:
        echo(table_text(frame) if len(frame) else "(no rows)")


def echo_stored(report) -> None:
    from flowdb.packs.plan import layer_ranges

    if report.status == "unchanged":
        echo(f"{report.pack}: already stored with these parameters (build {report.fingerprint}); nothing to do")
        return
    echo(f"{report.pack}: {report.status} build {report.fingerprint}; "
         f"layers {layer_ranges(report.layers_written)}, {report.features} features, "
         f"{report.match_edges} match edges + {report.nowhere_marks} from-nowhere marks "
         f"(match {report.match_seconds:.1f}s, write {report.write_seconds:.1f}s, "
         f"{report.write_rate:,.0f} rel/s)")
    echo("categories: " + ", ".join(f"{k}={v}" for k, v in sorted(report.categories.items())))
    rules = sorted(set(report.layer_rules.values()))
    echo(f"thresholds: rule {report.threshold_rule} ({'; '.join(rules)}); "
         f"per layer: flowdb query thresholds -p pack={report.pack}")
    if report.chance_summary():
        echo(f"top-1 matches above chance (mean [min-max] over layers): {report.chance_summary()}")
