import numpy as np
import pytest
from click.testing import CliRunner

from flowdb.analysis.groups import GROUPS, GroupsSpec, activation_groups, token_activity
from flowdb.analysis.pack_model import open_pack
from flowdb.cli import cli

SPEC = GroupsSpec(samples=12, tokens_per_sample=4, top_k=(1, 3), seed=5)


def test_groups_match_a_direct_count(ingested, smollm2):
    db = ingested
    table = activation_groups(db, "tiny", SPEC, model_and_tokenizer=smollm2)
    for (_layer, _k), part in table.groupby(["layer", "top_k"]):
        assert part["share"].sum() == pytest.approx(1.0)
        assert list(part["group"]) == list(GROUPS)
    # Independently: feature by feature, token by token, from the stored edges.
    active = token_activity(open_pack(db, "tiny"), *smollm2, SPEC)
    edges = db.read("MATCH (s:Feature)-[e]->(d:Feature {pack: 'tiny', layer: 3, module: 'res'}) "
                    "WHERE e.rank = 1 RETURN d.index AS d, s.module AS m, s.index AS s")
    pred = {(r["d"], r["m"]): r["s"] for r in edges}
    expected = np.zeros(8, dtype=int)
    res = active[(3, "res")]
    for token, feature in zip(*np.nonzero(res)):
        code = (1 * bool(active[(2, "res")][token, pred[(feature, "res")]])
                + 2 * bool(active[(3, "mlp")][token, pred[(feature, "mlp")]])
                + 4 * bool(active[(3, "att")][token, pred[(feature, "att")]]))
        expected[code] += 1
    got = table[(table["layer"] == 3) & (table["top_k"] == 1)]["count"].to_numpy()
    assert (got == expected).all()
    first = table[(table["layer"] == 2) & (table["top_k"] == 1)].set_index("group")["count"]
    assert first["From RES"] == 0  # layer 2 is the pack's first: no R_{L-1}
    stored = db.read("MATCH (f:Feature {pack: 'tiny', layer: 3, module: 'res'}) WHERE f.groups_top1 IS NOT NULL "
                     "RETURN f.groups_top1 AS g")
    assert np.sum([r["g"] for r in stored], axis=0).tolist() == expected.tolist()
    top3 = table[(table["layer"] == 3) & (table["top_k"] == 3)].set_index("group")["count"]
    assert top3["From nowhere"] <= expected[0]  # more candidates can only explain more


def test_groups_cli_plots(ingested, tmp_path):
    out = tmp_path / "groups.png"
    result = CliRunner().invoke(cli, ["groups", "tiny", "--samples", "8", "--top-k", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "From RES & MLP" in result.output and out.stat().st_size > 10_000
    bad = CliRunner().invoke(cli, ["groups", "tiny", "--top-k", "9"])
    assert bad.exit_code == 2 and "exceeds the pack's k=5" in bad.output
