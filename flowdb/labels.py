"""Neuronpedia labels: explanations joined onto features by (modelId, source, index).

A pack's SAE nodes record their Neuronpedia source (e.g. "12-gemmascope-res-16k")
and its Pack node the model id, so an explanation row maps to PACK/LAYER/MODULE/INDEX.
Every explanation is kept as an (:Explanation)-[:EXPLAINS]->(:Feature); each
labelled feature also gets `label`, its best explanation: the highest-scoring one
where the API gave scores, else the first by explanation id (bulk exports carry no
scores). Rows that match no stored feature are counted by reason, not dropped silently.

An import is all-or-nothing per file: every row of a file is checked before any is
written, and the file's explanations and its features' labels go in one transaction.
A fetch records every feature it asked about (with the problem, when the answer was
unusable), so a stopped or failing run resumes with the features not yet asked.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from flowdb import graph
from flowdb.database import Database
from flowdb.errors import FlowdbError

NEURONPEDIA_API = "https://www.neuronpedia.org/api"
REQUIRED_FIELDS = ("modelId", "layer", "index", "description")
KEPT_FIELDS = ("typeName", "explanationModelName", "authorId")
WRITE_BATCH = 5000  # rows per statement; a file's statements share one transaction
EXPORT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
DIGITS = re.compile(r"[0-9]+")

RETRY_STATUSES = (429, 500, 502, 503, 504)
RETRY_AFTER_MAX_S = 60.0  # a server asking for longer is treated as asking for this
CONNECT_TIMEOUT_S = 10.0
CHUNK_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 32 * 1024 * 1024  # a feature's page is kilobytes; more is not an answer


@dataclass
class LabelReport:
    rows: int = 0
    explanations: int = 0  # (explanation, feature) pairs stored
    unmatched: Counter = field(default_factory=Counter)  # reason -> rows
    files: int = 0  # export files committed
    fetched: int = 0
    not_found: int = 0
    failed: int = 0  # answers that were unusable; recorded on the feature as np_problem
    labelled: set = field(default_factory=set, repr=False)  # keys whose label was (re)computed

    @property
    def features(self) -> int:
        """Features whose best label was (re)computed."""
        return len(self.labelled)

    def summary(self) -> str:
        text = (f"{self.rows} rows, {self.explanations} explanations stored, "
                f"{self.features} features labelled")
        if self.fetched or self.not_found or self.failed:
            text += (f", {self.fetched} fetched, {self.not_found} unknown to Neuronpedia, "
                     f"{self.failed} failed")
        if self.failed:
            text += " (each recorded on its feature as np_problem)"
        if self.unmatched:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.unmatched.items()))
            text += f"; {sum(self.unmatched.values())} rows matched no feature ({reasons})"
        return text


# --- checking rows -------------------------------------------------------------------------

class _RowProblem(ValueError):
    """What is wrong with one row, worded to follow "row N"."""


def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _index(value) -> int:
    # bool is an int in Python and int("3.7") would be refused but int(3.7) not: be exact.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and DIGITS.fullmatch(value):
        return int(value)
    raise _RowProblem(f"has index {_shown(value)}; it must be a non-negative integer")


def _text(row: dict, name: str, required: bool) -> str | None:
    value = row.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise _RowProblem(f"has {name} {_shown(value)}; it must be a string")
    return value


def _checked(row) -> dict:
    """A row as it will be stored, or _RowProblem naming the field that is wrong."""
    if not isinstance(row, dict):
        raise _RowProblem(f"is {_shown(row)}, not an object")
    missing = [name for name in REQUIRED_FIELDS if row.get(name) is None or row.get(name) == ""]
    if missing:
        raise _RowProblem(f"lacks {', '.join(missing)}")
    if row.get("scores") is not None and not isinstance(row["scores"], list):
        raise _RowProblem(f"has scores {_shown(row['scores'])}; it must be a list")
    checked = {"modelId": _text(row, "modelId", True), "source": _text(row, "layer", True),
               "index": _index(row["index"]), "description": _text(row, "description", True),
               **{name: _text(row, name, False) for name in KEPT_FIELDS}, "score": _score(row)}
    checked["id"] = _text(row, "id", False) or _explanation_id(checked)
    return checked


def _score(row: dict) -> float | None:
    values = [s.get("value") for s in row.get("scores") or [] if isinstance(s, dict)]
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return float(max(values)) if values else None


def _explanation_id(row: dict) -> str:
    basis = f"{row['modelId']}/{row['source']}/{row['index']}/{row['description']}"
    return "flowdb-" + hashlib.sha1(basis.encode()).hexdigest()[:20]


# --- reading exports -----------------------------------------------------------------------

def export_files(path: str | Path) -> list[Path]:
    """A directory of explanations/batch-N.jsonl.gz, or one .jsonl, .jsonl.gz or .json file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.name.endswith(EXPORT_SUFFIXES)
                       and (p.parent.name == "explanations" or path.name == "explanations"))
        if not files:
            raise FlowdbError(f"{path}: no explanations/*.jsonl(.gz) files under this directory")
        return files
    if path.exists():
        return [path]
    raise FlowdbError(f"{path}: no such file or directory")


