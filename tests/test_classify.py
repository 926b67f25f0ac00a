import numpy as np
import pytest

from flowdb.classify import LayerThresholds, Thresholds, chance_cosine, classify
from helpers import ROOT

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


def quadrature_chance(q: float, n: int, d: int) -> float:
    """The q-quantile of the largest of n cosines to random unit vectors in d dimensions,
    from the density of one cosine, (1 - x^2)^((d - 3) / 2) on [-1, 1], integrated
    numerically (its constant too) and solved for F(t)^n = q: no Beta functions."""
    from scipy.integrate import quad
    from scipy.optimize import brentq

    def density(x):
        return (1.0 - x * x) ** ((d - 3) / 2)

    spread = 1 / np.sqrt(d)  # where the density lives: tell quad, so it samples the peak
    points = [-spread, 0.0, spread]
    total = quad(density, -1, 1, points=points, epsabs=0, epsrel=1e-12, limit=500)[0]

    def log_cdf_of_max(t):
        upper = quad(density, t, 1, points=[p for p in points if p > t], epsabs=0, epsrel=1e-12, limit=500)[0]
        return n * np.log1p(-upper / total)

    return brentq(lambda t: log_cdf_of_max(t) - np.log(q), 0.0, 0.99, xtol=1e-12)


@pytest.mark.parametrize("n, d", [(2048, 576), (16384, 2304), (300, 48), (1, 64), (24576, 768)])
@pytest.mark.parametrize("q", [0.9, 0.999, 0.9999])
def test_chance_tail_matches_numerical_integration(q, n, d):
    assert chance_cosine(q, n, d) == pytest.approx(quadrature_chance(q, n, d), abs=1e-6)


@pytest.mark.parametrize("q", [0.5, 0.999, 0.99999])
def test_chance_in_three_and_two_dimensions_is_closed_form(q):
    # In 3 dimensions a cosine is uniform on [-1, 1] (Archimedes); in 2 it is cos of a uniform angle.
    n = 50
    assert chance_cosine(q, n, 3) == pytest.approx(2 * q ** (1 / n) - 1, abs=1e-9)
    assert chance_cosine(q, n, 2) == pytest.approx(np.sin(np.pi * (q ** (1 / n) - 0.5)), abs=1e-9)


def test_docs_chance_levels():
    """The docs' p99.9 chance levels (explanation/chance.md) are what the null gives for the SAEs it names."""
    import re

    page = (ROOT / "docs" / "explanation" / "chance.md").read_text()
    said = re.search(r"p99\.9 is (0\.\d{3}) for Gemma Scope 16k in\s+d 2304, (0\.\d{3}) for 2,048 features in d 576",
                     page)
    assert said, "docs/explanation/chance.md no longer states the chance levels this test checks"
    gemma, small = float(said[1]), float(said[2])
    assert round(quadrature_chance(0.999, 16384, 2304), 3) == gemma == 0.110
    assert round(quadrature_chance(0.999, 2048, 576), 3) == small == 0.202
    assert round(chance_cosine(0.999, 16384, 2304), 3) == gemma
    assert round(chance_cosine(0.999, 2048, 576), 3) == small


def test_chance_p999_matches_a_large_simulation():
    """q 0.999, the quantile rule `auto` uses, by simulation: of 200,000 seeded maxima,
    a share of 0.001 (sd 0.00007) lies above it."""
    rng = np.random.default_rng(20261)
    n, d = 128, 64
    level = chance_cosine(0.999, n, d)
    above = sum(int((simulated_max_cosines(n, d, 20000, rng) > level).sum()) for _ in range(10))
    assert above / 200000 == pytest.approx(0.001, abs=0.0002)
