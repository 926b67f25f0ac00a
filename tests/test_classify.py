import numpy as np
import pytest

from flowdb.classify import LayerThresholds, Thresholds, classify

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
    lt = t.for_layer(3, s_res, rng.uniform(0, 1, 1000), np.full(1000, NAN))
    assert (s_res >= lt.t_res).mean() == pytest.approx(0.75, abs=0.01)
    assert np.isnan(lt.t_att)


def test_per_layer_override_wins():
    t = Thresholds.from_mapping({"t_res": 0.5, "layer": {"4": {"t_res": 0.7}}})
    empty = np.zeros(3)
    assert t.for_layer(4, empty, empty, empty).t_res == 0.7
    assert t.for_layer(5, empty, empty, empty).t_res == 0.5


def test_bad_threshold_table():
    with pytest.raises(ValueError, match="rule must be one of"):
        Thresholds.from_mapping({"rule": "median"})