def read_file(file: Path) -> list[dict]:
    """Every row of one export file, checked; FlowdbError names the first bad row and field."""
    try:
        return [_checked_at(file, number, row) for number, row in _raw_rows(file)]
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise FlowdbError(f"{file}: unreadable export ({exc})") from None


def _raw_rows(file: Path) -> Iterable[tuple[int, object]]:
    if file.name.endswith(".json"):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FlowdbError(f"{file}: not JSON ({exc})") from None
        rows = data.get("explanations") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise FlowdbError(f"{file}: neither a list of explanations nor an object with one")
        yield from enumerate(rows, start=1)
        return
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FlowdbError(f"{file}: row {number} is not JSON ({exc})") from None


def _checked_at(file: Path, number: int, row) -> dict:
    try:
        return _checked(row)
    except _RowProblem as exc:
        raise FlowdbError(f"{file}: row {number} {exc}") from None


# --- storing -------------------------------------------------------------------------------

def _sources(db: Database, pack: str | None) -> dict[tuple[str, str], list[dict]]:
    joined: dict[tuple[str, str], list[dict]] = {}
    for row in graph.label_sources(db, pack):
        joined.setdefault((row["model"], row["source"]), []).append(row)
    return joined


def _joined(rows: list[dict], sources: dict, report: LabelReport) -> list[dict]:
    """One stored row per (explanation, feature); rows matching no feature are counted."""
    batch = []
    for row in rows:
        report.rows += 1
        targets = sources.get((row["modelId"], row["source"]))
        if not targets:
            report.unmatched["with an unknown model/source"] += 1
            continue
        in_range = [t for t in targets if row["index"] < (t["n"] or 0)]
        if not in_range:
            report.unmatched["with an index beyond the SAE's width"] += 1
            continue
        batch += [{**row, "key": graph.feature_key(t["pack"], t["layer"], t["module"], row["index"])}
                  for t in in_range]
    return batch


def _store(db: Database, rows: list[dict], sources: dict, report: LabelReport) -> None:
    """Write checked rows and their features' best labels in one transaction."""
    batch = _joined(rows, sources, report)
    if not batch:
        return
    keys = sorted({row["key"] for row in batch})
    with db.session() as session:
        report.explanations += session.execute_write(_write_all, batch, keys)
    report.labelled.update(keys)


def _write_all(tx, batch: list[dict], keys: list[str]) -> int:
    # Re-run whole on a transient error: MERGE by explanation id makes that harmless.
    stored = sum(graph.write_explanations(tx, batch[start:start + WRITE_BATCH])
                 for start in range(0, len(batch), WRITE_BATCH))
    for start in range(0, len(keys), WRITE_BATCH):
        graph.set_best_labels(tx, keys[start:start + WRITE_BATCH])
    return stored


