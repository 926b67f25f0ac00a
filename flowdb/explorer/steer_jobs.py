"""Steering runs for the explorer: off the request, one at a time, cancellable, with progress.

A run loads the pack's model once (kept for the next run of that pack), picks the
steering set from the flow graph, then generates unsteered and steered text with the
same seed. Progress counts generated tokens; cancelling stops generation at the next
token.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from dataclasses import asdict, dataclass, field

from flowdb.errors import FlowdbError

MODEL_EXTRA = "the model extra: pip install 'flowdb[model]' (bash scripts/setup.sh full)"


def model_extra_missing() -> str | None:
    """One sentence saying what to install, or None when the model extra is there."""
    missing = [name for name in ("torch", "transformers", "sae_lens") if importlib.util.find_spec(name) is None]
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
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._cancel = threading.Event()
        self._steerers: dict[str, object] = {}
        self._next_id = 1

    def status(self) -> dict:
        missing = model_extra_missing()
        job = self._job.public() if self._job else None
        return {"available": missing is None, "message": missing, "job": job}

    def start(self, spec, generation) -> dict:
        missing = model_extra_missing()
        if missing:
            raise FlowdbError(missing)
        with self._lock:
            if self._job and self._job.state in ("queued", "loading", "running"):
                raise Busy("a model run is already in progress; wait for it or cancel it")
            self._cancel.clear()
            self._job = Job(self._next_id, spec.seed_feature, tokens_total=2 * generation.max_new_tokens)
            self._next_id += 1
            job = self._job
        threading.Thread(target=self._run, args=(job, spec, generation), daemon=True,
                         name=f"flowdb-steer-{job.id}").start()
        return job.public()

    def cancel(self) -> dict:
        self._cancel.set()
        return self.status()

    def _run(self, job: Job, spec, generation) -> None:
        from flowdb.analysis.steering import Steerer

        try:
            pack = spec.seed_feature.split("/", 1)[0]
            job.state, job.stage = "loading", f"loading the model of pack {pack}"
            steerer = self._steerers.get(pack)
            if steerer is None:
                self._steerers.clear()  # one model in memory at a time
                steerer = self._steerers[pack] = Steerer(self._connect(), pack)
            self._check()
            job.state, job.stage = "running", "choosing features from the flow graph"
            ids = steerer.tokenizer(generation.prompt, return_tensors="pt").input_ids
            chosen = steerer.features(spec)
            job.features = [{"key": k, "layer": int(layer)} for k, layer in zip(chosen["key"], chosen["layer"])]
            edits = steerer.edits(spec, ids, chosen)
            job.stage = "generating without steering"
            job.default = steerer.generate_many(generation, None, 1, on_token=self._tick(job))[0]
            self._check()
            job.stage = "generating with steering"
            job.steered = steerer.generate_many(generation, edits, 1, on_token=self._tick(job))[0]
            self._check()
            job.state, job.stage = "done", "done"
        except Cancelled:
            job.state, job.stage = "cancelled", "cancelled"
        except FlowdbError as exc:
            job.state, job.error = "failed", _one_line(exc)
        except Exception as exc:  # a model run must never take the server down
            job.state, job.error = "failed", f"{type(exc).__name__}: {_one_line(exc)}"

    def _check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled()

    def _tick(self, job: Job):
        def on_token() -> bool:
            """Called at every generated token; True stops generation."""
            job.tokens_done += 1
            return self._cancel.is_set()
        return on_token


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Busy(FlowdbError):
    """Another model run holds the one slot."""
