"""flowdb's managed local Neo4j 5.26: fetched through Maven Central, run embedded.

Layout under FLOWDB_HOME/neo4j: lib/ (jars; lib/.flowdb-launcher/, see
flowdb.store.launcher), dbms/ (databases, transaction logs and Neo4j's own logs),
import/ (empty: the only directory LOAD CSV could name, and file URLs are refused
anyway), logs/server.log, server.pid, start.lock and password; for bulk loads
(flowdb.store.bulk) also admin-conf/ (neo4j-admin's view of dbms/), bulk/ (import files
while they are written and imported), logs/bulk-import.log and,
while an import runs, bulk-import.pid.
No Docker and no download site are needed: only Java 17+ and Maven, which
resolve org.neo4j:neo4j and org.neo4j:neo4j-bolt.

The server is private to the user who runs it: Bolt on 127.0.0.1 only, the user
neo4j with a generated password (FLOWDB_HOME/neo4j/password, mode 0600), every
directory 0700 and every file the server writes 0600, and LOAD CSV reads neither
local files nor URLs.
"""

from __future__ import annotations

import fcntl
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from flowdb.errors import DiskFullError, Neo4jUnavailable, first_line
from flowdb.settings import flowdb_home, java_heap, make_private, managed_port, private_dir
from flowdb.settings import page_cache_mb as page_cache_mb_setting
from flowdb.store.launcher import launcher_args
from flowdb.writes import write_errors

NEO4J_VERSION = "5.26.30"
START_TIMEOUT_S = 180
START_POLL_S = 0.1  # a probe costs a few ms; a start now takes seconds, not tens
DATABASE_FAILED = {"offline", "quarantined", "dirty"}  # default-database states that starting longer cannot mend
# Bulk ingest is throughput work: the parallel collector and a 4 GB heap wrote
# about 35% more relationships/s than G1 with 2 GB (benchmarks/bench_ingest.py).
DEFAULT_HEAP = "4g"
DEFAULT_JAVA_OPTS = "-XX:+UseParallelGC"
STOP_TIMEOUT_S = 60
# neo4j-admin's importer keeps its big structures off heap (--max-off-heap-memory).
DEFAULT_ADMIN_HEAP = "2g"
LAUNCHER = "FlowdbNeo4j"  # the launcher's class; its name in a command line marks our server
USER = "neo4j"
ADMIN_TOOL = "org.neo4j.cli.AdminTool"  # neo4j-admin's main class (jar neo4j-command-line)


@dataclass(frozen=True)
class StoreCost:
    """What writing a graph costs the disk of the managed server's store, in bytes per
    node and per relationship written (features and SAE nodes; match edges, marks and
    links: a planted pack's mix, at k=1 and k=8)."""

    per_node: float
    per_relationship: float

    def bytes(self, nodes: int, relationships: int) -> int:
        return math.ceil(self.per_node * nodes + self.per_relationship * relationships)


# Measured on Neo4j 5.26.30 by benchmarks/measure_store_bytes.py (planted packs of 4 layers
# x 1,024 features, 12,302 nodes, at k=1 and k=8: 12,034 and 90,830 relationships): disk
# blocks of the database's store and transaction logs, with the server stopped, after a
# write minus before, solved for the two costs; rounded up. Over Bolt: 572 and 239 bytes.
# Deleting costs too (the transaction log records it; the store does not shrink): 295
# bytes per node or relationship deleted, paid when a replacement deletes the old build.
# A bulk import writes almost no log (store: 248 and 76 bytes), but its import files are
# on the same disk while it runs (78 and 37 bytes): together 326 and 113.
BOLT_COST = StoreCost(per_node=600, per_relationship=250)
DELETE_COST = StoreCost(per_node=300, per_relationship=300)
BULK_COST = StoreCost(per_node=350, per_relationship=125)
# Room a write leaves free beyond its estimate: Neo4j needs some for checkpoints, its
# own logs and index updates, and a full disk stops it on a critical error.
SPACE_MARGIN = 0.25
MIN_SPACE_MARGIN = 32 * 2**20