def import_labels(db: Database, path: str | Path, pack: str | None = None) -> LabelReport:
    """Import an export file by file, each file in one transaction after checking all its rows.

    A bad row stops the import; earlier files stay committed (importing them again
    stores nothing new: explanations are merged by id)."""
    report = LabelReport()
    sources = _sources(db, pack)
    for file in export_files(path):
        try:
            rows = read_file(file)
        except FlowdbError as exc:
            raise FlowdbError(f"{exc}; nothing of this file was stored ({report.files} earlier "
                              f"file(s) with {report.explanations} explanations are committed)") from None
        _store(db, rows, sources, report)
        report.files += 1
    return report


# --- fetching ------------------------------------------------------------------------------

class _Unusable(Exception):
    """An answer about one feature that cannot be used; recorded on the feature."""


def fetch_labels(db: Database, pack: str, limit: int = 100, module: str | None = None,
                 api_url: str | None = None, api_key: str | None = None,
                 requests_per_second: float = 2.0, progress: bool | None = None,
                 request_deadline_s: float = 30.0, retries: int = 4,
                 backoff_s: float = 1.0) -> LabelReport:
    """Fill missing labels from the Neuronpedia API, one GET per feature.

    429 and 5xx are retried (at most `retries` times, honouring Retry-After, else
    backing off `backoff_s` x 2^n); each attempt must be answered whole within
    `request_deadline_s`. Resumable: each feature asked about is marked (np_fetched),
    with np_problem when its answer was unusable, so a stopped run picks up where it ended.
    """
    from tqdm.auto import tqdm

    graph.require_pack(db, pack)
    api_url = (api_url or os.environ.get("NEURONPEDIA_API_URL") or NEURONPEDIA_API).rstrip("/")
    api_key = api_key or os.environ.get("NEURONPEDIA_API_KEY")
    todo = graph.features_to_fetch(db, pack, module, limit)
    sources = _sources(db, pack)
    report = LabelReport()
    pace = _Pace(requests_per_second)
    with _session(api_key, retries, backoff_s) as session:
        for feature in tqdm(todo, unit="feature", desc=f"neuronpedia {pack}",
                            disable=None if progress is None else not progress):
            pace.wait()
            url = f"{api_url}/feature/{feature['model']}/{feature['source']}/{feature['index']}"
            _fetch_one(db, session, url, feature, sources, report, request_deadline_s)
    return report


def _fetch_one(db: Database, session, url: str, feature: dict, sources: dict,
               report: LabelReport, deadline_s: float) -> None:
    try:
        payload = _get(session, url, deadline_s)
        rows = None if payload is None else _answer_rows(payload, feature)
    except _Unusable as exc:
        report.failed += 1
        graph.mark_fetched(db, feature["key"], problem=f"{url}: {exc}")
        return
    if rows is None:
        report.not_found += 1
    else:
        report.fetched += 1
        _store(db, rows, sources, report)
    graph.mark_fetched(db, feature["key"])


class _Pace:
    """At most `per_second` requests a second."""

    def __init__(self, per_second: float):
        self.interval = 1.0 / per_second
        self.last = float("-inf")

    def wait(self) -> None:
        pause = self.last + self.interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        self.last = time.monotonic()


def _retry_class():
    from urllib3.util.retry import Retry

    class NotedRetry(Retry):
        """Retry that caps Retry-After and notes when the next attempt starts, so the
        deadline bounds each attempt and not the polite waits between them."""

        attempt_started: float | None = None

        def get_retry_after(self, response):
            seconds = super().get_retry_after(response)
            return None if seconds is None else min(seconds, RETRY_AFTER_MAX_S)

        def sleep(self, response=None):
            super().sleep(response)
            self.attempt_started = time.monotonic()

    return NotedRetry


def _session(api_key: str | None, retries: int, backoff_s: float):
    import requests
    from requests.adapters import HTTPAdapter

    retry = _retry_class()(
        total=retries, status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET"}),
        backoff_factor=backoff_s, respect_retry_after_header=True,
        raise_on_status=False)  # the last answer comes back, so its status can be reported
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    if api_key:
        session.headers["x-api-key"] = api_key
    return session


