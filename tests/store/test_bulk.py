"""flowdb load --bulk: neo4j-admin's importer builds the same graph as the Bolt path.

A second managed server (sharing the session's jars) takes the imports, so the
session's server keeps its data for comparison.
"""

import json
import os
import shutil
import stat
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import _free_port
from flowdb.classify import Thresholds
from flowdb.errors import FlowdbError
from flowdb.flow.atlas import Atlas, default_dir
from flowdb.flow.build import classified
from flowdb.flow.layer import LayerBuild
from flowdb.packs.manifest import load_manifest
from flowdb.packs.plan import make_plan
from flowdb.settings import flowdb_home
from flowdb.store import graph
from flowdb.store.bulk import (
    BulkPack,
    ImportFiles,
    _connect,
    bulk_load,
    import_command,
    import_files,
    write_import_files,
)
from flowdb.store.ingest import ingest
from flowdb.store.server import ManagedServer

PER_RUN = {"created_at", "completed_at"}  # when a Pack was written, not what it holds


@pytest.fixture(scope="module")
def bulk_server(neo4j_settings, tmp_path_factory):
    """A second managed server, for imports; it shares the session's jars when there are some."""
    root = tmp_path_factory.mktemp("bulk-home") / "neo4j"
    root.mkdir(mode=0o700)
    session_lib = flowdb_home() / "neo4j" / "lib"
    if session_lib.exists():
        os.symlink(session_lib, root / "lib")
    server = ManagedServer(root, _free_port())
    try:
        yield server
    finally:
        server.stop()


def tiny_pack(name: str, layers: int = 2, width: int = 16, k: int = 2) -> BulkPack:
    """Random classified layers: enough for the importer, no SAE files needed."""
    thresholds = Thresholds(rule="fixed", t_res=0.5, t_mlp=0.5, t_att=0.5)
    plan = {"model": "m", "k": k, "first_layer": 0, "last_layer": layers - 1, "modules": ["res", "mlp"],
            "thresholds": thresholds.spec(), "manifest": "/nowhere/manifest.toml"}

    def built():
        rng = np.random.default_rng(3)
        for number in range(layers):
            layer = LayerBuild(number, {"res": width, "mlp": width})
            for place in (["res"] if number else []) + ["mlp"]:
                layer.indices[place] = rng.integers(0, width, (width, k), dtype=np.int32)
                layer.scores[place] = -np.sort(-rng.random((width, k), dtype=np.float32), axis=1)
                layer.searched[place] = (width, 64)
            layer.saes = {m: {"source": f"{m}-{number}", "d_in": 64, "d_sae": width} for m in ("res", "mlp")}
            yield classified(layer, SimpleNamespace(thresholds=thresholds))

    return BulkPack(name, plan, "fp-" + name, "numpy", built)


def _empty(server: ManagedServer) -> None:
    server.start()
    with _connect(server) as db:
        db.write("MATCH (n) DETACH DELETE n")
        graph.ensure_schema(db)


def dump(db) -> tuple[Counter, Counter]:
    """Every node (labels, properties) and relationship (type, end points, properties),
    as canonical JSON, less what legitimately differs between two writes."""
    nodes = Counter(json.dumps([sorted(row["labels"]), {k: v for k, v in row["props"].items() if k not in PER_RUN}],
                               sort_keys=True)
                    for row in db.read("MATCH (n) RETURN labels(n) AS labels, properties(n) AS props"))
    ends = "coalesce({0}.key, {0}.name, 'Nowhere of ' + {0}.pack)"
    relationships = Counter(json.dumps([row["type"], row["a"], row["b"], row["props"]], sort_keys=True)
                            for row in db.read(f"MATCH (a)-[r]->(b) RETURN type(r) AS type, {ends.format('a')} AS a, "
                                               f"{ends.format('b')} AS b, properties(r) AS props"))
    return nodes, relationships


