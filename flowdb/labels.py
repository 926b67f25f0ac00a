"""Neuronpedia labels: explanations joined onto features by (modelId, source, index).

A pack's SAE nodes record their Neuronpedia source (e.g. "12-gemmascope-res-16k")
and its Pack node the model id, so an explanation row maps to PACK/LAYER/MODULE/INDEX.
Every explanation is kept as an (:Explanation)-[:EXPLAINS]->(:Feature); each
labelled feature also gets `label`, its best explanation: the highest-scoring one
where the API gave scores, else the first by explanation id (bulk exports carry no
scores). Rows that match no stored feature are counted by reason, not dropped silently.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from flowdb.database import Database
from flowdb.errors import FlowdbError

NEURONPEDIA_API = "https://www.neuronpedia.org/api"
REQUIRED_FIELDS = ("modelId", "layer", "index", "description")
KEPT_FIELDS = ("typeName", "explanationModelName", "authorId")
WRITE_BATCH = 5000


@dataclass
class LabelReport:
    rows: int = 0
    explanations: int = 0  # (explanation, feature) pairs stored
    features: int = 0  # features whose best label was (re)computed
    unmatched: Counter = field(default_factory=Counter)  # reason -> rows
    fetched: int = 0
    not_found: int = 0

    def summary(self) -> str:
        text = (f"{self.rows} rows, {self.explanations} explanations stored, "
                f"{self.features} features labelled")
        if self.fetched or self.not_found:
            text += f", {self.fetched} fetched, {self.not_found} unknown to Neuronpedia"
        if self.unmatched:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.unmatched.items()))
            text += f"; {sum(self.unmatched.values())} rows matched no feature ({reasons})"
        return text


def read_explanations(path: str | Path) -> Iterator[dict]:
    """Rows of a Neuronpedia export: a directory of explanations/batch-N.jsonl.gz, or
    one .jsonl, .jsonl.gz or .json file (a list, or an object with "explanations")."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz", ".json"))
                       and (p.parent.name == "explanations" or path.name == "explanations"))
        if not files:
            raise FlowdbError(f"{path}: no explanations/*.jsonl(.gz) files under this directory")
    elif path.exists():
        files = [path]
    else:
        raise FlowdbError(f"{path}: no such file or directory")
    for file in files:
        yield from _read_file(file)


