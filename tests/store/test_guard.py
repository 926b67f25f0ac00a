"""Issue 16, item 1: raw Cypher runs read-only only when Neo4j's own plan says it reads.

Every refused statement is tried in many spellings (case, comments, backticks,
whitespace, unicode whitespace, nesting in CALL {}, decoys that look like comments
to a text scan). Each must be refused, either by the guard (the server planned it
and the plan shows more than a read) or by the server's parser, and the graph must
stay as it was. Legitimate reads, the project's own templates among them, pass."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from click.testing import CliRunner

import flowdb
from conftest import build_planted
from flowdb.cli import cli
from flowdb.errors import ReadOnlyRefused, StatementRejected
from flowdb.store import guard
from flowdb.store.templates import get_template, templates

# Statements a reader must not run. Tokens are separated by one space; "~" marks a
# name that may be backticked; all-capital words are keywords (their case is free).
REFUSED = [
    "CALL ~dbms . ~listConfig ( ) YIELD ~name RETURN ~name",
    "CALL ~dbms . ~listConfig ( )",
    "CALL ~dbms . ~killConnections ( [ 'bolt-0' ] )",
    "CALL ~dbms . ~components ( )",
    "CALL ~db . ~clearQueryCaches ( )",
    "CALL ~db . ~createLabel ( 'Scratch' )",
    "CALL ~tx . ~setMetaData ( { ~k : 1 } )",
    "CALL ~db . ~ping ( )",
    "CALL ~apoc . ~load . ~json ( 'http://127.0.0.1:1/x' ) YIELD ~value RETURN ~value",
    "CALL ~apoc . ~cypher . ~runWrite ( 'CREATE (:Scratch)' , { } )",
    "SHOW DATABASES",
    "SHOW USERS",
    "SHOW SETTINGS",
    "SHOW TRANSACTIONS",
    "SHOW PROCEDURES",
    "SHOW INDEXES",
    "TERMINATE TRANSACTIONS 'neo4j-transaction-1'",
    "USE ~system SHOW USERS",
    "USE ~system CALL ~dbms . ~listConfig ( )",
    "CREATE USER ~eve SET PASSWORD 'secret' CHANGE NOT REQUIRED",
    "CREATE DATABASE ~other",
    "CREATE INDEX ~scratch_index FOR ( ~n : ~Scratch ) ON ( ~n . ~x )",
    "LOAD CSV FROM 'file:///etc/passwd' AS ~line RETURN ~line",
    "LOAD CSV WITH HEADERS FROM 'http://127.0.0.1:1/x.csv' AS ~row RETURN ~row",
    "CREATE ( ~n : ~Scratch ) RETURN ~n",
    "MERGE ( ~n : ~Scratch { ~k : 1 } ) RETURN ~n",
    "MATCH ( ~n ) SET ~n . ~x = 1",
    "MATCH ( ~n ) DETACH DELETE ~n",
    "MATCH ( ~n ) REMOVE ~n . ~key",
    "FOREACH ( ~i IN [ 1 ] | CREATE ( : ~Scratch ) )",
    "MATCH ( ~n ) CALL ( ~n ) { SET ~n . ~x = 1 } IN TRANSACTIONS",
    "CALL { MATCH ( ~n ) RETURN ~n } IN TRANSACTIONS RETURN ~n",
    "RETURN COUNT { CALL ~dbms . ~listConfig ( ) YIELD ~name RETURN ~name } AS ~c",
]
KEYWORD_CASES = [str.upper, str.lower, str.title, lambda word: "".join(
    c.lower() if i % 2 else c.upper() for i, c in enumerate(word))]
# What may stand between two tokens: ASCII and unicode whitespace, comments, and
# comments holding comment markers. Some unicode ones Neo4j does not accept.
SEPARATORS = [" ", "  ", "\n", "\t", "\r\n", "/**/", " /* x */ ", "/* // */", " // c\n", "\n// a /* b\n",
              *map(chr, [0x0B, 0x0C, 0x1C, 0x85, 0xA0, 0x1680, 0x2000, 0x2003, 0x2007, 0x200A, 0x200B,
                         0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0xFEFF])]
# Wrappers: nested subqueries, and a prefix that a text scan takes for a comment.
WRAPPERS = [
    "CALL {{ {} }} RETURN count(*) AS c",
    "CALL {{ CALL {{ {} }} RETURN count(*) AS inner }} RETURN inner",
    "MATCH (anchor) CALL (anchor) {{ {} }} RETURN count(*) AS c",
    "OPTIONAL CALL {{ {} }} RETURN count(*) AS c",
    "RETURN 1 AS c UNION ALL CALL {{ {} }} RETURN count(*) AS c",
    "WITH 1 AS `//` {}",
    "WITH 1 AS `/*` {}",
    "WITH '//' AS s {}",
    "WITH \"/*\" AS s\n{}",
]


def spell(template: str, keyword_case=str.upper, separator=" ", backticks=False, name_case=None) -> str:
    words = []
    for token in template.split(" "):
        if token.startswith("~"):
            name = name_case(token[1:]) if name_case else token[1:]
            words.append(f"`{name}`" if backticks else name)
        elif token.isalpha() and token.isupper():
            words.append(keyword_case(token))
        else:
            words.append(token)
    return separator.join(words)


def variants(template: str) -> set[str]:
    """The statement in many spellings: every separator (keyword case cycling), names
    backticked, names in another case, and inside each wrapper."""
    found = {spell(template, KEYWORD_CASES[i % 4], sep) for i, sep in enumerate(SEPARATORS)}
    found |= {spell(template, KEYWORD_CASES[i % 4], sep, backticks=True) for i, sep in enumerate(SEPARATORS[:4])}
    found |= {spell(template, str.lower, " ", name_case=str.upper), spell(template, name_case=str.swapcase)}
    found |= {wrapper.format(spell(template, KEYWORD_CASES[i % 4], SEPARATORS[i % 10], backticks=i % 2 == 1))
              for i, wrapper in enumerate(WRAPPERS)}
    return found


@pytest.fixture
def stored(planted_graph):
    """The planted pack, built once and shared: only for tests that do not write."""
    return planted_graph


@pytest.fixture
def writable(db, planted_pack):
    """The planted pack in a database of the test's own, for a test that writes."""
    build_planted(db, None, planted_pack[0])
    return db