def schema(db) -> list:
    constraints = db.read("SHOW CONSTRAINTS YIELD name, type, entityType, labelsOrTypes, properties")
    indexes = db.read("SHOW INDEXES YIELD name, type, entityType, labelsOrTypes, properties, state")
    return sorted(json.dumps(row, sort_keys=True) for row in constraints + indexes)


def assert_same(found: Counter, expected: Counter, what: str) -> None:
    missing, extra = expected - found, found - expected
    assert not missing and not extra, (f"{what}: {sum(missing.values())} missing, {sum(extra.values())} extra",
                                       list(missing)[:2], list(extra)[:2])


def test_import_command_names_the_importer_and_every_file(tmp_path):
    files = write_import_files(tmp_path / "files", [tiny_pack("a"), tiny_pack("b", layers=3)])
    argv = import_command(files)
    assert argv[:5] == ["neo4j-admin", "database", "import", "full", "neo4j"]
    assert "--id-type=actual" in argv and "--overwrite-destination" not in argv
    groups = {arg.split("=", 2)[1]: arg.split("=", 2)[2].split(",") for arg in argv if arg.startswith("--nodes=")}
    kinds = {arg.split("=", 2)[1]: arg.split("=", 2)[2].split(",") for arg in argv
             if arg.startswith("--relationships=")}
    assert set(groups) == {"Feature:Residual", "Feature:MLP", "Nowhere"}
    assert set(kinds) == {"RESIDUAL", "MLP", "FROM_NOWHERE"}
    for paths in [*groups.values(), *kinds.values()]:
        assert len(paths) == 2 and paths[0].endswith(".header.csv")
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in paths)
        assert stat.S_IMODE(os.stat(paths[1]).st_mode) == 0o600
    assert "--overwrite-destination" in import_command(files, overwrite=True)
    assert import_command(files, "other")[4] == "other"
    # 2 packs of 2 and 3 layers: 2 x 16 features a layer and a Nowhere node each; 16 x 2
    # matches per place (the first layer has no residual place), and the from-nowhere marks.
    with open(files.paths(kinds["FROM_NOWHERE"])[1]) as marks:
        nowhere = len(marks.readlines())
    assert files.n_nodes == 32 * 5 + 2 and nowhere > 0
    assert files.n_relationships == 32 * (1 + 2 + 1 + 2 + 2) + nowhere
    assert [p.layers for p in files.packs] == [[0, 1], [0, 1, 2]]
    assert [len(p.saes) for p in files.packs] == [4, 6]
    assert ImportFiles.open(files.directory) == files  # what a later finish_import reads
    with open(files.directory / "features-res.header.csv") as header:
        assert header.read().startswith(":ID(flow),key,pack,layer:long,module,index:long,category,")


def test_packs_of_one_name_and_matches_outside_their_sae_are_refused(tmp_path):
    with pytest.raises(FlowdbError, match="'a' more than once"):
        write_import_files(tmp_path / "twice", [tiny_pack("a"), tiny_pack("a")])
    pack = tiny_pack("a")
    layers = pack.layers

    def damaged():
        for layer in layers():
            if layer.layer == 1:
                layer.indices["res"][3, 1] = 16  # R_0 has 16 features: 0 to 15
            yield layer

    pack.layers = damaged
    with pytest.raises(FlowdbError, match="layer 1's residual matches name features outside its 16"):
        write_import_files(tmp_path / "outside", [pack])


def test_a_database_that_holds_a_node_is_refused(bulk_server):
    _empty(bulk_server)
    with _connect(bulk_server) as db:
        db.write("CREATE (:Stray {name: 'mine'})")
    with pytest.raises(FlowdbError) as refused:
        bulk_load(bulk_server, [tiny_pack("a")])
    message = str(refused.value)
    assert "\n" not in message and "already holds 1 node;" in message and "without --bulk" in message
    with _connect(bulk_server) as db:
        assert db.read("MATCH (n) RETURN labels(n) AS labels, n.name AS name") == [
            {"labels": ["Stray"], "name": "mine"}]


