"""Steering runs for the explorer: off the request, one at a time, cancellable, with progress.

A run loads the pack's model once (kept for the next run of that pack), picks the
steering set from the flow graph, then generates unsteered and steered text with the
same seed. Progress counts generated tokens; cancelling stops generation at the next
token. Whether a pack can be steered at all is known before a run starts (status(pack),
start()). The model loads in a thread of its own: cancelling a run while it loads ends
the run "cancelled" at once and frees the runner; the load goes on, and the next run of
that pack waits for it instead of loading the model a second time.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field

from flowdb.errors import FlowdbError
from flowdb.lm.loader import MODEL_EXTRA, extra_missing


def model_extra_missing() -> str | None:
    """One sentence saying what to install, or None when the model extra is there."""
    missing = extra_missing()
    return f"Steering needs {MODEL_EXTRA}; missing: {', '.join(missing)}." if missing else None


class Cancelled(Exception):
    pass


@dataclass
class Job:
    id: int
    feature: str
    state: str = "queued"  # queued | loading | running | done | failed | cancelled
    stage: str = ""
    tokens_done: int = 0
    tokens_total: int = 0
    started: float = field(default_factory=time.time)
    default: str | None = None
    steered: str | None = None
    features: list[dict] = field(default_factory=list)
    error: str | None = None

    def public(self) -> dict:
        return asdict(self)


class SteeringRunner:
    """At most one model run at a time; the latest job's state is what status() reports."""

    def __init__(self, connect):
        self._connect = connect  # () -> Database
        self._lock = threading.Lock()  # the job slot, every change of a job's state, the loads
        self._job: Job | None = None
        self._cancel = threading.Event()  # the current job's: set by cancel()
        self._wake = threading.Event()  # the current job's: set by cancel() and by its load ending
        self._loads: dict[str, Future] = {}  # pack -> its Steerer, loading or loaded (one pack at a time)
        self._next_id = 1

    def unavailable(self, pack: str | None = None) -> str | None:
        """Why steering (PACK's, when named) cannot run here, in one line; None when it can."""
        missing = model_extra_missing()
        if missing or pack is None:
            return missing
        from flowdb.analysis.steering import steering_unavailable

        return steering_unavailable(self._connect(), pack)

    def status(self, pack: str | None = None) -> dict:
        message = self.unavailable(pack)
        job = self._job.public() if self._job else None
        return {"available": message is None, "message": message, "job": job}

    def start(self, spec, generation) -> dict:
        problem = self.unavailable(spec.seed_feature.split("/", 1)[0])
        if problem:
            raise FlowdbError(problem)
        with self._lock:
            if self._job and self._job.state in ("queued", "loading", "running"):
                raise Busy("a model run is already in progress; wait for it or cancel it")
            self._cancel, self._wake = threading.Event(), threading.Event()  # the old job keeps its own
            self._job = Job(self._next_id, spec.seed_feature, tokens_total=2 * generation.max_new_tokens)
            self._next_id += 1
            job = self._job
        threading.Thread(target=self._run, args=(job, spec, generation, self._cancel, self._wake), daemon=True,
                         name=f"flowdb-steer-{job.id}").start()
        return job.public()

    def cancel(self) -> dict:
        with self._lock:
            self._cancel.set()
            self._wake.set()
            if self._job and self._job.state in ("queued", "loading"):  # nothing of it to stop but the wait
                self._job.state = self._job.stage = "cancelled"
        return self.status()

    def _run(self, job: Job, spec, generation, cancel: threading.Event, wake: threading.Event) -> None:
        def check() -> None:
            if cancel.is_set():
                raise Cancelled()

        try:
            pack = spec.seed_feature.split("/", 1)[0]
            self._move(job, cancel, "loading", f"loading the model of pack {pack}")
            load = self._load(pack)
            load.add_done_callback(lambda _: wake.set())
            wake.wait()  # the load ended, or the run was cancelled
            check()
            steerer = load.result()
            self._move(job, cancel, "running", "choosing features from the flow graph")
            ids = steerer.tokenizer(generation.prompt, return_tensors="pt").input_ids
            chosen = steerer.features(spec)
            job.features = [{"key": k, "layer": int(layer)} for k, layer in zip(chosen["key"], chosen["layer"])]
            edits = steerer.edits(spec, ids, chosen)
            job.stage = "generating without steering"
            job.default = steerer.generate_many(generation, None, 1, on_token=self._tick(job, cancel))[0]
            check()
            job.stage = "generating with steering"
            job.steered = steerer.generate_many(generation, edits, 1, on_token=self._tick(job, cancel))[0]
            check()
            self._move(job, cancel, "done", "done")
        except Cancelled:
            self._end(job, "cancelled", None)
        except FlowdbError as exc:
            self._end(job, "failed", _one_line(exc))
        except Exception as exc:  # a model run must never take the server down
            self._end(job, "failed", f"{type(exc).__name__}: {_one_line(exc)}")

    def _move(self, job: Job, cancel: threading.Event, state: str, stage: str) -> None:
        """A job's next state, unless it was cancelled (cancel() may have ended it already)."""
        with self._lock:
            if cancel.is_set():
                raise Cancelled()
            job.state, job.stage = state, stage

    def _end(self, job: Job, state: str, error: str | None) -> None:
        with self._lock:
            if job.state == "cancelled":
                return  # cancelled while it loaded: what the load did since is no news
            if state == "cancelled":
                job.state = job.stage = "cancelled"
            else:
                job.state, job.error = state, error

    def _load(self, pack: str) -> Future:
        """The pack's Steerer: loaded already, loading (a cancelled run's load is waited for, not
        repeated), or loaded now in a thread of its own. One pack's model in memory at a time."""
        from flowdb.analysis.steering import Steerer

        with self._lock:
            load = self._loads.get(pack)
            if load is not None and not (load.done() and load.exception() is not None):
                return load
            load = Future()
            self._loads = {pack: load}

        def run() -> None:
            try:
                load.set_result(Steerer(self._connect(), pack))
            except BaseException as exc:  # handed to the run that waits for it
                load.set_exception(exc)

        threading.Thread(target=run, daemon=True, name=f"flowdb-load-{pack}").start()
        return load

    def _tick(self, job: Job, cancel: threading.Event):
        def on_token() -> bool:
            """Called at every generated token; True stops generation."""
            job.tokens_done += 1
            return cancel.is_set()
        return on_token


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Busy(FlowdbError):
    """Another model run holds the one slot."""
