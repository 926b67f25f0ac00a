"""Expensive deterministic test artefacts, built once and kept on disk between runs.

An artefact is a folder under .flowdb-test/cache/ (ignored by git, so a fresh clone starts
empty) named by a digest of everything that decides its content: the inputs given, the
source of the code that builds it, and the versions of the libraries that code uses. A
folder is used only when the digest of its files still equals the one written when it was
built; anything else (a partial build, a changed file, other inputs or code) is rebuilt,
never trusted. Builds of one artefact by two processes at once (pytest-xdist workers)
wait on a file lock, so it is built once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from helpers import ROOT

CACHE = ROOT / ".flowdb-test" / "cache"
SEAL = ".sealed"  # the digest of the folder's files, written last


def inputs_digest(inputs: dict, code: Iterable[Path], packages: Iterable[str]) -> str:
    """A digest of the inputs, the code's source and the packages' versions."""
    h = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode())
    for path in sorted(Path(p) for p in code):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    for package in sorted(packages):
        try:
            h.update(f"{package}={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{package}=absent".encode())
    return h.hexdigest()[:20]


def tree_digest(folder: Path) -> str:
    """A digest of every file under folder (paths and bytes), the seal itself left out."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SEAL):
        h.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def cached(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """The artefact `name` for `key`: the sealed folder when its files are intact, else
    build(folder) into a fresh folder, sealed and renamed into place."""
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / f"{name}-{key}"
    with (CACHE / f".{name}.lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        seal = target / SEAL
        if seal.is_file() and seal.read_text() == tree_digest(target):
            return target
        shutil.rmtree(target, ignore_errors=True)
        for stale in CACHE.glob(f"{name}-*"):  # other keys of the same artefact: outdated
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE))
        try:
            build(work)
            (work / SEAL).write_text(tree_digest(work))
            work.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target