def _get(session, url: str, deadline_s: float):
    """The decoded JSON answer about a feature; None when Neuronpedia does not know it."""
    import requests

    started = time.monotonic()
    try:
        response = session.get(url, stream=True, timeout=(min(CONNECT_TIMEOUT_S, deadline_s), deadline_s))
    except requests.ConnectionError as exc:
        if _unreachable(exc):
            raise FlowdbError(f"cannot reach {url} ({_reason(exc)}); check NEURONPEDIA_API_URL "
                              "and the network, then run again to resume") from None
        raise _Unusable(f"no usable answer ({_reason(exc)})") from None
    except requests.RequestException as exc:
        raise _Unusable(f"no usable answer ({_reason(exc)})") from None
    with response:
        if not _answer_expected(response, url):
            return None
        attempt_started = getattr(response.raw.retries, "attempt_started", None) or started
        body = _read_body(response, attempt_started + deadline_s, deadline_s)
    try:
        return json.loads(body)
    except ValueError:
        raise _Unusable("the answer is not JSON") from None


def _answer_expected(response, url: str) -> bool:
    """True for a 2xx answer; False for 404; the problem for anything else."""
    status = response.status_code
    if status == 404:
        return False
    if status in (401, 403):
        raise FlowdbError(f"{url}: HTTP {status}; set NEURONPEDIA_API_KEY to a valid Neuronpedia API key")
    tries = len(getattr(response.raw.retries, "history", ())) + 1
    if status == 429:
        # Being throttled says nothing about the feature: stop, leaving it unasked.
        raise FlowdbError(f"{url}: still HTTP 429 (rate limited) after {tries} tries; "
                          "run again later, or with a lower --rate, to resume")
    if not 200 <= status < 300:
        raise _Unusable(f"HTTP {status} after {tries} tries" if tries > 1 else f"HTTP {status}")
    return True


def _read_body(response, deadline: float, deadline_s: float) -> bytes:
    """The whole body by `deadline`, however slowly it trickles in."""
    from urllib3.exceptions import HTTPError

    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Unusable(f"the answer took longer than the {deadline_s:g} s deadline")
        _read_timeout(response, left)
        try:
            chunk = response.raw.read1(CHUNK_BYTES, decode_content=True)
        except (HTTPError, OSError) as exc:
            if time.monotonic() >= deadline:
                raise _Unusable(f"the answer took longer than the {deadline_s:g} s deadline") from None
            raise _Unusable(f"the answer broke off ({_reason(exc)})") from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise _Unusable(f"the answer is larger than {MAX_ANSWER_BYTES // 2**20} MiB")
        chunks.append(chunk)


def _read_timeout(response, seconds: float) -> None:
    # A socket read waits at most the time left, so silence ends at the deadline too.
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _answer_rows(payload, feature: dict) -> list[dict]:
    """The checked explanation rows of an API answer about `feature`."""
    if not isinstance(payload, dict):
        raise _Unusable(f"the answer is {_shown(payload)}, not a JSON object")
    explanations = payload.get("explanations", [])
    if not isinstance(explanations, list):
        raise _Unusable(f"its explanations are {_shown(explanations)}, not a list")
    rows = []
    for number, entry in enumerate(explanations, start=1):
        if isinstance(entry, dict) and entry.get("description") in (None, ""):
            continue  # an empty explanation labels nothing
        if isinstance(entry, dict):
            entry = {**entry, "modelId": feature["model"], "layer": feature["source"],
                     "index": feature["index"]}
        try:
            rows.append(_checked(entry))
        except _RowProblem as exc:
            raise _Unusable(f"explanation {number} {exc}") from None
    return rows


def _unreachable(exc) -> bool:
    """No connection could be made at all (as opposed to a broken or slow answer)."""
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    cause = exc.args[0] if exc.args else None
    return isinstance(getattr(cause, "reason", cause), (NewConnectionError, ConnectTimeoutError))


def _reason(exc: BaseException) -> str:
    cause = exc.args[0] if exc.args else None
    reason = getattr(cause, "reason", None) or exc
    return f"{type(reason).__name__}: {str(reason).splitlines()[0][:120]}" if str(reason) else type(reason).__name__