def fingerprint(db) -> dict:
    """What any write would change: nodes, relationships, labels and properties."""
    return db.read("MATCH (n) OPTIONAL MATCH (n)-[r]->() "
                   "RETURN count(DISTINCT n) AS nodes, count(r) AS rels, "
                   "sum(size(keys(n))) AS node_properties, "
                   "collect(DISTINCT labels(n)) AS labels")[0]


def test_generated_variants_of_refused_statements_never_run(stored, record_property):
    before = fingerprint(stored)
    by_guard = by_parser = 0
    for template in REFUSED:
        guarded_here = 0
        for statement in sorted(variants(template)):
            try:
                rows = guard.read(stored, statement)
            except ReadOnlyRefused:
                by_guard += 1
                guarded_here += 1
            except StatementRejected:
                by_parser += 1
            else:
                pytest.fail(f"ran read-only: {statement!r} -> {rows[:3]}")
        assert fingerprint(stored) == before, template
        # Not all spellings may lean on the parser: the guard itself saw each statement.
        if not template.startswith("CALL ~apoc") and "USE" not in template and "DATABASE" not in template:
            assert guarded_here >= 20, (template, guarded_here)
    tried = by_guard + by_parser
    print(f"\nguard variants: {tried} tried, {by_guard} refused by the guard, {by_parser} by the parser")
    record_property("variants", {"tried": tried, "guard": by_guard, "parser": by_parser})
    assert tried >= 1000 and by_guard >= 750


def test_variants_hold_what_a_text_scan_misses():
    """The generator does produce the audit's spellings, so the test above covers them."""
    made = set().union(*(variants(template) for template in REFUSED))
    assert "CALL dbms . listConfig ( )" in made
    assert any(v.startswith("CALL `dbms`") for v in made)
    assert any(v.startswith(("WITH 1 AS `//`", "WITH 1 AS `/*`")) and "listConfig" in v for v in made)
    assert any("\u00a0" in v and "listConfig" in v for v in made)
    assert any("\u2028" in v and "LOAD" in v.upper() for v in made)
    assert any(v.startswith("CALL { CALL { ") and "csv" in v.lower() for v in made)


