"""Type-ahead search of feature labels through the full-text index on Explanation.description.

The user's text never reaches Lucene's query syntax as such: it is cut into words as the
index's standard analyzer cuts text (runs of letters and digits, kept whole across an inner
apostrophe or dot: "don't", "3.14"), lower-cased (so AND, OR and NOT are words, not
operators) and each word escaped. Every word must match; the last one as a prefix, so
"capit" finds "capital" while it is being typed.
"""

from __future__ import annotations

import logging
import re
import time

from flowdb.errors import DatabaseError, QueryError, QueryTimeout
from flowdb.store import graph
from flowdb.store.templates import checked_timeout

log = logging.getLogger("flowdb.search")
MAX_LIMIT = 200
MAX_WORDS = 32  # a type-ahead box holds a phrase, not a document
MAX_TEXT = 1_000  # characters of search text
# Letters in one word. The index's standard analyzer cuts a token at 255 characters (so a
# longer word would search for its pieces: 256 a's for "a"), and Lucene refuses a prefix
# query of some thousand letters ("input automaton is too large"); no label word comes near.
MAX_WORD = 100
# Lucene's best hits first: a short prefix matches half a million labels, and sorting and
# grouping them all took seconds (benchmarks/bench_explorer.py). A window of hits is read
# instead, widened when it yields fewer features than asked for (a pack filter, several
# explanations per feature), up to every hit.
FIRST_WINDOW = 4  # hits read per feature asked for, at first
WIDEN = 8
ALL_HITS = 2**31 - 1
WORD = re.compile(r"\w+(?:['’.]\w+)*")
LUCENE_SPECIAL = re.compile(r'([+\-&|!(){}\[\]^"~*?:\\/])')

SEARCH = f"""
CALL db.index.fulltext.queryNodes('{graph.EXPLANATION_TEXT_INDEX}', $query, {{limit: $window}}) YIELD node, score
WITH collect({{node: node, score: score}}) AS hits
CALL (hits) {{
  UNWIND hits AS hit
  WITH hit.node AS node, hit.score AS score
  MATCH (node)-[:EXPLAINS]->(f:Feature)
  WHERE $pack IS NULL OR f.pack = $pack
  WITH f, node, score ORDER BY score DESC, node.id
  WITH f, collect({{explanation: node, score: score}})[0] AS best
  ORDER BY best.score DESC, f.key
  LIMIT $limit
  RETURN collect({{key: f.key, pack: f.pack, layer: f.layer, module: f.module, index: f.index,
                  category: f.category, label: f.label, matched: best.explanation.description,
                  source: best.explanation.typeName, score: best.score,
                  url: COLLECT {{ MATCH (s:SAE {{key: f.pack + '/' + toString(f.layer) + '/' + f.module}})
                                 RETURN s.np_url + toString(f.index) }}[0]}}) AS rows
}}
RETURN size(hits) AS hits, rows
"""


def lucene_query(text: str) -> str | None:
    """The full-text query for `text`: every word required, the last a prefix; None when
    the text holds no word."""
    if len(text) > MAX_TEXT:
        raise QueryError(f"label search takes at most {MAX_TEXT} characters; got {len(text)}")
    words = WORD.findall(text.lower())
    if not words:
        return None
    if len(words) > MAX_WORDS:
        raise QueryError(f"label search takes at most {MAX_WORDS} words; got {len(words)}")
    longest = max(words, key=len)
    if len(longest) > MAX_WORD:
        raise QueryError(f"label search takes words of at most {MAX_WORD} characters; "
                         f"one has {len(longest)}")
    escaped = [LUCENE_SPECIAL.sub(r"\\\1", word) for word in words]
    # A prefix query scores every match alike; the whole word beside it ranks labels that
    # hold the word itself (more often, in shorter text) above those it only begins.
    escaped[-1] = f"({escaped[-1]} {escaped[-1]}*)"
    return " ".join("+" + word for word in escaped)


def search_labels(db, text: str, pack: str | None = None, limit: int = 20,
                  timeout_s: float | None = None) -> list[dict]:
    """Features whose explanations match `text` as it is typed, best first (Lucene's score,
    then key), one row per feature with its best-scoring matching explanation.

    Each row: key, pack, layer, module, index, category, label (the feature's best label),
    matched (the matching explanation), source (its typeName: "top-contexts" for flowdb's
    own, Neuronpedia's type such as "oai_token-act-pair", or None), score, url (Neuronpedia).
    """
    if not isinstance(text, str):
        raise QueryError(f"label search text must be a string, got {text!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}")
    seconds = checked_timeout(timeout_s)
    query = lucene_query(text)
    if query is None:
        return []
    if pack is not None:
        graph.require_pack(db, pack)
    try:
        window, deadline = FIRST_WINDOW * limit, time.monotonic() + seconds
        while True:  # the widening reads share one time limit
            left = deadline - time.monotonic()
            if left <= 0:
                raise QueryTimeout("label search ran out of time")
            answer = db.read(SEARCH, timeout_s=left, query=query, pack=pack, limit=limit, window=window)[0]
            if len(answer["rows"]) >= limit or answer["hits"] < window:  # enough, or every hit read
                return answer["rows"]
            window = min(window * WIDEN, ALL_HITS)
    except DatabaseError as exc:
        if isinstance(exc, QueryTimeout):
            raise QueryError(f"label search for {text!r} ran past its {seconds:g} s limit and was stopped; "
                             "type more of a word, or name a pack") from None
        # The index's own (Java) message says nothing a user can act on, and is not theirs to read.
        log.warning("label search for %r failed: %s", text[:200], exc)
        raise QueryError("the label index could not run this search; use fewer or shorter words") from None
