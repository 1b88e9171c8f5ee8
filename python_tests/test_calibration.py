"""Budgeted batch classification: threshold calibration, exit assignment, expected cost.

``loop_thresholds`` / ``loop_assign`` re-implement docs/MSDNET.md's procedure with plain Python
loops, straight from the text: walk the exits in order; at exit k take the samples not yet
exited, sort them by confidence at k, the threshold is the confidence of the
floor(n*P_k)-th (1-based); samples with confidence >= T_k exit; the last exit takes all.
"""

import math
import random

import pytest
import torch

from msdnet_ops.inference import (assign_exits, calibrate_thresholds, confidences, exit_counts,
                                  exit_predictions, exit_proportions, expected_cost)


def loop_proportions(q, K):
    w = [q ** k for k in range(1, K + 1)]
    return [v / sum(w) for v in w]


def loop_thresholds(probs, proportions):
    K, n = len(probs), len(probs[0])
    total = sum(proportions)
    P = [p / total for p in proportions]
    conf = [[max(row) for row in probs[k]] for k in range(K)]
    exited = [False] * n
    T = []
    for k in range(K - 1):
        m = math.floor(n * P[k])
        running = [i for i in range(n) if not exited[i]]
        running.sort(key=lambda i: conf[k][i], reverse=True)
        t = math.inf  # nobody selected
        if 1 <= m <= len(running):
            t = conf[k][running[m - 1]]
        T.append(t)
        for i in range(n):
            if not exited[i] and conf[k][i] >= t:
                exited[i] = True
    T.append(-math.inf)
    return T


def loop_assign(probs, T):
    K, n = len(probs), len(probs[0])
    out = []
    for i in range(n):
        for k in range(K):
            if k == K - 1 or max(probs[k][i]) >= T[k]:
                out.append(k)
                break
    return out


def random_probs(K, n, C, seed, quantize=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(K, n, C, generator=g, dtype=torch.float64) * 2.5, dim=-1)
    if quantize:
        p = torch.round(p * quantize) / quantize  # many ties
    return p.to(dtype)


# ---------------------------------------------------------------------------------------------
def test_exit_proportions():
    for q, K in [(0.05, 7), (0.5, 5), (1.0, 4), (1.95, 10), (1.3, 1)]:
        got = exit_proportions(q, K)
        assert got.dtype == torch.float64 and got.shape == (K,)
        torch.testing.assert_close(got, torch.tensor(loop_proportions(q, K), dtype=torch.float64))
        assert got.sum().item() == pytest.approx(1.0)
    # extremes do not underflow / overflow into NaN
    small, large = exit_proportions(1e-300, 6), exit_proportions(1e300, 6)
    assert torch.isfinite(small).all() and torch.isfinite(large).all()
    assert small[0].item() == pytest.approx(1.0) and large[-1].item() == pytest.approx(1.0)
    for bad in [0.0, -1.0, math.inf, math.nan, "x"]:
        with pytest.raises(ValueError, match="q"):
            exit_proportions(bad, 3)
    for bad in [0, -2, 2.0, True]:
        with pytest.raises(ValueError, match="K"):
            exit_proportions(0.5, bad)


@pytest.mark.parametrize("K,n,C,q,seed,quantize", [
    (7, 500, 100, 0.5, 0, None),
    (5, 257, 10, 1.95, 1, None),
    (4, 100, 10, 0.05, 2, None),
    (6, 333, 10, 1.0, 3, 20),     # heavy ties
    (3, 50, 4, 1.3, 4, 4),        # extreme ties
    (5, 3, 10, 1.0, 5, None),     # n < K
    (2, 1, 3, 0.7, 6, None),      # single sample
    (1, 40, 5, 0.7, 7, None),     # single exit
])
def test_thresholds_and_assignment_match_loop_reference(K, n, C, q, seed, quantize):
    probs = random_probs(K, n, C, seed, quantize)
    P = exit_proportions(q, K)
    T = calibrate_thresholds(probs, P)
    want = loop_thresholds(probs.tolist(), P.tolist())
    assert T.shape == (K,) and T.dtype == torch.float64
    assert T.tolist() == want
    exits = assign_exits(probs, T)
    assert exits.dtype == torch.int64
    assert exits.tolist() == loop_assign(probs.tolist(), want)
    # on a test split too
    test = random_probs(K, n + 17, C, seed + 100, quantize)
    assert assign_exits(test, T).tolist() == loop_assign(test.tolist(), want)


@pytest.mark.parametrize("q", [0.05, 0.3, 0.8, 1.0, 1.4, 1.95])
def test_distinct_confidences_realize_the_proportions_exactly(q):
    K, n = 6, 1000
    probs = random_probs(K, n, 10, 11, dtype=torch.float64)
    conf = confidences(probs)
    assert all(len(set(row.tolist())) == n for row in conf)
    P = exit_proportions(q, K)
    counts = exit_counts(assign_exits(probs, calibrate_thresholds(probs, P)), K).tolist()
    want = [math.floor(n * p) for p in P.tolist()[:-1]]
    assert counts[:-1] == want
    assert counts[-1] == n - sum(want)