LEGITIMATE = [
    "MATCH (f:Feature) RETURN count(f) AS n",
    "MATCH (f:Feature {pack: 'planted'}) RETURN f.layer AS layer, count(*) AS n ORDER BY layer",
    "OPTIONAL MATCH (x:NoSuchLabel) RETURN x",
    "MATCH (f:Residual) WHERE f.layer = 3 AND f.index < 5 RETURN f.key AS key ORDER BY key",
    "MATCH (p:Feature)-[e:RESIDUAL]->(f:Feature) WHERE e.rank = 1 RETURN count(e) AS n",
    "MATCH (p)-[e:MLP|ATTENTION]->(f) RETURN type(e) AS kind, count(*) AS n ORDER BY kind",
    "MATCH (f:Feature {key: 'planted/3/res/0'})<-[:RESIDUAL*1..3]-(a) RETURN count(DISTINCT a) AS n",
    "MATCH path = (a:Feature)-[:RESIDUAL*2]->(b:Feature) RETURN length(path) AS hops LIMIT 3",
    "MATCH (f:Feature {key: 'planted/3/res/0'}), (g:Feature {key: 'planted/0/res/0'}) "
    "OPTIONAL MATCH p = shortestPath((g)-[:RESIDUAL*..4]->(f)) RETURN length(p) AS hops",
    "UNWIND range(1, 5) AS i RETURN i, i * i AS square",
    "UNWIND [3, 1, 2] AS x WITH x ORDER BY x RETURN collect(x) AS sorted",
    "WITH 'Planted' AS name RETURN toLower(name) AS lower, toUpper(name) AS upper, size(name) AS n",
    "MATCH (f:Feature) WITH f.module AS module, count(*) AS n WHERE n > 0 RETURN module, n ORDER BY module",
    "CALL { MATCH (f:Feature) RETURN f LIMIT 3 } RETURN count(f) AS n",
    "MATCH (s:SAE) CALL (s) { MATCH (f:Feature {pack: s.pack, layer: s.layer, module: s.module}) "
    "RETURN count(f) AS features } RETURN s.key AS sae, features ORDER BY sae",
    "RETURN [x IN range(1, 10) WHERE x % 2 = 0 | x * 10] AS evens",
    "RETURN reduce(total = 0, x IN [1, 2, 3] | total + x) AS total",
    "MATCH (f:Feature) RETURN avg(f.index) AS mean, min(f.index) AS low, max(f.index) AS high, "
    "stDev(f.index) AS spread",
    "MATCH (f:Residual) RETURN f.category AS category, count(*) AS n ORDER BY category",
    "MATCH (f:Feature) WHERE EXISTS { (f)<-[:MLP]-() } RETURN count(f) AS with_mlp_input",
    "MATCH (f:Feature) RETURN COUNT { (f)<-[:RESIDUAL]-() } AS preds ORDER BY preds DESC LIMIT 1",
    "MATCH (p:Pack) RETURN p.name AS name, p.status AS status",
    "MATCH (n) RETURN DISTINCT labels(n) AS labels ORDER BY labels",
    "CALL db.labels() YIELD label RETURN label ORDER BY label",
    "CALL db.relationshipTypes() YIELD relationshipType RETURN relationshipType ORDER BY relationshipType",
    "CALL db.propertyKeys() YIELD propertyKey RETURN count(propertyKey) AS n",
    "CALL db.schema.visualization() YIELD nodes RETURN size(nodes) AS n",
    "CALL db.schema.nodeTypeProperties() YIELD nodeType RETURN count(nodeType) AS n",
    "CALL db.schema.relTypeProperties() YIELD relType RETURN count(relType) AS n",
    "RETURN vector.similarity.cosine([1.0, 0.0], [1.0, 0.0]) AS same, point.distance(point({x: 0, y: 0}), "
    "point({x: 3, y: 4})) AS five, date('2025-01-02').year AS year",
    "MATCH (f:Feature) RETURN f.key AS key ORDER BY f.layer DESC, f.index SKIP 2 LIMIT 2",
    "MATCH (a)-[e]->(b) WHERE e.cosine > 0.9 RETURN count(*) AS strong",
    "MATCH (f:Feature) RETURN f.module AS module, collect(f.index)[..3] AS first ORDER BY module",
    "// a comment naming SHOW USERS and LOAD CSV\nRETURN 'CALL dbms.listConfig()' AS text, "
    "1 AS `/* not a comment */`",
    "MATCH (n:Feature) WHERE n.key STARTS WITH 'planted/0/' RETURN count(n) AS n UNION ALL "
    "MATCH (n:Feature) WHERE n.key STARTS WITH 'planted/1/' RETURN count(n) AS n",
    "EXPLAIN MATCH (n) RETURN n",
    "CYPHER runtime=slotted MATCH (f:Feature) RETURN count(f) AS n",
    "MATCH (f:Feature) WHERE f.pack = $pack RETURN count(f) AS n",
]
TEMPLATES = {
    "lineage": {"feature": "planted/3/res/0"}, "descendants": {"feature": "planted/0/res/0"},
    "flow-graph": {"feature": "planted/2/res/1"}, "steering-set": {"feature": "planted/2/res/1"},
    "origins": {"pack": "planted"}, "thresholds": {"pack": "planted"},
    "newborn": {"pack": "planted", "layer": 2}, "chains": {"pack": "planted"},
    "circuit": {"source": "planted/0/res/0", "target": "planted/3/res/0"},
    "label-search": {"text": "planted"}, "edges": {"pack": "planted"},
    "by-category": {"pack": "planted", "layer": 2, "category": "newborn"},
    "hubs": {"pack": "planted", "kind": "chain-end"},
    "family": {"feature": "planted/2/res/1"}, "splits": {"link": "planted--wide"},
    "new-features": {"link": "planted--wide"}, "lineage-across": {"feature": "planted/3/res/0"},
    "recurring-features": {}, "recurring-edges": {"scan": "gemma-2-2b"},
    "graphs-with": {"layer": "3", "feature_id": 42}, "strongest-paths": {"graph": "a-graph"},
}