def _read_file(file: Path) -> Iterator[dict]:
    try:
        if file.name.endswith(".json"):
            data = json.loads(file.read_text())
            rows = data.get("explanations", []) if isinstance(data, dict) else data
            for number, row in enumerate(rows, start=1):
                yield _checked(row, file, number)
            return
        opener = gzip.open if file.name.endswith(".gz") else open
        with opener(file, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield _checked(json.loads(line), file, number)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlowdbError(f"{file}: unreadable export ({exc})") from None


def _checked(row, file: Path, number: int) -> dict:
    if not isinstance(row, dict):
        raise FlowdbError(f"{file}: row {number} is not an object")
    missing = [name for name in REQUIRED_FIELDS if row.get(name) in (None, "")]
    if missing:
        raise FlowdbError(f"{file}: row {number} lacks {', '.join(missing)}")
    return row


def _sources(db: Database, pack: str | None) -> dict[tuple[str, str], list[dict]]:
    rows = db.read(
        "MATCH (p:Pack)-[:HAS_SAE]->(s:SAE) WHERE s.neuronpedia IS NOT NULL "
        "AND ($pack IS NULL OR p.name = $pack) "
        "RETURN p.model AS model, s.neuronpedia AS source, s.pack AS pack, s.layer AS layer, "
        "s.module AS module, s.n_features AS n", pack=pack)
    joined: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        joined.setdefault((row["model"], row["source"]), []).append(row)
    return joined


def _score(row: dict) -> float | None:
    scores = row.get("scores")
    values = [s.get("value") for s in scores if isinstance(s, dict)] if isinstance(scores, list) else []
    values = [v for v in values if isinstance(v, (int, float))]
    return float(max(values)) if values else None


def _explanation_id(row: dict) -> str:
    if row.get("id"):
        return str(row["id"])
    basis = f"{row['modelId']}/{row['layer']}/{row['index']}/{row['description']}"
    return "flowdb-" + hashlib.sha1(basis.encode()).hexdigest()[:20]


def store_explanations(db: Database, rows: Iterable[dict], pack: str | None = None,
                       report: LabelReport | None = None) -> LabelReport:
    """Join explanation rows to features and store them with best labels."""
    report = report or LabelReport()
    sources = _sources(db, pack)
    batch: list[dict] = []
    touched: set[str] = set()
    for row in rows:
        report.rows += 1
        targets = sources.get((str(row["modelId"]), str(row["layer"])))
        if not targets:
            report.unmatched["with an unknown model/source"] += 1
            continue
        try:
            index = int(row["index"])
        except (TypeError, ValueError):
            report.unmatched["with a non-integer index"] += 1
            continue
        in_range = [t for t in targets if 0 <= index < (t["n"] or 0)]
        if not in_range:
            report.unmatched["with an index beyond the SAE's width"] += 1
            continue
        for target in in_range:
            key = f"{target['pack']}/{target['layer']}/{target['module']}/{index}"
            batch.append({"key": key, "id": _explanation_id(row), "description": str(row["description"]),
                          "modelId": str(row["modelId"]), "source": str(row["layer"]), "index": index,
                          "score": _score(row), **{k: row.get(k) for k in KEPT_FIELDS}})
            touched.add(key)
        if len(batch) >= WRITE_BATCH:
            report.explanations += _write(db, batch)
            batch = []
    if batch:
        report.explanations += _write(db, batch)
    report.features += _set_best_labels(db, sorted(touched))
    return report


def _write(db: Database, batch: list[dict]) -> int:
    rows = db.write(
        "UNWIND $rows AS row MATCH (f:Feature {key: row.key}) "
        "MERGE (e:Explanation {id: row.id}) "
        "SET e.description = row.description, e.modelId = row.modelId, e.source = row.source, "
        "    e.index = row.index, e.score = row.score, e.typeName = row.typeName, "
        "    e.explanationModelName = row.explanationModelName, e.authorId = row.authorId "
        "MERGE (e)-[:EXPLAINS]->(f) RETURN count(*) AS n", rows=batch)
    return rows[0]["n"]


def _set_best_labels(db: Database, keys: list[str]) -> int:
    labelled = 0
    for start in range(0, len(keys), WRITE_BATCH):
        rows = db.write(
            "UNWIND $keys AS key MATCH (f:Feature {key: key})<-[:EXPLAINS]-(e:Explanation) "
            "WITH f, e ORDER BY coalesce(e.score, -1e9) DESC, e.id "
            "WITH f, collect(e)[0] AS best "
            "SET f.label = best.description, "
            "    f.label_by = coalesce(best.explanationModelName, best.typeName) "
            "RETURN count(f) AS n", keys=keys[start:start + WRITE_BATCH])
        labelled += rows[0]["n"]
    return labelled


def import_labels(db: Database, path: str | Path, pack: str | None = None) -> LabelReport:
    return store_explanations(db, read_explanations(path), pack)


def fetch_labels(db: Database, pack: str, limit: int = 100, module: str | None = None,
                 api_url: str | None = None, api_key: str | None = None,
                 requests_per_second: float = 2.0, progress: bool | None = None) -> LabelReport:
    """Fill missing labels from the Neuronpedia API, one GET per feature.

    Resumable: each feature asked about is marked (np_fetched) as its answer is
    stored, so a stopped run picks up where it ended.
    """
    import requests
    from tqdm.auto import tqdm

    api_url = (api_url or os.environ.get("NEURONPEDIA_API_URL") or NEURONPEDIA_API).rstrip("/")
    api_key = api_key or os.environ.get("NEURONPEDIA_API_KEY")
    if not db.read("MATCH (p:Pack {name: $pack}) RETURN p.name AS n", pack=pack):
        raise FlowdbError(f"no pack named {pack!r} in {db.uri}")
    todo = db.read(
        "MATCH (p:Pack {name: $pack})-[:HAS_SAE]->(s:SAE) "
        "WHERE s.neuronpedia IS NOT NULL AND ($module IS NULL OR s.module = $module) "
        "MATCH (f:Feature {pack: $pack, layer: s.layer, module: s.module}) "
        "WHERE f.label IS NULL AND f.np_fetched IS NULL "
        "RETURN f.key AS key, p.model AS model, s.neuronpedia AS source, f.index AS index "
        "ORDER BY f.layer, f.module, f.index LIMIT $limit", pack=pack, module=module, limit=limit)
    report = LabelReport()
    headers = {"x-api-key": api_key} if api_key else {}
    interval = 1.0 / requests_per_second
    last_request = 0.0
    with requests.Session() as session:
        for feature in tqdm(todo, unit="feature", desc=f"neuronpedia {pack}",
                            disable=None if progress is None else not progress):
            url = f"{api_url}/feature/{feature['model']}/{feature['source']}/{feature['index']}"
            wait = last_request + interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            last_request = time.monotonic()
            payload = _get(session, url, headers)
            if payload is None:
                report.not_found += 1
            else:
                report.fetched += 1
                rows = [{**e, "modelId": feature["model"], "layer": feature["source"],
                         "index": feature["index"]} for e in payload.get("explanations") or []
                        if isinstance(e, dict) and e.get("description")]
                store_explanations(db, rows, pack, report)
            db.write("MATCH (f:Feature {key: $key}) SET f.np_fetched = datetime()", key=feature["key"])
    return report


def _get(session, url: str, headers: dict, attempts: int = 5) -> dict | None:
    """GET a feature; None for 404. Retries 429 and 5xx politely, then gives up."""
    import requests

    for attempt in range(attempts):
        try:
            response = session.get(url, headers=headers, timeout=30)
        except requests.RequestException as exc:
            problem = f"{type(exc).__name__}"
        else:
            if response.status_code == 404:
                return None
            if response.ok:
                try:
                    return response.json()
                except ValueError:
                    raise FlowdbError(f"{url}: the answer is not JSON") from None
            if response.status_code in (401, 403):
                raise FlowdbError(f"{url}: HTTP {response.status_code}; set NEURONPEDIA_API_KEY")
            problem = f"HTTP {response.status_code}"
            if response.status_code not in (429, 500, 502, 503, 504):
                raise FlowdbError(f"{url}: {problem}")
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.isdigit():
                time.sleep(min(float(retry_after), 60.0))
                continue
        time.sleep(min(2.0 ** attempt, 30.0))
    raise FlowdbError(f"{url}: {problem} after {attempts} tries; run again to resume")
