"""The oracle table against the obvious computation on a hand-made loss table."""

import math

import pytest

from idp_core.lab.oracle import summarise

NAMES = ["a", "b"]
LOSSES = {"a": [1.0, 2.0, 3.0, 1.5], "b": [2.0, 1.0, 3.2, 1.0], "none": [3.0, 3.0, 4.0, 2.0]}
SOURCES = ["a", "b", "x", "b"]
PICKS = {"good": ["a", "b", "a", "a"], "stuck": ["b", "b", "b", "b"]}


def test_summary_matches_hand_computation():
    s = summarise(NAMES, LOSSES, SOURCES, PICKS, num=200)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    best = min(NAMES, key=lambda p: mean(LOSSES[p]))
    oracle = [min(LOSSES[p][w] for p in NAMES) for w in range(4)]
    assert s["best_single"] == best == "b"
    assert s["oracle_loss"] == pytest.approx(mean(oracle))
    headroom = mean(LOSSES[best]) - mean(oracle)
    assert s["headroom_nats"][0] == pytest.approx(headroom)
    assert s["headroom_nats"][1] <= s["headroom_nats"][0] <= s["headroom_nats"][2]
    good = [LOSSES[p][w] for w, p in enumerate(PICKS["good"])]
    assert s["rules"]["good"]["loss"] == pytest.approx(mean(good))
    assert s["rules"]["good"]["capture"][0] == pytest.approx(
        (mean(LOSSES[best]) - mean(good)) / headroom, abs=1e-5)
    assert s["rules"]["stuck"]["capture"][0] == pytest.approx(0.0, abs=1e-5)
    assert s["rules"]["good"]["agreement"] == 0.75  # window 3: the oracle takes b
    assert s["rules"]["stuck"]["pick_share"] == {"a": 0.0, "b": 1.0}
    assert s["rules"]["good"]["minus_best_perplexity"][0] == pytest.approx(
        math.exp(mean(good)) - math.exp(mean(LOSSES[best])), abs=1e-4)
    assert s["by_source"]["b"]["own_pick"] == {"good": 0.5, "stuck": 1.0}
    assert s["own_domain_pick"] == pytest.approx({"good": 2 / 3, "stuck": 2 / 3}, abs=1e-4)
    assert s["oracle_pick_share"] == {"a": 0.5, "b": 0.5}