def test_legitimate_reads_pass_and_answer_as_unguarded(stored):
    before = fingerprint(stored)
    for statement in LEGITIMATE:
        params = {"pack": "planted"} if "$pack" in statement else {}
        assert guard.read(stored, statement, params) == stored.read(statement, **params), statement
    assert len(LEGITIMATE) >= 30
    # Answers computed apart from Neo4j: the planted pack is 4 layers x 3 modules x 512 features.
    assert guard.read(stored, LEGITIMATE[0]) == [{"n": 4 * 3 * 512}]
    assert guard.read(stored, "UNWIND range(1, 5) AS i RETURN i, i * i AS square") == \
        [{"i": i, "square": i * i} for i in range(1, 6)]
    labels = [row["label"] for row in guard.read(stored, "CALL db.labels() YIELD label RETURN label")]
    assert {"Feature", "Residual", "Pack", "SAE"} <= set(labels)
    assert fingerprint(stored) == before


def test_project_templates_pass_the_guard(stored):
    assert set(TEMPLATES) == set(templates())
    for name, given in TEMPLATES.items():
        template = get_template(name)
        guard.check_read_only(stored, template.cypher, template.bind(given))


def test_fulltext_index_query_passes(writable):
    writable.write("CREATE FULLTEXT INDEX guard_keys IF NOT EXISTS FOR (f:Feature) ON EACH [f.key]")
    try:
        writable.write("CALL db.awaitIndexes(60)")
        rows = guard.read(writable, "CALL db.index.fulltext.queryNodes('guard_keys', 'planted') YIELD node "
                                  "RETURN count(node) AS n")
        assert rows == [{"n": 4 * 3 * 512}]
        guard.check_read_only(writable, "CALL db.index.fulltext.queryRelationships('guard_keys', 'x')")
    finally:
        writable.write("DROP INDEX guard_keys IF EXISTS")


def test_flowdb_cypher_is_guarded_and_answers_a_frame(stored):
    before = fingerprint(stored)
    frame = flowdb.cypher("MATCH (f:Feature {pack: $pack, layer: $layer, module: 'res'}) "
                          "RETURN f.index AS index, f.key AS key ORDER BY index LIMIT 3",
                          db=stored, pack="planted", layer=2)
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["index", "key"]
    assert frame.to_dict("records") == [{"index": i, "key": f"planted/2/res/{i}"} for i in range(3)]
    empty = flowdb.cypher("MATCH (f:Feature {pack: $pack}) RETURN f.layer AS layer, f.key AS key",
                          db=stored, pack="none")
    assert empty.empty and list(empty.columns) == ["layer", "key"]
    with pytest.raises(ReadOnlyRefused, match="read-only guard: Neo4j's planner says the statement writes"):
        flowdb.cypher("CREATE (:Feature {key: 'x'})", db=stored)
    with pytest.raises(ReadOnlyRefused, match="read-only guard: LOAD CSV reads files or URLs"):
        flowdb.cypher("LOAD CSV FROM 'file:///etc/passwd' AS row RETURN row", db=stored)
    assert fingerprint(stored) == before