def test_a_failed_import_leaves_the_database_as_it_was(bulk_server, tmp_path):
    _empty(bulk_server)
    files = write_import_files(tmp_path / "files", [tiny_pack("a")])
    with open(files.paths(files.relationships["MLP"])[1], "a") as data:
        data.write("0,999999,0.5,1,true\n")  # an edge to a node the files do not have
    with pytest.raises(FlowdbError) as failed:
        import_files(bulk_server, files)
    message = str(failed.value)
    assert "\n" not in message and "999999" in message, message  # the importer's own words
    assert "the database is as before" in message
    with _connect(bulk_server) as db:  # up again, empty, with the schema it had
        assert graph.count_nodes(db) == 0
        names = {row["name"] for row in db.read("SHOW CONSTRAINTS YIELD name")}
        assert {"feature_key", "pack_name"} <= names
    assert not bulk_server.import_marker.exists()
    assert list((bulk_server.root / "bulk").iterdir()) == []


def test_the_bulk_graph_is_the_bolt_graph(db, planted_pack, bulk_server, tmp_path):
    pack_dir = planted_pack[0]
    other = tmp_path / "other.toml"  # another pack: other layers and k, so ids and offsets differ
    other.write_text((pack_dir / "manifest.toml").read_text().replace('name = "planted"', 'name = "planted-b"')
                     .replace("layers = [0, 3]", "layers = [1, 3]").replace("k = 1", "k = 3")
                     .replace('"saes/', f'"{pack_dir}/saes/'))
    packs = []
    for manifest in (load_manifest(pack_dir / "manifest.toml"), load_manifest(other)):
        # An atlas another test matched from a manifest elsewhere records that plan: start afresh.
        shutil.rmtree(default_dir(make_plan(manifest)), ignore_errors=True)
        ingest(manifest, db, show_progress=False)  # the Bolt path, into the session's server
        packs.append(BulkPack.from_atlas(Atlas.open(default_dir(make_plan(manifest)))))
    _empty(bulk_server)
    steps = []
    report = bulk_load(bulk_server, packs, progress=steps.append)
    assert report.packs == ["planted", "planted-b"] and len(steps) >= 4
    assert 0 < report.import_seconds < report.total_seconds and report.rate > 0
    bolt_nodes, bolt_relationships = dump(db)
    with _connect(bulk_server) as bulk:
        bulk_nodes, bulk_relationships = dump(bulk)
        assert schema(bulk) == schema(db)
        assert bulk.read("MATCH (p:Pack) RETURN p.name AS name, p.status AS status, "
                         "p.created_at IS NOT NULL AND p.completed_at IS NOT NULL AS stamped ORDER BY name") == [
            {"name": "planted", "status": "complete", "stamped": True},
            {"name": "planted-b", "status": "complete", "stamped": True}]
    kinds = Counter(json.loads(row)[0] for row in bolt_relationships.elements())
    # planted: k=1 over 4 layers (11 places); planted-b: k=3 over 3 layers (8 places); 512 features each.
    assert kinds["RESIDUAL"] + kinds["MLP"] + kinds["ATTENTION"] == 512 * (11 * 1 + 8 * 3)
    assert kinds["HAS_SAE"] == 12 + 9 and kinds["FROM_NOWHERE"] > 0
    assert_same(bulk_nodes, bolt_nodes, "nodes")
    assert_same(bulk_relationships, bolt_relationships, "relationships")
    assert report.nodes == sum(bolt_nodes.values()) and report.relationships == sum(bolt_relationships.values())
    for directory, subdirs, names in os.walk(bulk_server.root):  # the import's files are private too
        for name in subdirs + names:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                assert stat.S_IMODE(os.lstat(path).st_mode) & 0o077 == 0, path


