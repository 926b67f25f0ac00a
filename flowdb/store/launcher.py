"""How the managed Neo4j's JVM runs its launcher (FlowdbNeo4j.java).

Run as a source program, the launcher is compiled again by every start (about a second),
and the JVM loads and verifies some 10,000 Neo4j classes (seconds). So, once per set of
jars and per JDK, the launcher is compiled into a jar and a short training run on a
throw-away store archives the classes a start loads (the JDK's class data sharing);
every later start maps them. Both sit beside the jars, under lib/.flowdb-launcher/KEY/,
where every server sharing those jars finds them. The key covers the launcher's source,
the fetched jars and the `java` binary, so anything that changed gets its own.

Anything missing (no javac, a failed training run) falls back to the source program or
to no archive: slower, never wrong. The JVM checks an archive itself and runs without
one that does not match.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from flowdb.settings import private_dir

MAIN = "FlowdbNeo4j"
TRAIN_HEAP = "512m"
TRAIN_TIMEOUT_S = 300  # a run that hangs is killed, and starts go on without an archive
# A JVM that finds no usable archive warns and runs on: keep that out of the server log.
QUIET_SHARING = "-Xlog:cds=off,cds+dynamic=off"


def launcher_args(lib: Path, source: bytes, marker: Path) -> list[str] | None:
    """The JVM arguments, after heap and options, that run the launcher with the jars in
    `lib`: archive, class path and main class; None where it must run as a source
    program. `marker` is the file the fetch of those jars left (a new fetch, a new time)."""
    lib = lib.resolve()  # one class path for every home sharing these jars: the archive needs it
    folder = lib / ".flowdb-launcher" / _key(source, marker)
    jar, archive = folder / "launcher.jar", folder / "classes.jsa"
    if not jar.exists() and not _build_jar(source, lib, jar):
        return None
    class_path = f"{lib / '*'}:{jar}"
    if not archive.exists():
        print("Archiving the classes a Neo4j start loads (once for these jars, about half a minute)",
              file=sys.stderr)
        _train(class_path, archive)
    sharing = [f"-XX:SharedArchiveFile={archive}", QUIET_SHARING] if archive.exists() else []
    return [*sharing, "-cp", class_path, MAIN]


def _key(source: bytes, marker: Path) -> str:
    java = Path(shutil.which("java") or "java").resolve()
    parts = [source, str(java).encode()]
    for path in (java, marker):
        try:
            stat = path.stat()
            parts.append(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        except OSError:
            parts.append(b"-")
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _build_jar(source: bytes, lib: Path, jar: Path) -> bool:
    """Compile the launcher into `jar`; False where it cannot be (no javac)."""
    javac = shutil.which("javac")
    if javac is None:
        return False
    private_dir(private_dir(jar.parent.parent) / jar.parent.name)
    with tempfile.TemporaryDirectory(dir=jar.parent, prefix=".build-") as work:
        work = Path(work)
        (work / f"{MAIN}.java").write_bytes(source)
        compiled = subprocess.run([javac, "-nowarn", "-cp", str(lib / "*"), "-d", str(work / "classes"),
                                   str(work / f"{MAIN}.java")], capture_output=True)
        if compiled.returncode != 0:
            return False
        # A jar, not a folder: the JVM archives no classes from a class-path folder.
        with zipfile.ZipFile(work / "launcher.jar", "w") as out:
            for path in sorted((work / "classes").rglob("*.class")):
                out.write(path, path.relative_to(work / "classes").as_posix())
        os.chmod(work / "launcher.jar", 0o600)
        os.replace(work / "launcher.jar", jar)  # whole or absent, whoever builds it at once
    return True


def _train(class_path: str, archive: Path) -> None:
    """Archive the classes a start loads; nothing where the training run fails."""
    with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".train-") as work, \
            contextlib.suppress(subprocess.TimeoutExpired):
        partial = Path(work) / "classes.jsa"
        trained = subprocess.run(
            ["java", f"-Xmx{TRAIN_HEAP}", f"-XX:ArchiveClassesAtExit={partial}", QUIET_SHARING,
             "-cp", class_path, MAIN, "--train", str(Path(work) / "store")],
            capture_output=True, stdin=subprocess.DEVNULL, umask=0o077, timeout=TRAIN_TIMEOUT_S)
        if trained.returncode == 0 and partial.exists():
            os.replace(partial, archive)
