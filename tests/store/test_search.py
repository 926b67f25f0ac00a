import re

import pytest

from conftest import build_labelled
from flowdb.errors import FlowdbError, QueryError
from flowdb.store.labels import import_labels
from flowdb.store.search import search_labels
from helpers import export_row, write_export

NP = "https://www.neuronpedia.org/planted-model"
# (source, index, description): explanations of the planted pack's features.
EXPLANATIONS = [
    ("2-planted-res", 0, "capital cities of Europe"),
    ("2-planted-res", 1, "capitalization of words"),
    ("1-planted-mlp", 3, "Capital letters"),
    ("2-planted-res", 4, "the capital AND (letters)"),
    ("2-planted-res", 5, "<script>alert(1)</script> markup"),
    ("2-planted-res", 6, 'quoted "text" with back\\slash'),
    ("2-planted-res", 7, "wildcard * and tilde ~ signs"),
    ("3-planted-res", 8, "capital gains tax"),
    ("3-planted-res", 8, "capital punishment"),  # a second explanation of the same feature
    *[("3-planted-res", 100 + n, f"filler concept {n}") for n in range(30)],
]


def key_of(source, index):
    layer, _, module = source.split("-")
    return f"planted/{layer}/{module}/{index}"


def expected_keys(text, pack_rows=EXPLANATIONS):
    """Independently: features with an explanation holding every word of `text`, the last as a prefix."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    if not words:
        return set()
    found = set()
    for source, index, description in pack_rows:
        tokens = re.findall(r"[a-z0-9]+", description.lower())
        if all(w in tokens for w in words[:-1]) and any(t.startswith(words[-1]) for t in tokens):
            found.add(key_of(source, index))
    return found


def build_searchable(db, folder, pack_dir):
    build_labelled(db, folder, pack_dir)
    rows = {}
    for n, (source, index, description) in enumerate(EXPLANATIONS):
        rows.setdefault(source, []).append(export_row(n, source, index, description))
    write_export(folder, rows)
    import_labels(db, folder)
    # A second pack, so that the pack filter has something to leave out.
    db.write("CREATE (:Pack {name: 'other', model: 'm', status: 'complete', k: 1, first_layer: 0, "
             "last_layer: 0, layers_done: [0], plan: '{}'})"
             "-[:HAS_SAE]->(:SAE {key: 'other/0/res', pack: 'other', layer: 0, module: 'res'}) "
             "CREATE (:Explanation {id: 'o1', description: 'capital of another pack', typeName: 'top-contexts'})"
             "-[:EXPLAINS]->(:Feature:Residual {key: 'other/0/res/0', pack: 'other', layer: 0, module: 'res', "
             "index: 0, label: 'capital of another pack'})")
    db.write("CALL db.awaitIndexes(300)")


@pytest.fixture
def searchable(shared_graph, planted_pack):
    """Built once and shared: every test here only searches."""
    return shared_graph(build_searchable, planted_pack[0])


def check_order(rows):
    for before, after in zip(rows, rows[1:]):
        assert (-before["score"], before["key"]) < (-after["score"], after["key"])


def test_prefix_of_the_last_word_and_every_word_required(searchable):
    db = searchable
    for text in ("capit", "CAPITAL", "capital let", "capital letters", "letters capital", "capital gains t",
                 "cities europ", "tax capital gai"):
        rows = search_labels(db, text, pack="planted", limit=200)
        assert {row["key"] for row in rows} == expected_keys(text), text
        check_order(rows)
    assert {row["key"] for row in search_labels(db, "capit", pack="planted")} >= {
        "planted/2/res/0", "planted/2/res/1", "planted/1/mlp/3"}
    assert search_labels(db, "capitals", pack="planted") == []  # a whole word that is no word's prefix


def test_one_row_per_feature_with_its_columns(searchable):
    db = searchable
    rows = search_labels(db, "capital", pack="planted")
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)) == len(expected_keys("capital"))
    by_key = {row["key"]: row for row in rows}
    both = by_key["planted/3/res/8"]
    assert both["matched"] in ("capital gains tax", "capital punishment")
    assert search_labels(db, "capital gains", pack="planted")[0]["matched"] == "capital gains tax"
    mlp = by_key["planted/1/mlp/3"]
    assert {name: mlp[name] for name in ("pack", "layer", "module", "index", "label", "matched", "source")} == {
        "pack": "planted", "layer": 1, "module": "mlp", "index": 3, "label": "Capital letters",
        "matched": "Capital letters", "source": "oai_token-act-pair"}
    assert mlp["url"] == f"{NP}/1-planted-mlp/3"
    assert mlp["category"] is None  # MLP features are not classified
    res = by_key["planted/2/res/0"]
    stored = db.read("MATCH (f:Feature {key: 'planted/2/res/0'}) RETURN f.category AS c")[0]["c"]
    assert res["category"] == stored and res["category"] in ("translated", "processed", "newborn", "from-nowhere")
    assert res["url"] == f"{NP}/2-planted-res/0" and res["score"] > 0


@pytest.mark.parametrize("text", ["<script>", "<script>alert(1)</script>", '"text"', 'quoted "', "back\\slash",
                                  "back\\", "AND (", "capital AND", "(capital OR letters", "-capital", "capital~2",
                                  "wildcard *", "*", "~", "\\", '"', "capital:", "tilde~", "[a TO z]", "let^2",
                                  "capital && letters", "! capital", "/capital/", "capital?"])
def test_special_characters_are_words_or_nothing(searchable, text):
    rows = search_labels(searchable, text, pack="planted", limit=200)
    assert {row["key"] for row in rows} == expected_keys(text)
    check_order(rows)


def test_special_characters_find_what_they_spell(searchable):
    db = searchable
    assert [r["key"] for r in search_labels(db, "<script>", pack="planted")] == ["planted/2/res/5"]
    assert [r["key"] for r in search_labels(db, 'with "text', pack="planted")] == ["planted/2/res/6"]
    # AND and OR are words here, not Lucene's operators: "or" is in no explanation.
    assert search_labels(db, "capital OR letters", pack="planted") == []
    assert {r["key"] for r in search_labels(db, "capital AND", pack="planted")} == {"planted/2/res/4"}


def test_blank_text_and_limit_bounds(searchable):
    db = searchable
    assert search_labels(db, "") == [] and search_labels(db, "   \n") == []
    filler = sorted(key_of("3-planted-res", 100 + n) for n in range(30))
    rows = search_labels(db, "filler", pack="planted", limit=5)
    assert [r["key"] for r in rows] == filler[:5]  # equal scores: by key
    assert len(search_labels(db, "filler", limit=200)) == 30
    for bad in (0, 201, -1, True, 2.5, "5"):
        with pytest.raises(QueryError, match="limit must be an integer from 1 to 200"):
            search_labels(db, "filler", limit=bad)
    with pytest.raises(QueryError, match="at most 32 words"):
        search_labels(db, " ".join(["word"] * 33))


def test_pack_filter(searchable):
    db = searchable
    everywhere = {r["key"] for r in search_labels(db, "capital", limit=200)}
    assert everywhere == expected_keys("capital") | {"other/0/res/0"}
    other = search_labels(db, "capital", pack="other")
    assert [(r["key"], r["source"], r["url"]) for r in other] == [("other/0/res/0", "top-contexts", None)]
    with pytest.raises(FlowdbError, match="no pack named 'nope'.*stored packs: other, planted"):
        search_labels(db, "capital", pack="nope")


def test_time_limit_is_checked(searchable):
    with pytest.raises(QueryError, match="timeout_s must be a number of seconds"):
        search_labels(searchable, "capital", timeout_s=0)
    assert search_labels(searchable, "capital", pack="other", timeout_s=5)[0]["key"] == "other/0/res/0"


def test_a_whole_word_ranks_above_words_it_only_begins(searchable):
    rows = search_labels(searchable, "capital", pack="planted")
    whole = [re.search(r"\bcapital\b", row["matched"].lower()) is not None for row in rows]
    assert whole.count(False) == 1 and whole[-1] is False  # "capitalization" comes last