def test_cli_bulk_for_a_server_of_ones_own_prints_the_command_and_finishes(planted_pack, bulk_server, tmp_path):
    """--bulk with --uri: the files and the neo4j-admin command; run on that server's machine
    (here: the bulk server's own neo4j-admin), then --finish-import completes the graph."""
    import shlex

    from click.testing import CliRunner

    from flowdb.cli import cli
    from flowdb.flow.atlas import match

    atlas = match(make_plan(load_manifest(planted_pack[0] / "manifest.toml")), tmp_path / "atlas")
    _empty(bulk_server)
    user, password = bulk_server.auth()
    connection = ["--uri", bulk_server.uri, "--user", user, "--password", password]
    runner = CliRunner()
    refused = runner.invoke(cli, ["load", "--bulk", str(atlas.root), *connection])
    assert refused.exit_code == 2 and "give --import-dir DIR" in refused.output
    written = runner.invoke(cli, ["load", "--bulk", str(atlas.root), "--import-dir", str(tmp_path / "files"),
                                  *connection])
    assert written.exit_code == 0, written.output
    command = next(line for line in written.output.splitlines() if "neo4j-admin database import full" in line)
    argv = shlex.split(command)
    assert argv[:5] == ["neo4j-admin", "database", "import", "full", "neo4j"]
    bulk_server.stop()
    log = tmp_path / "import.log"
    assert bulk_server.admin([*argv[1:], "--overwrite-destination"], log) == 0, log.read_text()
    bulk_server.start()
    finished = runner.invoke(cli, ["load", "--finish-import", str(tmp_path / "files"), *connection])
    assert finished.exit_code == 0, finished.output
    with _connect(bulk_server) as db:
        record = graph.read_pack(db, "planted")
        assert record.complete and record.layers_done == (0, 1, 2, 3)
        edges = db.read("MATCH (:Feature)-[e:RESIDUAL|MLP|ATTENTION]->(:Feature {pack: 'planted'}) "
                        "RETURN count(e) AS n")[0]["n"]
    assert edges == atlas.n_edges()


# --- link sets (flowdb load --bulk --link) -------------------------------------------------

@pytest.fixture(scope="module")
def linked(flowdb_home, tmp_path_factory):
    """A planted pack and its residual-only split and drift companions, matched into their
    atlases, and the link atlases of base--split and base--drift (where flowdb link keeps
    them, so link_packs reuses them): (pack directories, flow atlases, link atlases)."""
    from flowdb.flow.atlas import match
    from flowdb.flow.link_atlas import LinkPlan, default_link_dir, link_atlas, link_name
    from flowdb.flow.link_spec import LinkSpec
    from flowdb.packs.synth import SynthSpec, synthesize

    out = tmp_path_factory.mktemp("linked")
    synthesize(out, SynthSpec(name="lbase", layers=2, width=128, d_model=128, seed=5, companions=True))
    dirs = {"lbase": out, "lbase-split": out / "split", "lbase-drift": out / "drift"}
    plans = {name: make_plan(load_manifest(path / "manifest.toml")) for name, path in dirs.items()}
    atlases = [match(plan, default_dir(plan)) for plan in plans.values()]
    links = []
    for companion in ("lbase-split", "lbase-drift"):
        plan = LinkPlan(link_name("lbase", companion), plans["lbase"], plans[companion], LinkSpec())
        links.append(link_atlas(plan, default_link_dir(plan)))
    return dirs, atlases, links


