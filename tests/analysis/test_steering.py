import math

import pandas as pd
import pytest
from click.testing import CliRunner

from flowdb.analysis.steering import GenerationSpec, ProxyJudge, Steerer, SteeringSpec, coefficients, select_features
from flowdb.cli import cli

GEN = GenerationSpec(prompt="I think ", max_new_tokens=12, seed=3)


def test_coefficient_schedules():
    base = SteeringSpec("x", s=8.0, alpha=0.5, s_end=2.0)
    assert coefficients([4, 5, 7], SteeringSpec("x", schedule="constant", s=8.0)) == {4: 8.0, 5: 8.0, 7: 8.0}
    linear = coefficients([4, 5, 7], SteeringSpec("x", schedule="linear", s=8.0, s_end=2.0))
    assert linear == pytest.approx({4: 8.0, 5: 6.0, 7: 2.0})
    exponential = coefficients([4, 5, 7], base)
    assert exponential == pytest.approx({4: 8.0, 5: 8.0 * math.exp(-0.5), 7: 8.0 * math.exp(-1.5)})


def test_strategies_pick_from_the_steering_set():
    table = pd.DataFrame({"layer": [1, 1, 2, 3, 3], "role": ["ancestor", "input", "seed", "descendant", "input"],
                          "key": list("abcde")})
    assert select_features(table, SteeringSpec("c", strategy="initial"))["key"].tolist() == ["c"]
    assert select_features(table, SteeringSpec("c", strategy="single-layer", layer=1))["key"].tolist() == ["a", "b"]
    assert select_features(table, SteeringSpec("c", strategy="cumulative"))["key"].tolist() == ["a", "b", "c"]


@pytest.fixture
def steerer(ingested, smollm2):
    return Steerer(ingested, "tiny", model_and_tokenizer=smollm2)


def _seed_with_lineage(db):
    rows = db.read("MATCH (f:Feature {pack: 'tiny', layer: 3, module: 'res'})<-[e:RESIDUAL {rank: 1}]-() "
                   "RETURN f.key AS key ORDER BY e.cosine DESC LIMIT 1")
    return rows[0]["key"]


def test_steering_changes_text_and_identity_edits_do_not(steerer, ingested):
    seed = _seed_with_lineage(ingested)
    default_again = steerer.generate(GEN)
    assert steerer.generate(GEN) == default_again  # same sampling seed, same text
    strong = steerer.steer(SteeringSpec(seed, strategy="cumulative", s=8.0, t_res=0.0, t_mod=0.0), GEN)
    assert len(strong["features"]) > 1 and strong["steered"] != strong["default"]
    ids = steerer.tokenizer(GEN.prompt, return_tensors="pt").input_ids
    unchanged = steerer.edits(SteeringSpec(seed, method="deactivation", r=1.0), ids)  # r = 1 rescales by 1
    assert steerer.generate(GEN, unchanged) == default_again


def test_proxy_judge_prefers_the_theme(steerer):
    judge = ProxyJudge(steerer)
    theme = "physics: quantum gravity, particles and spacetime"
    on = judge.score(GEN.prompt, "quantum particles bend spacetime in gravity", theme, reference_ppl=50.0)
    off = judge.score(GEN.prompt, "bake the pasta with tomato sauce", theme, reference_ppl=50.0)
    assert on["behaviour"] > off["behaviour"] + 0.2
    assert 0 < on["coherence"] <= 1 and on["score"] == pytest.approx(on["behaviour"] * on["coherence"])


def test_steer_cli_side_by_side(ingested, tmp_path):
    seed = _seed_with_lineage(ingested)
    result = CliRunner().invoke(cli, ["steer", "tiny", "--seed-feature", seed, "--s", "6", "--prompt", "I think ",
                                      "--max-new-tokens", "8", "--theme", "python code"])
    assert result.exit_code == 0, result.output
    assert "default" in result.output and "| steered" in result.output and "proxy score steered" in result.output
