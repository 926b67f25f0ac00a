import numpy as np
import pytest

from flowdb.classify import LayerThresholds, Thresholds, chance_cosine, classify

NAN = np.nan


@pytest.mark.parametrize("s_res, s_mlp, s_att, expected", [
    (0.9, 0.1, 0.1, "translated"),
    (0.9, 0.3, 0.1, "processed"),
    (0.9, 0.1, 0.3, "processed"),
    (0.2, 0.3, 0.1, "newborn"),
    (NAN, 0.1, 0.9, "newborn"),       # first layer: no R_{L-1}
    (0.2, 0.1, 0.1, "from-nowhere"),
    (NAN, NAN, NAN, "from-nowhere"),
    (0.5, 0.15, NAN, "processed"),    # at the threshold counts as high
])
def test_categories_follow_the_paper(s_res, s_mlp, s_att, expected):
    t = LayerThresholds(0.5, 0.15, 0.15)
    result = classify(np.array([s_res]), np.array([s_mlp]), np.array([s_att]), t)
    assert result[0] == expected


def test_quantile_rule_splits_each_layer_at_its_own_quantile():
    rng = np.random.default_rng(0)
    s_res = rng.uniform(0.6, 0.9, 1000)  # a layer whose scores all sit above 0.5
    t = Thresholds(rule="quantile", q_res=0.25, q_mod=0.5)
    lt = t.for_layer(3, {"res": s_res, "mlp": rng.uniform(0, 1, 1000), "att": np.full(1000, NAN)}, {})
    assert (s_res >= lt.t_res).mean() == pytest.approx(0.75, abs=0.01)
    assert np.isnan(lt.t_att)


def test_per_layer_override_wins():
    t = Thresholds.from_mapping({"t_res": 0.5, "layer": {"4": {"t_res": 0.7}}})
    empty = {place: np.zeros(3) for place in ("res", "mlp", "att")}
    assert t.for_layer(4, empty, {}).t_res == 0.7
    assert t.for_layer(5, empty, {}).t_res == 0.5


def test_bad_threshold_table():
    expected = r"rule in \[classify\]: input should be 'auto', 'fixed', 'chance' or 'quantile'"
    with pytest.raises(ValueError, match=expected):
        Thresholds.from_mapping({"rule": "median"})


def simulated_max_cosines(n, d, trials, rng):
    """Largest cosine of a unit vector to n random unit vectors, `trials` times. By
    symmetry the query may be e_1: a random unit vector's cosine to it is
    g_1 / sqrt(g_1^2 + chi^2_{d-1}), with g_1 standard normal."""
    first = rng.standard_normal((trials, n))
    rest = rng.chisquare(d - 1, size=(trials, n))
    return (first / np.sqrt(first ** 2 + rest)).max(axis=1)


@pytest.mark.parametrize("n, d", [(300, 48), (2048, 576)])
def test_chance_level_matches_a_simulation(n, d):
    rng = np.random.default_rng(1)
    simulated = simulated_max_cosines(n, d, 20000, rng)
    for q in (0.5, 0.95, 0.99):
        empirical = np.quantile(simulated, q)
        assert chance_cosine(q, n, d) == pytest.approx(empirical, abs=0.004), q
    # The exact quantile sits where the simulated CDF says it should.
    assert (simulated <= chance_cosine(0.9, n, d)).mean() == pytest.approx(0.9, abs=0.01)


def test_auto_rule_lifts_only_the_cut_offs_below_chance():
    empty = {place: np.zeros(3) for place in ("res", "mlp", "att")}
    small = Thresholds().for_layer(5, empty, {"res": (2048, 576), "mlp": (2048, 576), "att": (2048, 576)})
    assert small.t_res == 0.5  # the paper's 0.5 is far above chance in d 576
    assert small.t_mlp == small.t_att == pytest.approx(chance_cosine(0.999, 2048, 576))
    assert small.t_mlp > 0.15 and small.rule == "auto: chance p99.9 for mlp, att"
    gemma = Thresholds().for_layer(5, empty, {"res": (16384, 2304), "mlp": (16384, 2304), "att": (16384, 2304)})
    assert (gemma.t_res, gemma.t_mlp, gemma.t_att, gemma.rule) == (0.5, 0.15, 0.15, "auto: fixed")
    fixed = Thresholds(rule="fixed").for_layer(5, empty, {"mlp": (2048, 576)})
    assert fixed.t_mlp == 0.15 and fixed.rule == "fixed"
