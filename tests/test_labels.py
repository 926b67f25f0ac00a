import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from flowdb.cli import cli
from flowdb.errors import FlowdbError
from flowdb.ingest import ingest
from flowdb.labels import fetch_labels, import_labels
from flowdb.manifest import load_manifest

# The public export's explanation fields (formats.md), in order.
EXPORT_FIELDS = ("id", "modelId", "layer", "index", "authorId", "description", "embedding", "typeName",
                 "explanationModelName", "umap_x", "umap_y", "umap_cluster", "umap_log_feature_sparsity")


def export_row(n, source, index, description):
    values = {"id": f"clx{n:06d}", "modelId": "planted-model", "layer": source, "index": str(index),
              "authorId": "auto", "description": description, "embedding": [0.1, 0.2],
              "typeName": "oai_token-act-pair", "explanationModelName": "gpt-4o-mini",
              "umap_x": 1.5, "umap_y": -2.0, "umap_cluster": 7, "umap_log_feature_sparsity": -4.2}
    return {field: values[field] for field in EXPORT_FIELDS}


@pytest.fixture
def labelled_pack(db, planted_pack, tmp_path):
    """The planted pack with Neuronpedia sources on its residual and MLP SAEs."""
    text = (planted_pack[0] / "manifest.toml").read_text()
    text = text.replace('path = "saes/res/layer_{layer}"',
                        f'path = "{planted_pack[0]}/saes/res/layer_{{layer}}"\nneuronpedia = "{{layer}}-planted-res"')
    text = text.replace('path = "saes/mlp/layer_{layer}"',
                        f'path = "{planted_pack[0]}/saes/mlp/layer_{{layer}}"\nneuronpedia = "{{layer}}-planted-mlp"')
    text = text.replace('"saes/att', f'"{planted_pack[0]}/saes/att')
    manifest = tmp_path / "labelled.toml"
    manifest.write_text(text)
    ingest(load_manifest(manifest), db)
    return db


def write_export(root, rows_by_source):
    """The bucket layout: v1/{modelId}/{source}/explanations/batch-N.jsonl.gz."""
    for source, rows in rows_by_source.items():
        directory = root / "v1" / "planted-model" / source / "explanations"
        directory.mkdir(parents=True, exist_ok=True)
        for batch, start in enumerate(range(0, len(rows), 1024)):
            with gzip.open(directory / f"batch-{batch}.jsonl.gz", "wt") as handle:
                for row in rows[start:start + 1024]:
                    handle.write(json.dumps(row) + "\n")


def test_import_export_layout_with_counts(labelled_pack, tmp_path):
    db = labelled_pack
    res_rows = [export_row(i, "2-planted-res", i, f"residual concept {i}") for i in range(1100)]  # two batches
    res_rows.append(export_row(5000, "2-planted-res", 7, "a second explanation of 7"))
    res_rows.append(export_row(5001, "2-planted-res", 512, "beyond the width"))
    mlp_rows = [export_row(6000 + i, "1-planted-mlp", i, f"mlp concept {i}") for i in range(10)]
    stray = [export_row(7000, "9-other-res", 0, "unknown source"), export_row(7001, "1-planted-mlp", "x", "bad")]
    write_export(tmp_path, {"2-planted-res": res_rows, "1-planted-mlp": mlp_rows + stray})
    report = import_labels(db, tmp_path)
    assert report.rows == 1100 + 2 + 10 + 2
    assert report.unmatched == {"with an index beyond the SAE's width": 589, "with an unknown model/source": 1,
                                "with a non-integer index": 1}
    assert report.explanations == 512 + 1 + 10
    assert report.features == 512 + 10
    stored = db.read("MATCH (e:Explanation)-[:EXPLAINS]->(f:Feature {key: 'planted/2/res/7'}) "
                     "RETURN e.description AS d, e.explanationModelName AS m, f.label AS label ORDER BY d")
    assert [r["d"] for r in stored] == ["a second explanation of 7", "residual concept 7"]
    assert {r["label"] for r in stored} == {"residual concept 7"}  # first by id: clx000007 < clx005000
    assert "589 with an index beyond the SAE's width" in report.summary()
    again = import_labels(db, tmp_path)  # importing twice stores nothing new
    assert db.read("MATCH (e:Explanation) RETURN count(e) AS n")[0]["n"] == 512 + 1 + 10
    assert again.explanations == report.explanations


