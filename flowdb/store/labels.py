"""Neuronpedia labels: explanations joined onto features by (modelId, source, index).

A pack's SAE nodes record their Neuronpedia source (e.g. "12-gemmascope-res-16k")
and its Pack node the model id, so an explanation row maps to PACK/LAYER/MODULE/INDEX.
Every explanation is kept as an (:Explanation)-[:EXPLAINS]->(:Feature); each
labelled feature also gets `label`, its best explanation: the highest-scoring one
where the API gave scores, else the first by explanation id (bulk exports carry no
scores). Rows that match no stored feature are counted by reason, not dropped silently.

An import is all-or-nothing per file: a file is read as a stream (memory does not grow
with it), its rows checked and written as they come in one transaction, which commits
only once the last row has passed; any bad row rolls the whole file back.
A fetch records every feature it asked about (with the problem, when the answer was
unusable), so a stopped or failing run resumes with the features not yet asked.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import os
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flowdb.errors import FlowdbError
from flowdb.files import regular_file
from flowdb.modules import feature_key
from flowdb.progress import disabled
from flowdb.store import graph
from flowdb.store.database import Database

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
# One explanation row, embedding included, is kilobytes: a longer one is not a row.
MAX_ROW_BYTES = 16 * 1024 * 1024
READ_BYTES = 1 << 16
MAX_DEPTH = 32
SOURCES_SHOWN = 12


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
    unknown: set = field(default_factory=set)  # "model/source" no stored SAE has; the first few
    known: list = field(default_factory=list)  # every stored SAE's "model/source"

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
        if self.unknown:
            text += f"; unknown sources: {_listed(sorted(self.unknown), counted=False)}; " + (
                f"the stored SAEs have {_listed(self.known)}" if self.known else
                "no stored SAE has a Neuronpedia source (set neuronpedia in the manifest's [modules.*])")
        return text

    def add(self, part: LabelReport) -> None:
        """Count in what one committed file (or answer) stored."""
        self.rows += part.rows
        self.explanations += part.explanations
        self.unmatched.update(part.unmatched)
        self.labelled |= part.labelled
        for name in part.unknown:
            self.note_unknown(name)

    def note_unknown(self, name: str) -> None:
        # One more than is shown, so the summary can say there were more.
        if len(self.unknown) <= SOURCES_SHOWN:
            self.unknown.add(name)


def _listed(names: list[str], counted: bool = True) -> str:
    if len(names) <= SOURCES_SHOWN:
        return ", ".join(names)
    shown = ", ".join(names[:SOURCES_SHOWN])
    return f"{shown}, ... ({len(names)} in all)" if counted else f"{shown}, ..."


# --- checking rows -------------------------------------------------------------------------

class _RowProblem(ValueError):
    """What is wrong with one row, worded to follow "row N"."""


def _shown(value) -> str:
    try:
        text = json.dumps(value, default=str)
    except (RecursionError, ValueError):  # nested deeper than the encoder goes, or NaN-like
        return f"a {type(value).__name__} nested too deeply to show"
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    checked = {"modelId": _text(row, "modelId", True), "source": _text(row, "layer", True),
               "index": _index(row["index"]), "description": _text(row, "description", True),
               **{name: _text(row, name, False) for name in KEPT_FIELDS}, "score": _score(row)}
    checked["id"] = _text(row, "id", False) or _explanation_id(checked)
    return checked


def _score(row: dict) -> float | None:
    """The best of an explanation's scores: each a number, or an object whose value is a
    number (Neuronpedia's form) or null (not scored). Anything else is refused, not skipped."""
    scores = row.get("scores")
    if scores is None:
        return None
    if not isinstance(scores, list):
        raise _RowProblem(f"has scores {_shown(scores)}; it must be a list")
    values = []
    for number, entry in enumerate(scores, start=1):
        value = entry.get("value", "missing") if isinstance(entry, dict) else entry
        if isinstance(entry, dict) and value is None:
            continue
        if not _number(value):
            raise _RowProblem(f"has scores entry {number} {_shown(entry)}; each must be a finite number "
                              'or an object like {"value": 0.9}')
        values.append(float(value))
    return max(values) if values else None


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


class LabelFileError(FlowdbError):
    """A label file that cannot be read, or a row of it that is wrong."""


TOO_DEEP = "JSON nested deeper than Python's parser goes"


def read_file(file: Path) -> Iterator[dict]:
    """Every row of one export file, checked, as it is read; LabelFileError names the
    first bad row and field."""
    try:
        regular_file(file, "label file", error=LabelFileError)
        for number, row in _raw_rows(file):
            yield _checked_at(file, number, row)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise LabelFileError(f"{file}: unreadable export ({exc})") from None


def _raw_rows(file: Path) -> Iterator[tuple[int, object]]:
    if file.name.endswith(".json"):
        yield from _json_rows(file)
        return
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8") as handle:
        number = 0
        # A bounded readline: one endless line is refused, not held.
        while line := handle.readline(MAX_ROW_BYTES + 1):
            number += 1
            if len(line) > MAX_ROW_BYTES:
                raise _too_long(file, number)
            if line.strip():
                yield number, _decoded(file, number, line)


def _decoded(file: Path, number: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise LabelFileError(f"{file}: row {number} is not JSON ({exc})") from None
    except RecursionError:
        raise LabelFileError(f"{file}: row {number} is {TOO_DEEP}") from None


def _too_long(file: Path, number: int) -> LabelFileError:
    return LabelFileError(f"{file}: row {number} is longer than {MAX_ROW_BYTES >> 20} MiB; "
                          "an explanation row is kilobytes")


def _json_rows(file: Path) -> Iterator[tuple[int, object]]:
    """The rows of a JSON list of explanations, or of an object's "explanations" list,
    parsed incrementally by ijson: a row is held only while it is checked."""
    import ijson

    with open(file, "rb") as handle:
        bounded = _RowBound(handle, file)
        try:
            yield from _rows_of(ijson.basic_parse(bounded, use_float=True), file, bounded)
        except ijson.JSONError as exc:
            raise LabelFileError(f"{file}: not JSON ({str(exc).strip().splitlines()[0]})") from None


def _rows_of(events, file: Path, bounded: _RowBound) -> Iterator[tuple[int, object]]:
    """(number, row) from ijson's basic events. Depth is counted here and bounded:
    ijson's prefixed events grow with depth squared, and a row nests three deep."""
    from ijson.common import ObjectBuilder

    depth, number, rows_at, found, after_key, row = 0, 0, None, False, False, None
    for event, value in events:
        if row is None and depth == rows_at and event != "end_array":
            row = ObjectBuilder()
        if row is not None:
            row.event(event, value)
        if event in ("start_map", "start_array"):
            if event == "start_array" and (depth == 0 or after_key):
                rows_at, found = depth + 1, True
            depth += 1
            if depth > MAX_DEPTH:
                raise LabelFileError(f"{file}: row {number + 1} is JSON nested more than {MAX_DEPTH} "
                                     "deep; an explanation row nests three deep")
        elif event in ("end_map", "end_array"):
            depth -= 1
            if rows_at is not None and depth < rows_at:
                rows_at = None  # the list of rows has ended
        after_key = depth == 1 and event == "map_key" and value == "explanations"
        if row is not None and depth == rows_at:
            number += 1
            bounded.row_read(number + 1)
            yield number, row.value
            row = None
    if not found:
        raise LabelFileError(f"{file}: neither a list of explanations nor an object with one")


class _RowBound:
    """A binary file read for ijson that refuses more than MAX_ROW_BYTES (plus what
    the parser reads ahead) between two rows, so a value too long to be a row is
    refused before it is held whole."""

    def __init__(self, handle, file: Path):
        self.handle, self.file = handle, file
        self.since_row, self.row = 0, 1

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(READ_BYTES if size is None or size < 0 else min(size, READ_BYTES))
        self.since_row += len(data)
        if self.since_row > MAX_ROW_BYTES + 2 * READ_BYTES:
            raise _too_long(self.file, self.row)
        return data

    def row_read(self, next_row: int) -> None:
        self.since_row, self.row = 0, next_row


def _checked_at(file: Path, number: int, row) -> dict:
    try:
        return _checked(row)
    except _RowProblem as exc:
        raise LabelFileError(f"{file}: row {number} {exc}") from None


# --- storing -------------------------------------------------------------------------------

def _sources(db: Database, pack: str | None) -> dict[tuple[str, str], list[dict]]:
    joined: dict[tuple[str, str], list[dict]] = {}
    for row in graph.label_sources(db, pack):
        joined.setdefault((row["model"], row["source"]), []).append(row)
    return joined


def _joined(row: dict, sources: dict, report: LabelReport) -> list[dict]:
    """The stored rows of one explanation, one per feature it names; one naming none is counted."""
    report.rows += 1
    targets = sources.get((row["modelId"], row["source"]))
    if not targets:
        report.unmatched["with an unknown model/source"] += 1
        report.note_unknown(f"{row['modelId']}/{row['source']}")
        return []
    in_range = [t for t in targets if row["index"] < (t["n"] or 0)]
    if not in_range:
        report.unmatched["with an index beyond the SAE's width"] += 1
        return []
    return [{**row, "key": feature_key(t["pack"], t["layer"], t["module"], row["index"])}
            for t in in_range]


def _store(db: Database, rows: Callable[[], Iterable[dict]], sources: dict, report: LabelReport) -> None:
    """Write checked rows and their features' best labels in one transaction, committed
    only once `rows()` has given its last row: an exception from it stores nothing."""
    with db.session() as session:
        report.add(session.execute_write(_write_all, rows, sources))


def _write_all(tx, rows: Callable[[], Iterable[dict]], sources: dict) -> LabelReport:
    # Re-run whole on a transient error (rows() reads the file again): MERGE by id makes that harmless.
    part, batch = LabelReport(), []
    for row in rows():
        batch += _joined(row, sources, part)
        if len(batch) >= WRITE_BATCH:
            _write_batch(tx, batch, part)
            batch = []
    _write_batch(tx, batch, part)
    keys = sorted(part.labelled)
    for start in range(0, len(keys), WRITE_BATCH):
        graph.set_best_labels(tx, keys[start:start + WRITE_BATCH])
    return part


def _write_batch(tx, batch: list[dict], part: LabelReport) -> None:
    if batch:
        part.explanations += graph.write_explanations(tx, batch)
        part.labelled.update(row["key"] for row in batch)


def import_labels(db: Database, path: str | Path, pack: str | None = None) -> LabelReport:
    """Import an export file by file, each file in one transaction that commits only when
    all its rows have been read and passed.

    A bad row stops the import; earlier files stay committed (importing them again
    stores nothing new: explanations are merged by id)."""
    if pack is not None:
        graph.require_pack(db, pack)
    sources = _sources(db, pack)
    report = LabelReport(known=sorted(f"{model}/{source}" for model, source in sources))
    for file in export_files(path):
        try:
            _store(db, functools.partial(read_file, file), sources, report)
        except LabelFileError as exc:
            raise LabelFileError(f"{exc}; nothing of this file was stored ({report.files} earlier "
                                 f"file(s) with {report.explanations} explanations are committed)") from None
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
                            disable=disabled(progress)):
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
        _store(db, lambda: rows, sources, report)
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


def origin(url: str) -> str:
    """scheme://host:port, the port spelled out, so that equal origins compare equal."""
    from urllib3.util import parse_url

    parsed = parse_url(url)
    scheme = (parsed.scheme or "http").lower()
    port = parsed.port or {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{(parsed.host or '').lower()}:{port}"


def _session_class():
    import requests

    class OriginBoundSession(requests.Session):
        """Follows a redirect only within the origin it was sent to, so the API key is never
        sent elsewhere (requests would keep a custom header such as x-api-key on any host)."""

        def rebuild_auth(self, prepared_request, response):
            # Called for each redirect before it is followed.
            sent_to, sent_on = origin(response.request.url), origin(prepared_request.url)
            if sent_on != sent_to:
                raise FlowdbError(
                    f"{response.request.url}: the server redirected to {sent_on}, another origin than "
                    f"{sent_to}; flowdb follows no redirect away from the API's origin (its key stays "
                    "there): set NEURONPEDIA_API_URL or --api-url to where the API answers")
            super().rebuild_auth(prepared_request, response)

    return OriginBoundSession


def _session(api_key: str | None, retries: int, backoff_s: float):
    from requests.adapters import HTTPAdapter

    retry = _retry_class()(
        total=retries, status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET"}),
        backoff_factor=backoff_s, respect_retry_after_header=True,
        raise_on_status=False)  # the last answer comes back, so its status can be reported
    session = _session_class()()
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
    except RecursionError:
        raise _Unusable(f"the answer is {TOO_DEEP}") from None


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
