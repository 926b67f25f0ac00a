"""Offline top-contexts labels and the steering comparison on the tiny demo pack."""

from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flowdb.analysis.pack_model import open_pack
from flowdb.analysis.top_contexts import ContextsSpec, clear_theme, label_with_contexts, theme
from flowdb.cli import cli
from flowdb.lm.hooks import capture
from flowdb.lm.texts import token_windows

SPEC = ContextsSpec(windows=8, top=6)


def test_labels_are_the_top_activating_tokens(ingested, smollm2):
    from flowdb.analysis.top_contexts import pick_seeds
    from flowdb.errors import FlowdbError

    with pytest.raises(FlowdbError, match="labels contexts tiny"):
        pick_seeds(ingested, "tiny", 3)  # no labels yet: no seed has a theme
    report = label_with_contexts(ingested, "tiny", SPEC, model_and_tokenizer=smollm2)
    assert report.saes == 9 and report.explanations + report.silent == 9 * 512
    model, tokenizer = smollm2
    windows = token_windows(tokenizer, SPEC.texts, SPEC.windows, SPEC.context, SPEC.seed)
    with torch.no_grad(), capture(model, ["blocks.3.hook_mlp_out"]) as acts:
        model(windows)
    codes = open_pack(ingested, "tiny").sae(3, "mlp").encode(acts["blocks.3.hook_mlp_out"][:, 1:].reshape(-1, 576))
    tokens = windows[:, 1:].reshape(-1)
    checked = 0
    for index in np.flatnonzero((codes > 0).sum(0).numpy() >= SPEC.top)[:5]:
        order = torch.argsort(codes[:, index], descending=True)[:SPEC.top]
        words = Counter(tokenizer.decode([int(tokens[i])]).strip() for i in order)
        rows = ingested.read("MATCH (f:Feature {key: $key})<-[:EXPLAINS]-(e:Explanation) "
                             "RETURN f.label AS label, e.typeName AS type, e.score AS score",
                             key=f"tiny/3/mlp/{index}")
        assert len(rows) == 1 and rows[0]["type"] == "top-contexts"
        top_word, count = words.most_common(1)[0]
        assert rows[0]["score"] == pytest.approx(count / SPEC.top)
        assert theme(rows[0]["label"]).split(", ")[0] in {w for w, c in words.items() if c == count}
        strongest = tokenizer.decode([int(tokens[order[0]])])
        assert f"[{strongest}]".replace("\n", "\\n") in rows[0]["label"]
        checked += 1
    assert checked


def test_clear_theme():
    assert clear_theme('import, from | "os [import] sys"', 0.75)
    assert not clear_theme('import, from | "os [import] sys"', 0.25)  # no single token explains it
    assert not clear_theme('(, ) | "f[(]x"', 1.0)  # punctuation is no theme to steer towards
    assert theme('import, from | "os [import] sys"') == "import, from"


def test_steering_comparison(ingested, smollm2, tmp_path):
    from flowdb.analysis.steering import (
        GenerationSpec,
        Steerer,
        SteeringSpec,
        compare,
        compare_summary,
        compare_verdict,
    )

    label_with_contexts(ingested, "tiny", SPEC, model_and_tokenizer=smollm2)
    seed = ingested.read("MATCH (f:Feature {pack: 'tiny', layer: 4, module: 'res'})<-[e:RESIDUAL {rank: 1}]-() "
                         "WHERE f.label IS NOT NULL RETURN f.key AS key, f.label AS label "
                         "ORDER BY e.cosine DESC LIMIT 1")[0]
    steerer = Steerer(ingested, "tiny", model_and_tokenizer=smollm2)
    table = compare(steerer, [(seed["key"], theme(seed["label"]))], SteeringSpec(seed["key"]),
                    GenerationSpec(prompt="I think ", max_new_tokens=4), [1.0, 8.0], generations=2)
    assert len(table) == 2 + 3 * 2 * 2  # unsteered, then strategies x strengths, 2 generations each
    assert table["score"].between(0, 1).all()
    assert (table["score"] == table["behaviour"] * table["coherence"]).all()
    cumulative = table[table["strategy"] == "cumulative"]
    assert (cumulative["layers"] >= table.loc[table["strategy"] == "initial", "layers"].max()).all()
    summary = compare_summary(table)
    assert len(summary) == 1 + 3 * 2 and (summary["score_lo"] <= summary["score"]).all()
    verdict = compare_verdict(summary)
    assert set(verdict["strategy"]) == {"initial", "single-layer", "cumulative"}
    # Removal: r = 1 changes nothing, so the texts are the unsteered ones and behaviour is
    # 1 - the theme similarity those texts scored above.
    removal = compare(steerer, [(seed["key"], theme(seed["label"]))], SteeringSpec(seed["key"], method="deactivation"),
                      GenerationSpec(prompt="I think ", max_new_tokens=4), [1.0], generations=2,
                      strategies=("cumulative",))
    unsteered = table[table["strategy"] == "none"].reset_index(drop=True)
    kept = removal[removal["strategy"] == "cumulative"].reset_index(drop=True)
    assert list(kept["text"]) == list(unsteered["text"])
    assert kept["behaviour"].to_numpy() == pytest.approx(1 - unsteered["behaviour"].to_numpy(), abs=1e-6)
    out = tmp_path / "steering.png"
    result = CliRunner().invoke(cli, ["validate", "steering", "tiny", "--seeds", seed["key"], "--strengths", "2,8",
                                      "--generations", "2", "--max-new-tokens", "3", "--out", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "proxy score" in result.output and out.exists()