def _unit_rows(pack_dir, layer: int) -> np.ndarray:
    from safetensors.numpy import load_file

    w = load_file(str(pack_dir / "saes" / "res" / f"layer_{layer}" / "sae_weights.safetensors"))["W_dec"]
    w = w.astype(np.float64)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def test_bulk_link_sets_are_the_bolt_link_sets(db, linked, bulk_server):
    """Packs and link atlases bulk-loaded give the graph that ingest's load and flowdb link
    give over Bolt: every node and relationship, LinkSet, LinkPlace and ALIGNS included."""
    from flowdb.store.ingest import load
    from flowdb.store.links import link_packs

    dirs, atlases, links = linked
    for atlas in atlases:
        load(atlas, db, show_progress=False)
    for name in ("lbase-split", "lbase-drift"):
        assert link_packs(db, "lbase", name, show_progress=False).status == "built"
    _empty(bulk_server)
    report = bulk_load(bulk_server, [BulkPack.from_atlas(atlas) for atlas in atlases], links=links)
    assert report.links == ["lbase--lbase-split", "lbase--lbase-drift"]
    bolt_nodes, bolt_relationships = dump(db)
    with _connect(bulk_server) as bulk:
        bulk_nodes, bulk_relationships = dump(bulk)
        stored = bulk.read("MATCH (l:LinkSet) RETURN l.name AS name, l.status AS status, l.places_done AS places, "
                           "l.created_at IS NOT NULL AND l.completed_at IS NOT NULL AS stamped ORDER BY name")
        # An ALIGNS ends where the SAE files say: A's rank-1 relative in B is its brute-force nearest.
        top1 = bulk.read("MATCH (a:Feature {pack: 'lbase', layer: 1})-[r:ALIGNS {rank: 1}]->"
                         "(b:Feature {pack: 'lbase-split'}) RETURN a.index AS a, b.index AS b, r.cosine AS cosine")
    assert stored == [{"name": name, "status": "complete", "places": ["0-res", "1-res"], "stamped": True}
                      for name in ("lbase--lbase-drift", "lbase--lbase-split")]
    cos = _unit_rows(dirs["lbase"], 1) @ _unit_rows(dirs["lbase-split"], 1).T
    assert len(top1) == 128
    for row in top1:
        assert abs(row["cosine"] - cos[row["a"]].max()) < 1e-5 and abs(cos[row["a"], row["b"]] - row["cosine"]) < 1e-5
    # Each link: per layer, A's 128 features with their top 5 in B, and B's each with its top 1 in A.
    kinds = Counter(json.loads(row)[0] for row in bolt_relationships.elements())
    widths = {name: [_unit_rows(dirs[name], layer).shape[0] for layer in (0, 1)] for name in dirs}
    assert widths["lbase"] == [128, 128]
    assert kinds["ALIGNS"] == sum(128 * 5 + widths[name][layer] for name in ("lbase-split", "lbase-drift")
                                  for layer in (0, 1))
    assert kinds["HAS_PLACE"] == 4
    assert_same(bulk_nodes, bolt_nodes, "nodes")
    assert_same(bulk_relationships, bolt_relationships, "relationships")
    assert report.nodes == sum(bolt_nodes.values()) and report.relationships == sum(bolt_relationships.values())


def test_link_atlases_of_other_builds_are_refused_before_anything_is_written(linked, tmp_path):
    import dataclasses
    import shutil

    from flowdb.flow.link_atlas import LinkAtlas
    from tests.helpers import assert_one_line_error, run_flowdb

    _, atlases, links = linked
    packs = [BulkPack.from_atlas(atlas) for atlas in atlases]
    incomplete = LinkAtlas(tmp_path / "incomplete")
    shutil.copytree(links[0].root, incomplete.root)
    (incomplete.root / "places" / "1-res.json").unlink()
    for chosen, link_atlases, words in (
            (packs[:2], [links[1]], "links pack 'lbase-drift', which is not among the atlases being imported"),
            ([packs[0], dataclasses.replace(packs[1], fingerprint="0123")], [links[0]],
             f"links build {atlases[1].fingerprint} of pack 'lbase-split'; the atlas being imported holds build 0123"),
            (packs, [links[0], links[0]], "link set 'lbase--lbase-split' more than once"),
            (packs, [incomplete], "lacks layer-module 1-res")):
        with pytest.raises(FlowdbError) as refused:
            write_import_files(tmp_path / "files", chosen, link_atlases)
        assert words in str(refused.value) and "\n" not in str(refused.value)
        assert not (tmp_path / "files").exists()
    roots = [str(atlas.root) for atlas in atlases[:2]]
    # The command line says so in one line, before any file is written.
    refused = run_flowdb("load", "--bulk", *roots, "--link", links[1].root, "--import-dir", tmp_path / "files",
                         "--uri", "bolt://127.0.0.1:9", "--user", "neo4j", "--password", "unused")
    assert_one_line_error(refused, "'lbase-drift', which is not among")
    assert not (tmp_path / "files").exists()
    over_bolt = run_flowdb("load", *roots, "--link", links[0].root, "--uri", "bolt://127.0.0.1:9")
    assert over_bolt.code == 2 and "--link goes with --bulk" in over_bolt.stderr