def test_plugin_functions_in_the_plan_are_refused(db):
    """Functions a plugin adds are found in the server's printed plan, however spelled.

    The test server has no plugins, so a built-in function stands in for one."""
    assert guard.user_functions(db) == frozenset()
    for statement in ["RETURN toLower('A') AS a", "RETURN `toLower` ('A') AS a",
                      "MATCH (n) WHERE TOLOWER(n.key) = 'x' RETURN n",
                      "RETURN [x IN ['A'] | toLower(x)] AS a"]:
        summary = guard.explain(db, statement)
        assert guard.refusal(summary) is None
        assert "tolower" in guard.refusal(summary, frozenset({"tolower"})), statement
    assert guard.refusal(guard.explain(db, "RETURN 'toLower' AS a"), frozenset({"tolower"})) is None


def test_server_errors_are_one_line_in_the_users_positions(db):
    statement = "MATCH (n RETURN n"
    column = statement.index("RETURN") + 1
    with pytest.raises(StatementRejected) as caught:
        guard.check_read_only(db, statement)
    message = str(caught.value)
    assert "\n" not in message and f"(line 1, column {column} (offset: {column - 1}))" in message
    with pytest.raises(StatementRejected, match="one statement"):
        guard.check_read_only(db, "MATCH (n) RETURN n; MATCH (m) DETACH DELETE m")
    with pytest.raises(StatementRejected):
        guard.check_read_only(db, "PROFILE MATCH (n) RETURN n")


CLI_REFUSED = [
    "CALL`dbms`.listConfig() YIELD name RETURN name",
    "CALL dbms .listConfig()",
    "WITH 1 AS `//` CALL dbms.listConfig() YIELD name RETURN name",
    "WITH 1 AS `/*` CALL db.clearQueryCaches() YIELD value RETURN value",
    "SHOW DATABASES",
    "CALL db.clearQueryCaches()",
    "LOAD CSV FROM 'file:///etc/passwd' AS line RETURN line",
    "CREATE (:Scratch)",
    "MATCH (n) DETACH DELETE n",
    "MATCH (n) CALL (n) { SET n.x = 1 } IN TRANSACTIONS RETURN 1",
    "USE system SHOW USERS",
    "MATCH (n RETURN n",
]


def test_cli_refuses_in_one_line_and_writes_with_write(writable):
    before = fingerprint(writable)
    for statement in CLI_REFUSED:
        result = CliRunner().invoke(cli, ["cypher", statement])
        assert result.exit_code == 1 and result.stdout == "", (statement, result.output)
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
        assert fingerprint(writable) == before, statement
    # A real process too: the audit's first bypass, refused with no traceback.
    process = subprocess.run([sys.executable, "-m", "flowdb.cli", "cypher", CLI_REFUSED[0]],
                             capture_output=True, text=True)
    assert process.returncode == 1 and process.stdout == "" and "Traceback" not in process.stderr
    assert process.stderr.startswith("Error: read-only guard: procedure dbms.listConfig") \
        and process.stderr.count("\n") == 1 and "--write" in process.stderr
    read = CliRunner().invoke(cli, ["cypher", "MATCH (f:Feature) RETURN count(f) AS n", "--format", "csv"])
    assert read.exit_code == 0 and read.stdout == f"n\n{4 * 3 * 512}\n"
    wrote = CliRunner().invoke(cli, ["cypher", "CREATE (:Scratch)", "--write"])
    assert wrote.exit_code == 0, wrote.output
    assert fingerprint(writable)["nodes"] == before["nodes"] + 1


def test_parameters_may_have_any_name(stored):
    """A user's $timeout_s or $cypher is a query parameter, not an argument of flowdb's own."""
    result = CliRunner().invoke(cli, ["cypher", "RETURN $timeout_s AS t, $cypher AS c", "-p", "timeout_s=5",
                                      "-p", "cypher=x", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "5,x"