@pytest.mark.parametrize("form", ["jsonl", "json", "json-object"])
def test_import_single_files(labelled_pack, tmp_path, form):
    rows = [export_row(i, "0-planted-res", i, f"concept {i}") for i in range(3)]
    path = tmp_path / ("rows.jsonl" if form == "jsonl" else "rows.json")
    if form == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text(json.dumps(rows if form == "json" else {"explanations": rows}))
    report = import_labels(labelled_pack, path)
    assert (report.rows, report.explanations, report.features) == (3, 3, 3)


def test_import_errors_name_the_file(labelled_pack, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"modelId": "planted-model", "layer": "0-planted-res", "index": "1"}\n')
    with pytest.raises(FlowdbError, match="bad.jsonl: row 1 lacks description"):
        import_labels(labelled_pack, bad)
    assert labelled_pack.read("MATCH (e:Explanation) RETURN count(e) AS n")[0]["n"] == 0
    result = CliRunner().invoke(cli, ["labels", "import", str(tmp_path)])
    assert result.exit_code == 1 and "no explanations/*.jsonl(.gz) files" in result.output


class FakeNeuronpedia(BaseHTTPRequestHandler):
    """Speaks GET /api/feature/{modelId}/{source}/{index} as Neuronpedia does."""

    seen: list = []
    throttle_once = True

    def do_GET(self):  # noqa: N802
        FakeNeuronpedia.seen.append((self.path, self.headers.get("x-api-key")))
        parts = self.path.strip("/").split("/")
        if FakeNeuronpedia.throttle_once:
            FakeNeuronpedia.throttle_once = False
            self.send_response(429)
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        if parts[:2] != ["api", "feature"] or len(parts) != 5 or parts[4] == "3":
            self.send_response(404)
            self.end_headers()
            return
        model, source, index = parts[2:]
        body = {"modelId": model, "layer": source, "index": index, "explanations": [
            {"id": f"{source}-{index}-a", "description": f"weak {index}", "typeName": "oai_token-act-pair",
             "explanationModelName": "gpt-4o-mini", "scores": [{"value": 0.2}]},
            {"id": f"{source}-{index}-b", "description": f"strong {index}", "typeName": "oai_token-act-pair",
             "explanationModelName": "claude", "scores": [{"value": 0.9}]},
        ]}
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def neuronpedia_server():
    FakeNeuronpedia.seen, FakeNeuronpedia.throttle_once = [], True
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeNeuronpedia)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()


def test_fetch_fills_labels_politely_and_resumes(labelled_pack, neuronpedia_server, monkeypatch):
    monkeypatch.setenv("NEURONPEDIA_API_KEY", "secret")
    db = labelled_pack
    report = fetch_labels(db, "planted", limit=5, module="res", api_url=neuronpedia_server,
                          requests_per_second=50, progress=False)
    assert (report.fetched, report.not_found) == (4, 1)  # index 3 is unknown to the server
    assert all(key == "secret" for _, key in FakeNeuronpedia.seen)
    assert FakeNeuronpedia.seen[0][0] == FakeNeuronpedia.seen[1][0] == "/api/feature/planted-model/0-planted-res/0"
    labels = db.read("MATCH (f:Feature {pack: 'planted', layer: 0, module: 'res'}) WHERE f.index < 5 "
                     "RETURN f.index AS i, f.label AS label ORDER BY i")
    assert [r["label"] for r in labels] == ["strong 0", "strong 1", "strong 2", None, "strong 4"]
    asked = len(FakeNeuronpedia.seen)
    second = fetch_labels(db, "planted", limit=2, module="res", api_url=neuronpedia_server,
                          requests_per_second=50, progress=False)
    assert second.fetched == 2
    assert [p for p, _ in FakeNeuronpedia.seen[asked:]] == [
        "/api/feature/planted-model/0-planted-res/5", "/api/feature/planted-model/0-planted-res/6"]


def test_fetch_cli_unknown_pack(labelled_pack, neuronpedia_server):
    result = CliRunner().invoke(cli, ["labels", "fetch", "nosuch", "--api-url", neuronpedia_server])
    assert result.exit_code == 1 and "no pack named 'nosuch'" in result.output