def test_extreme_q():
    K, n = 5, 200
    probs = random_probs(K, n, 10, 3)
    conf0 = confidences(probs)[0].sort(descending=True).values
    # q tiny: everything planned for the first exit -> T_0 is the smallest confidence
    T = calibrate_thresholds(probs, exit_proportions(1e-20, K))  # P_0 == 1.0 in float64
    assert T[0].item() == conf0[-1].item()
    assert assign_exits(probs, T).tolist() == [0] * n
    # ... but floor(n * P_0) with P_0 = 1 - 1e-12 is n - 1: one sample goes on
    T = calibrate_thresholds(probs, exit_proportions(1e-12, K))
    assert T[0].item() == conf0[-2].item()
    assert exit_counts(assign_exits(probs, T), K)[0].item() == n - 1
    # q huge: nothing planned before the last exit
    T = calibrate_thresholds(probs, exit_proportions(1e12, K))
    assert torch.isinf(T[:-1]).all() and (T[:-1] > 0).all() and T[-1].item() == -math.inf
    assert assign_exits(probs, T).tolist() == [K - 1] * n


def test_ties_all_exit_together():
    K, n, C = 3, 10, 4
    probs = torch.full((K, n, C), 0.25)  # every confidence is 0.25
    T = calibrate_thresholds(probs, [0.1, 0.1, 0.8])  # one sample planned at exit 0
    assert T.tolist() == [0.25, math.inf, -math.inf]
    assert assign_exits(probs, T).tolist() == [0] * n


def test_n_smaller_than_k_with_uniform_proportions_sends_all_to_last_exit():
    probs = random_probs(6, 4, 5, 9)
    T = calibrate_thresholds(probs, torch.ones(6))  # floor(4/6) = 0 everywhere
    assert torch.isinf(T[:-1]).all()
    assert assign_exits(probs, T).tolist() == [5] * 4


def test_proportions_are_normalized_and_accept_lists_and_sequences():
    probs = random_probs(4, 120, 10, 13)
    a = calibrate_thresholds(probs, [1.0, 2.0, 1.0, 4.0])
    b = calibrate_thresholds(list(probs), torch.tensor([0.125, 0.25, 0.125, 0.5]))
    c = calibrate_thresholds(probs.double(), [0.0, 2.0, 3.0, 5.0])
    assert a.tolist() == b.tolist()
    assert c[0].item() == math.inf


def test_last_threshold_is_ignored_by_assignment():
    probs = random_probs(3, 50, 5, 21)
    exits = assign_exits(probs, [2.0, 2.0, 2.0])  # nobody reaches any threshold
    assert exits.tolist() == [2] * 50


def test_expected_cost_and_predictions():
    K, n = 4, 300
    probs = random_probs(K, n, 10, 5)
    T = calibrate_thresholds(probs, exit_proportions(0.7, K))
    exits = assign_exits(probs, T)
    costs = [15.1e6, 25.5e6, 37.1e6, 46.3e6]
    want = sum(costs[e] for e in exits.tolist()) / n
    assert expected_cost(exits, costs) == pytest.approx(want, rel=1e-12)
    pred = exit_predictions(probs, exits)
    assert pred.tolist() == [max(range(10), key=lambda c: probs[e, i, c].item())
                             for i, e in enumerate(exits.tolist())]
    assert expected_cost(torch.zeros(5, dtype=torch.long), [3.0, 9.0]) == 3.0


# ---------------------------------------------------------------------------------------------
def test_errors():
    probs = random_probs(3, 20, 5, 0)
    with pytest.raises(ValueError, match="probs"):
        calibrate_thresholds(probs[0], [1, 1, 1])  # [n, C]
    with pytest.raises(ValueError, match="n = 0"):
        calibrate_thresholds(probs[:, :0], [1, 1, 1])
    with pytest.raises(ValueError, match="proportions"):
        calibrate_thresholds(probs, [1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        calibrate_thresholds(probs, [0.5, -0.1, 0.6])
    with pytest.raises(ValueError, match="all zeros"):
        calibrate_thresholds(probs, [0, 0, 0])
    with pytest.raises(ValueError, match="finite"):
        calibrate_thresholds(probs, [math.nan, 1, 1])
    bad = probs.clone()
    bad[1, 3, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        calibrate_thresholds(bad, [1, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        assign_exits(bad, [0.5, 0.5, 0.0])
    with pytest.raises(TypeError):
        calibrate_thresholds(torch.ones(3, 4, 5, dtype=torch.long), [1, 1, 1])
    with pytest.raises(ValueError, match="thresholds"):
        assign_exits(probs, [0.5, 0.5])
    with pytest.raises(ValueError, match="thresholds"):
        assign_exits(probs, [0.5, math.nan, 0.1])
    with pytest.raises(ValueError, match="exit_costs"):
        expected_cost(torch.tensor([0, 1]), [[1.0, 2.0]])
    with pytest.raises(ValueError, match="exit_costs"):
        expected_cost(torch.tensor([0, 1]), [1.0, -2.0])
    with pytest.raises(ValueError, match="exit_indices"):
        expected_cost(torch.tensor([0, 2]), [1.0, 2.0])
    with pytest.raises(TypeError, match="exit_indices"):
        expected_cost(torch.tensor([0.0, 1.0]), [1.0, 2.0])
    with pytest.raises(ValueError, match="one per sample"):
        exit_predictions(probs, torch.zeros(7, dtype=torch.long))


def test_random_cases_against_loop_reference():
    rng = random.Random(1234)
    for trial in range(40):
        K, n, C = rng.randint(1, 6), rng.randint(1, 60), rng.randint(1, 6)
        quant = rng.choice([None, 3, 10])
        probs = random_probs(K, n, C, 1000 + trial, quant)
        props = [rng.choice([0.0, rng.random()]) for _ in range(K)]
        if sum(props) == 0:
            props[rng.randrange(K)] = 1.0
        T = calibrate_thresholds(probs, props)
        want = loop_thresholds(probs.tolist(), props)
        assert T.tolist() == want, (trial, K, n, props)
        assert assign_exits(probs, T).tolist() == loop_assign(probs.tolist(), want)
