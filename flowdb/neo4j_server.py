"""flowdb's managed local Neo4j 5.26: fetched through Maven Central, run embedded.

Layout under FLOWDB_HOME/neo4j: lib/ (jars), dbms/ (databases and transaction
logs), logs/server.log, server.pid. No Docker and no download site are needed:
only Java 17+ and Maven, which resolve org.neo4j:neo4j and org.neo4j:neo4j-bolt.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from flowdb.errors import Neo4jUnavailable
from flowdb.settings import flowdb_home, managed_port

NEO4J_VERSION = "5.26.30"
START_TIMEOUT_S = 180
# Bulk ingest is throughput work: the parallel collector and a 4 GB heap wrote
# about 35% more relationships/s than G1 with 2 GB (benchmarks/bench_ingest.py).
DEFAULT_HEAP = "4g"
DEFAULT_JAVA_OPTS = "-XX:+UseParallelGC"
STOP_TIMEOUT_S = 60


@dataclass(frozen=True)
class ManagedServer:
    root: Path
    port: int

    @classmethod
    def default(cls) -> "ManagedServer":
        return cls(flowdb_home() / "neo4j", managed_port())

    @property
    def uri(self) -> str:
        return f"bolt://127.0.0.1:{self.port}"

    @property
    def lib(self) -> Path:
        return self.root / "lib"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "server.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "server.pid"

    def fetched(self) -> bool:
        return (self.lib / f".complete-{NEO4J_VERSION}").exists()

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
        work = self.root / "maven"
        work.mkdir(parents=True, exist_ok=True)
        for name in ("pom.xml", "FlowdbNeo4j.java"):
            (work / name).write_bytes(_resource(name).read_bytes())
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
        (self.lib / f".complete-{NEO4J_VERSION}").touch()

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def answers(self) -> bool:
        return bolt_answers(self.uri, None)

    def start(self, heap: str | None = None, page_cache_mb: int | None = None) -> None:
        """Start the server unless it already answers; wait until Bolt answers."""
        if self.answers():
            if self.pid() is None:  # someone else's server: never write into a stranger's database
                raise Neo4jUnavailable(
                    f"another Neo4j already answers on {self.uri}, not the one under {self.root}; "
                    "set FLOWDB_NEO4J_PORT to a free port, or NEO4J_URI to use that server")
            return
        if self.pid() is None:
            self.fetch()
            self._spawn(heap or os.environ.get("FLOWDB_NEO4J_HEAP", DEFAULT_HEAP),
                        page_cache_mb or int(os.environ.get("FLOWDB_NEO4J_PAGECACHE_MB", "1024")))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.answers():
                return
            if self.pid() is None:
                raise Neo4jUnavailable(
                    f"the managed Neo4j exited during start: {self._last_log_line()} "
                    f"(log: {self.log_file})")
            time.sleep(0.5)
        raise Neo4jUnavailable(
            f"the managed Neo4j did not answer on {self.uri} within {START_TIMEOUT_S}s "
            f"(log: {self.log_file})")

    def _spawn(self, heap: str, page_cache_mb: int) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        launcher = self.root / "maven" / "FlowdbNeo4j.java"
        launcher.parent.mkdir(parents=True, exist_ok=True)
        launcher.write_bytes(_resource("FlowdbNeo4j.java").read_bytes())
        extra = os.environ.get("FLOWDB_NEO4J_JAVA_OPTS", DEFAULT_JAVA_OPTS).split()
        cmd = ["java", f"-Xmx{heap}", *extra, "-cp", str(self.lib / "*"), str(launcher),
               str(self.root / "dbms"), str(self.port), str(page_cache_mb * 1024 * 1024)]
        with open(self.log_file, "ab") as log:
            # A new session, so the server outlives the command that started it.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_file.write_text(str(proc.pid))

    def stop(self) -> bool:
        """Stop the server; returns False when none was running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)  # the launcher's shutdown hook closes the DBMS cleanly
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and self.pid() is not None:
            _reap(pid)
            time.sleep(0.2)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def _last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log_file.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"


def bolt_answers(uri: str, auth: tuple[str, str] | None, timeout_s: float = 3.0) -> bool:
    from neo4j import GraphDatabase
    from neo4j.exceptions import Neo4jError, DriverError

    try:
        with GraphDatabase.driver(uri, auth=auth, connection_timeout=timeout_s) as driver:
            driver.verify_connectivity()
        return True
    except (Neo4jError, DriverError, OSError, ValueError):
        return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _resource(name: str):
    return resources.files("flowdb.resources.neo4j").joinpath(name)
