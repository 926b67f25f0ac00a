"""One writer per pack or link set, across processes and hosts: a lease held in Neo4j."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from flowdb.errors import BusyError
from flowdb.store import graph
from flowdb.store.database import Database

LOCK_LEASE_S = 60.0  # a dead holder's lock is free after this long (at once on this host)


class Lease:
    """A held pack lock; check() refuses to go on once another command has taken it."""

    def __init__(self, pack: str, kind: str = "pack"):
        self.pack, self.kind = pack, kind
        self.lost = threading.Event()

    def check(self) -> None:
        if self.lost.is_set():
            raise BusyError(f"lost the lock on {self.kind} {self.pack!r} (its lease ran out while this command "
                            "could not reach Neo4j, and another command took it); nothing more was "
                            "written: run again")


@contextmanager
def pack_lock(db: Database, pack: str, kind: str = "pack") -> Iterator[Lease]:
    """One writer per pack (or, kind "link", per link set), across processes and hosts: a
    lease in Neo4j, renewed while held. A holder that died on this host is recognised at
    once; elsewhere its lease ends."""
    name, owner = f"{kind}:{pack}", f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    holder = graph.acquire_lock(db, name, owner, LOCK_LEASE_S)
    if holder is not None and _dead_here(holder):
        holder = graph.acquire_lock(db, name, owner, LOCK_LEASE_S, stale_owner=holder)
    if holder is not None:
        host, pid, _ = (holder.split(":") + ["?", "?"])[:3]
        raise BusyError(f"{kind} {pack!r} is being written by another flowdb command "
                        f"(pid {pid} on {host}); wait for it to finish, then run again")
    lease, stop = Lease(pack, kind), threading.Event()
    renewer = threading.Thread(target=_renew, args=(db, name, owner, stop, lease), daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        if not lease.lost.is_set():
            graph.release_lock(db, name, owner)


def _renew(db: Database, name: str, owner: str, stop: threading.Event, lease: Lease) -> None:
    """Renew every quarter lease; a failed renewal is retried, a lease taken by another
    command marks this one lost."""
    while not stop.wait(LOCK_LEASE_S / 4):
        try:
            if not graph.renew_lock(db, name, owner, LOCK_LEASE_S):
                lease.lost.set()
                return
        except Exception:  # a blip: the next tick tries again, well inside the lease
            continue


def _dead_here(holder: str) -> bool:
    host, _, pid = holder.partition(":")
    pid = pid.split(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