@dataclass(frozen=True)
class ManagedServer:
    root: Path
    port: int
    home: Path | None = None  # FLOWDB_HOME, kept private too when the server lives in it

    def __post_init__(self) -> None:
        # Absolute, so the paths we launch with are the paths we recognise later.
        object.__setattr__(self, "root", Path(self.root).absolute())
        if self.home is not None:
            object.__setattr__(self, "home", Path(self.home).absolute())

    @classmethod
    def default(cls) -> ManagedServer:
        home = flowdb_home()
        return cls(home / "neo4j", managed_port(), home)

    @property
    def uri(self) -> str:
        return f"bolt://127.0.0.1:{self.port}"

    @property
    def lib(self) -> Path:
        return self.root / "lib"

    @property
    def dbms_dir(self) -> Path:
        return self.root / "dbms"

    @property
    def import_dir(self) -> Path:
        return self.root / "import"

    @property
    def data_dir(self) -> Path:
        return self.dbms_dir / "data"

    def store_dirs(self, database: str = "neo4j") -> tuple[Path, Path]:
        """A database's store and its transaction logs, where the DBMS keeps them."""
        return self.data_dir / "databases" / database, self.data_dir / "transactions" / database

    @property
    def import_marker(self) -> Path:
        return self.root / "bulk-import.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "server.log"

    @property
    def neo4j_log(self) -> Path:
        """Neo4j's own log (debug.log): why a database failed, in full."""
        return self.dbms_dir / "logs" / "debug.log"

    @property
    def logs(self) -> str:
        return f"logs: {self.log_file}, {self.neo4j_log}"

    @property
    def pid_file(self) -> Path:
        return self.root / "server.pid"

    @property
    def password_file(self) -> Path:
        return self.root / "password"

    def auth(self) -> tuple[str, str]:
        """The user neo4j and its password; the password is generated on first use."""
        self._make_dirs_private()
        if not self.password_file.exists():
            _write_new_password(self.password_file)
        make_private(self.password_file)
        try:
            password = self.password_file.read_text().strip()
        except OSError as exc:
            raise Neo4jUnavailable(f"cannot read the managed Neo4j's password from "
                                   f"{self.password_file} ({exc.strerror})") from None
        if not password:
            raise Neo4jUnavailable(
                f"{self.password_file} is empty; delete it, then run 'flowdb neo4j stop' and "
                "'flowdb neo4j start' to generate a new password")
        return USER, password

    def require_space(self, needed: int, what: str) -> None:
        """Refuse (DiskFullError) when the disk that holds this server's store lacks
        `needed` bytes plus a margin; `what` says what would have been written."""
        margin = max(MIN_SPACE_MARGIN, math.ceil(needed * SPACE_MARGIN))
        where = next(path for path in (self.data_dir, *self.data_dir.parents) if path.exists())
        free = shutil.disk_usage(where).free
        if free < needed + margin:
            raise DiskFullError(
                f"{what} needs about {_mib(needed + margin)} free on the disk of the managed Neo4j's "
                f"store ({_mib(needed)} estimated + {_mib(margin)} to spare), but {where} has "
                f"{_mib(free)} free; nothing was written: free some space, or move FLOWDB_HOME "
                "to a larger disk")

    @property
    def _fetched_marker(self) -> Path:
        return self.lib / f".complete-{NEO4J_VERSION}"

    def fetched(self) -> bool:
        return self._fetched_marker.exists()

    def fetch(self) -> None:
        """Resolve the Neo4j jars through Maven (first use only)."""
        if self.fetched():
            return
        for tool in ("java", "mvn"):
            if shutil.which(tool) is None:
                raise Neo4jUnavailable(
                    f"cannot fetch Neo4j {NEO4J_VERSION}: '{tool}' is not on PATH "
                    "(install Java 17+ and Maven, or set NEO4J_URI to a running Neo4j)"
                )
        work = private_dir(self.root / "maven")
        _write_private(work / "pom.xml", _resource("pom.xml").read_bytes())
        staging = self.root / "lib.partial"
        shutil.rmtree(staging, ignore_errors=True)
        print(f"Fetching Neo4j {NEO4J_VERSION} through Maven Central "
              f"(about 120 MB, first use only) into {self.lib}", file=sys.stderr)
        proc = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(work / "pom.xml"),
             "dependency:copy-dependencies", f"-DoutputDirectory={staging}"],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["(no output)"]
            raise Neo4jUnavailable(f"Maven could not fetch Neo4j {NEO4J_VERSION}: {tail[0]}")
        shutil.rmtree(self.lib, ignore_errors=True)
        staging.rename(self.lib)
        self._fetched_marker.touch()

    def pid(self) -> int | None:
        """The server's pid, or None: the pid file is believed only when it names a live
        FlowdbNeo4j launcher for this server's dbms directory."""
        running = self._running()
        return running[0] if running else None

    def answers(self) -> bool:
        return bolt_probe(self.uri, self.auth()) == "ok"

    def require_online(self) -> None:
        """Refuse (Neo4jUnavailable) unless the server answers and its default database
        takes queries: Bolt can answer while the database is offline or has stopped on
        a critical error (a full disk), and then every query fails."""
        state = bolt_probe(self.uri, self.auth())
        if state == "refused":
            raise self._password_refused()
        if state == "down":
            raise Neo4jUnavailable(f"the managed Neo4j does not answer on {self.uri} "
                                   f"(start it with 'flowdb neo4j start'; {self.logs})")
        status, problem = database_state(self.uri, self.auth())
        if status != "online":
            raise self._database_down(problem)

    def _database_down(self, problem: str) -> Neo4jUnavailable:
        return Neo4jUnavailable(f"the managed Neo4j answers on {self.uri}, but {problem}; see its {self.logs}")

    def start(self, heap: str | None = None, page_cache_mb: int | None = None) -> None:
        """Start the server unless it already answers; wait until Bolt answers. Starts
        of one server take turns: a second one waits, then finds the first's server (two
        JVMs would race for the store, and the loser's pid file would hide the winner)."""
        lock = private_dir(self.root) / "start.lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise Neo4jUnavailable(f"cannot open {lock} ({exc.strerror}); "
                                   "set FLOWDB_HOME to a directory you can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # let go when fd closes, or when this process dies
            self._start(heap, page_cache_mb)
        finally:
            os.close(fd)

    def _start(self, heap: str | None, page_cache_mb: int | None) -> None:
        auth = self.auth()
        running = self._running()
        state = bolt_probe(self.uri, auth)
        if state != "down" and running is None:  # never write into a stranger's database
            raise Neo4jUnavailable(
                f"another Neo4j already answers on {self.uri}, not the one under {self.root}; "
                "set FLOWDB_NEO4J_PORT to a free port, or NEO4J_URI to use that server")
        if running is not None:
            self._refuse_unauthenticated(*running)
        if state == "refused":
            raise self._password_refused()
        if state == "ok":
            self.require_online()
            return
        if running is not None:
            self._wait_until_up(auth)
            return
        self._refuse_during_import()
        self.fetch()
        self._make_files_private()
        self._spawn(heap or java_heap("FLOWDB_NEO4J_HEAP", DEFAULT_HEAP), page_cache_mb or page_cache_mb_setting())
        self._wait_until_up(auth, spawned=True)

    def _wait_until_up(self, auth: tuple[str, str], spawned: bool = False) -> None:
        """Wait for Bolt and the default database. spawned: this call started the JVM, so
        one that never answers is stopped rather than left behind holding the store (one
        that answers with its database offline stays, for `status` and the logs to tell)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        problem = ""
        while time.monotonic() < deadline:
            state = bolt_probe(self.uri, auth)
            if state == "ok":
                status, problem = database_state(self.uri, auth)
                if status == "online":
                    return
                if status in DATABASE_FAILED:  # anything else ("starting", "initial", ...) may still come online
                    raise self._database_down(problem)
            if state == "refused":
                raise self._password_refused()
            if self.pid() is None:
                raise Neo4jUnavailable(
                    f"the managed Neo4j exited during start: {self._last_log_line()} ({self.logs})")
            time.sleep(START_POLL_S)
        if problem:  # Bolt answered, the database never came online: the server stays for status to tell
            raise self._database_down(problem)
        if spawned:
            self.stop()
        raise Neo4jUnavailable(
            f"the managed Neo4j did not answer on {self.uri} within {START_TIMEOUT_S}s ({self.logs})")

    def _spawn(self, heap: str, page_cache_mb: int) -> None:
        private_dir(self.log_file.parent)
        private_dir(self.import_dir)
        source = _resource("FlowdbNeo4j.java").read_bytes()
        launcher = launcher_args(self.lib, source, self._fetched_marker)
        if launcher is None:  # no javac: the source program, compiled by each start
            program = private_dir(self.root / "maven") / "FlowdbNeo4j.java"
            _write_private(program, source)
            launcher = ["-cp", str(self.lib / "*"), str(program)]
        extra = os.environ.get("FLOWDB_NEO4J_JAVA_OPTS", DEFAULT_JAVA_OPTS).split()
        # The password travels as its file's path: a command line is visible to all users.
        cmd = ["java", f"-Xmx{heap}", *extra, *launcher,
               str(self.dbms_dir), str(self.port), str(page_cache_mb * 1024 * 1024),
               str(self.password_file), str(self.import_dir)]
        fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "ab") as log:
            # A new session, so the server outlives the command that started it;
            # umask 077, so every store, log and lock file it writes is the owner's only.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077)
        _write_private(self.pid_file, str(proc.pid).encode())

    def stop(self) -> bool:
        """Stop the server; returns False when none was running. A pid file that names
        any other process is removed, and that process is never signalled."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        _signal(pid, signal.SIGTERM)  # the launcher's shutdown hook closes the DBMS cleanly
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and self.pid() == pid:
            _reap(pid)
            time.sleep(0.2)
        if self.pid() == pid:
            _signal(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    @contextmanager
    def importing(self) -> Iterator[None]:
        """Hold the store for a bulk import: while held, start() in any other process
        refuses (neo4j-admin needs the store to itself, and the store may be moved aside).
        Re-entrant within one process."""
        self._make_dirs_private()
        if self._import_holder() == os.getpid():
            yield  # this process holds it already
            return
        # Written whole beside it and linked in: no one ever reads a marker without its pid.
        partial = self.import_marker.with_name(f".{self.import_marker.name}.{os.getpid()}")
        _write_private(partial, f"{os.getpid()}\n".encode())
        try:
            while True:
                try:
                    os.link(partial, self.import_marker)
                    break
                except FileExistsError:
                    self._refuse_during_import()
                    self.import_marker.unlink(missing_ok=True)  # its process is gone
        finally:
            partial.unlink(missing_ok=True)
        try:
            yield
        finally:
            self.import_marker.unlink(missing_ok=True)

    def _import_holder(self) -> int | None:
        try:
            return int(self.import_marker.read_text().strip())
        except (OSError, ValueError):
            return None

    def _refuse_during_import(self) -> None:
        """Refuse when another live process holds the store for a bulk import."""
        pid = self._import_holder()
        if pid is not None and pid > 0 and pid != os.getpid() and _command_line(pid) is not None:
            raise Neo4jUnavailable(
                f"a bulk import into the managed Neo4j under {self.root} is under way (pid {pid}); "
                "wait for it to finish, then run again")

    def admin(self, args: list[str], log: Path, cwd: Path | None = None, heap: str | None = None) -> int:
        """Run neo4j-admin (from the fetched jars) on this server's DBMS home, its output
        into `log` (0600); returns its exit status. Commands that write a store need the
        server stopped."""
        self.fetch()
        conf = private_dir(self.root / "admin-conf")
        _write_private(conf / "neo4j.conf", "".join(
            f"{name}={value}\n" for name, value in (
                ("server.directories.data", self.data_dir), ("server.directories.logs", self.dbms_dir / "logs"),
                ("server.directories.import", self.import_dir))).encode())
        private_dir(self.dbms_dir)
        extra = os.environ.get("FLOWDB_NEO4J_JAVA_OPTS", DEFAULT_JAVA_OPTS).split()
        heap = heap or java_heap("FLOWDB_NEO4J_ADMIN_HEAP", DEFAULT_ADMIN_HEAP)
        cmd = ["java", f"-Xmx{heap}", *extra, "-cp", str(self.lib / "*"), ADMIN_TOOL, *args]
        env = {**os.environ, "NEO4J_HOME": str(self.dbms_dir), "NEO4J_CONF": str(conf)}
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        make_private(log)
        with open(fd, "wb") as out:
            # umask 077: every store file it writes is the owner's only, as the server's are.
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  cwd=cwd or self.root, env=env, umask=0o077)
        return proc.returncode

    def _running(self) -> tuple[int, str] | None:
        """The pid file's process and its command line, when it is our launcher."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        command = _command_line(pid) if pid > 0 else None
        if command is None or LAUNCHER not in command:
            return None
        if f" {self.dbms_dir} " not in f" {command} ":  # a launcher, but for another home
            return None
        return pid, command

    def _refuse_unauthenticated(self, pid: int, command: str) -> None:
        # Launchers from before authentication took no password file, and ran without one.
        if str(self.password_file) not in command:
            raise Neo4jUnavailable(
                f"the managed Neo4j (pid {pid}) was started by an older flowdb, with "
                "authentication off; run 'flowdb neo4j stop' and 'flowdb neo4j start'")

    def _password_refused(self) -> Neo4jUnavailable:
        return Neo4jUnavailable(
            f"the managed Neo4j on {self.uri} refuses the password in {self.password_file} "
            "(was the file changed while it ran?); run 'flowdb neo4j stop' and "
            "'flowdb neo4j start' to set it again")

    def _make_dirs_private(self) -> None:
        if self.home is not None:
            private_dir(self.home)
        private_dir(self.root)

    def _make_files_private(self) -> None:
        """Older flowdb versions wrote world-readable files here: take that away."""
        for directory, subdirs, files in os.walk(self.root):  # symlinks are not followed
            for name in subdirs + files:
                make_private(Path(directory, name))

    def _last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log_file.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"


def bolt_probe(uri: str, auth: tuple[str, str] | None, timeout_s: float = 3.0) -> str:
    """'ok' when a Neo4j answers and accepts `auth`, 'refused' when one answers but
    refuses them, 'down' when none answers."""
    from neo4j import GraphDatabase
    from neo4j.exceptions import AuthError, DriverError, Neo4jError

    try:
        with GraphDatabase.driver(uri, auth=auth, connection_timeout=timeout_s) as driver:
            driver.verify_connectivity()
        return "ok"
    except AuthError:
        return "refused"
    except Neo4jError as exc:
        return "refused" if (exc.code or "").startswith("Neo.ClientError.Security") else "down"
    except (DriverError, OSError, ValueError):
        return "down"


def bolt_answers(uri: str, auth: tuple[str, str] | None, timeout_s: float = 3.0) -> bool:
    return bolt_probe(uri, auth, timeout_s) == "ok"


def database_state(uri: str, auth: tuple[str, str] | None, timeout_s: float = 10.0) -> tuple[str, str]:
    """The server's default database: ("online", "") when it takes a read, else its
    status ("starting", "offline", ...; "unavailable" when the system database calls it
    online but it refuses every query, as after a critical error) and what is wrong."""
    from neo4j import GraphDatabase
    from neo4j.exceptions import DriverError, Neo4jError

    with GraphDatabase.driver(uri, auth=auth, connection_timeout=timeout_s) as driver:
        try:
            with driver.session(default_access_mode="READ") as session:
                session.run("RETURN 1").consume()  # a transaction in the default database
            return "online", ""
        except (DriverError, Neo4jError, OSError) as exc:
            failure = first_line(exc)
        try:
            with driver.session(database="system") as session:
                row = session.run("SHOW DEFAULT DATABASE YIELD name, currentStatus, statusMessage").single()
        except (DriverError, Neo4jError, OSError):
            row = None
    if row is None:
        return "unavailable", f"its default database refuses queries ({failure})"
    status = row["currentStatus"] if row["currentStatus"] != "online" else "unavailable"
    said = ((row["statusMessage"] or "").strip().splitlines() or [failure])[0]
    return status, f"its default database {row['name']!r} is {status} ({said})"


def _command_line(pid: int) -> str | None:
    """A live process's arguments, joined by spaces; None for no such process (or a zombie)."""
    if Path("/proc/self/cmdline").exists():
        return _proc_command_line(pid)
    try:  # no /proc (macOS): ask ps
        proc = subprocess.run(["ps", "-o", "command=", "-p", str(pid)],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def _proc_command_line(pid: int) -> str | None:
    proc = Path(f"/proc/{pid}")
    for _ in range(50):
        try:
            raw = (proc / "cmdline").read_bytes()
            if raw:
                return " ".join(arg.decode(errors="replace") for arg in raw.split(b"\0") if arg)
            # Empty: a zombie (gone for good), or a process in the middle of exec,
            # as the launcher is just after Popen returns (then it soon reads fine).
            if (proc / "stat").read_text().rpartition(")")[2].split()[0] in "ZX":
                return None
        except (OSError, IndexError):
            return None
        time.sleep(0.01)
    return None


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def _write_new_password(path: Path) -> None:
    """Write a fresh password atomically: a concurrent flowdb sees no file or all of it,
    and the first writer's password wins."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
        os.link(partial, path)
    except FileExistsError:
        pass
    except OSError as exc:
        raise Neo4jUnavailable(f"cannot write the managed Neo4j's password to {path} "
                               f"({exc.strerror})") from None
    finally:
        partial.unlink(missing_ok=True)


def _write_private(path: Path, data: bytes) -> None:
    with write_errors(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as out:
            out.write(data)
    make_private(path)  # O_CREAT's mode does not apply to a file that already existed


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _resource(name: str):
    return resources.files("flowdb.resources.neo4j").joinpath(name)
