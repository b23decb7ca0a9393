"""Spearman / Kendall tau-b against hand-computed and (if installed) SciPy values."""
import math

import numpy as np
import pytest

from quantlab.evaluation.ranking import kendall_tau_b, ranking_agreement, spearman


def test_perfect_reversed_and_constant():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_hand_computed_with_ties():
    # x ranks 1, 2.5, 2.5, 4; y ranks 1, 2, 3, 4 -> rho = 0.9487
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    # 5 concordant, 0 discordant, 1 tie in x: tau_b = 5 / sqrt(5 * 6)
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))


def test_matches_scipy_on_random_data():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.RandomState(0)
    for _ in range(5):
        a, b = rng.randint(0, 6, 30).astype(float), rng.randn(30)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-9)
        assert kendall_tau_b(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-9)


def test_ranking_agreement_top_k():
    full = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 1.0, "f": 0.0}
    proxy = {"a": 5.0, "b": 1.0, "c": 3.0, "d": 2.0, "e": 4.0, "f": 0.0, "extra": 9.0}
    out = ranking_agreement(proxy, full, top_k=2)
    assert out["layers"] == 6 and out["top_k_overlap"] == 0.5
    assert 0 < out["spearman"] < 1