def test_cli_bulk_links_into_a_server_of_ones_own(linked, bulk_server, tmp_path):
    """--link with --import-dir: the ALIGNS go in with the importer, --finish-import writes
    the LinkSet and LinkPlace nodes (and finds nothing left to do a second time); every
    ALIGNS is a row of its link atlas."""
    import shlex

    import pandas as pd
    from click.testing import CliRunner

    from flowdb.cli import cli

    _, atlases, links = linked
    _empty(bulk_server)
    user, password = bulk_server.auth()
    connection = ["--uri", bulk_server.uri, "--user", user, "--password", password]
    runner = CliRunner()
    written = runner.invoke(cli, ["load", "--bulk", *(str(a.root) for a in atlases),
                                  *(arg for link in links for arg in ("--link", str(link.root))),
                                  "--import-dir", str(tmp_path / "files"), *connection])
    assert written.exit_code == 0, written.output
    command = next(line for line in written.output.splitlines() if "neo4j-admin database import full" in line)
    assert "--relationships=ALIGNS=" in command
    bulk_server.stop()
    log = tmp_path / "import.log"
    assert bulk_server.admin([*shlex.split(command)[1:], "--overwrite-destination"], log) == 0, log.read_text()
    bulk_server.start()
    for expected in ("wrote 19 Pack", "wrote 0 Pack"):  # 3 Pack, 6 + 2 + 2 SAE, 2 LinkSet, 4 LinkPlace; then none
        finished = runner.invoke(cli, ["load", "--finish-import", str(tmp_path / "files"), *connection])
        assert finished.exit_code == 0 and expected in finished.output, finished.output
    expected = []
    for link in links:
        info, frame = link.info, pd.read_parquet(link.root / "matches")
        for row in frame.itertuples():
            own, other = (info["a"], info["b"]) if row.side == "a" else (info["b"], info["a"])
            expected.append(json.dumps([info["name"], f"{own}/{row.layer}/{row.module}/{row.index}",
                                        f"{other}/{row.layer}/{row.module}/{row.other}", round(float(row.cosine), 6),
                                        int(row.rank), bool(row.above), row.category]))
    with _connect(bulk_server) as db:
        found = [json.dumps([r["link"], r["a"], r["b"], round(r["cosine"], 6), r["rank"], r["above"], r["category"]])
                 for r in db.read("MATCH (a)-[r:ALIGNS]->(b) RETURN r.link AS link, a.key AS a, b.key AS b, "
                                  "r.cosine AS cosine, r.rank AS rank, r.above AS above, r.category AS category")]
        places = db.read("MATCH (l:LinkSet)-[:HAS_PLACE]->(p:LinkPlace) RETURN l.name AS name, p.layer AS layer, "
                         "p.n_a AS n_a, p.a_kept AS kept, l.status AS status ORDER BY name, layer")
    assert_same(Counter(found), Counter(expected), "ALIGNS")
    records = {(link.info["name"], r["layer"]): r for link in links for r in link.records()}
    assert places == [{"name": name, "layer": layer, "n_a": 128, "kept": records[(name, layer)]["a_kept"],
                       "status": "complete"} for name in ("lbase--lbase-drift", "lbase--lbase-split")
                      for layer in (0, 1)]
