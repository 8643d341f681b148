"""Sampling: greedy, seeds, top-k/top-p against brute force, repetition penalty by hand, distributions."""

import numpy as np
import pytest

from cogvlm2_lite.runtime import sampling
from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.sampling import Sampler, SamplingParams

V = 128256


def _rows(b, v=V, scale=3.0, seed=0):
    return (np.random.default_rng(seed).standard_normal((b, v)) * scale).astype(np.float32)


def test_greedy_is_argmax():
    logits = _rows(4)
    ids = [Sampler()(row) for row in logits]
    assert ids == logits.argmax(axis=1).tolist()


def test_seed_reproduces_tokens_and_rows_are_independent():
    steps = _rows(20, v=5000, scale=1.0, seed=1)
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=100, seed=1234)

    def run(p):
        s = Sampler(p)
        return [s(row) for row in steps]

    a, b = run(params), run(params)
    assert a == b and len(set(a)) > 1
    assert run(SamplingParams(temperature=0.8, top_p=0.95, top_k=100, seed=99)) != a
    alone, neighbour = Sampler(params), Sampler(SamplingParams(temperature=1.0, seed=7))
    batched = [[alone(row), neighbour(row)][0] for row in steps]
    assert batched == a


def test_top_k_1_is_greedy():
    logits = _rows(5, scale=0.5, seed=2)
    s = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=0))
    assert [s(row) for row in logits] == logits.argmax(axis=1).tolist()


def test_top_k_matches_brute_force_and_keeps_ties():
    x = _rows(1, seed=3)[0]
    for k in (1, 7, 50, 600, 5000):  # 600 and 5000 exceed the block count: the full-partition path
        assert set(sampling._top_k(x, k).tolist()) == set(np.argsort(-x)[:k].tolist())
    t = np.array([1, 5, 5, 3, 5, 0], dtype=np.float32)
    assert sampling._top_k(t, 2).tolist() == [1, 2, 4]


def _brute_top_p(x, temperature, p):
    """HF's TopPLogitsWarper in float64: drop ascending tokens while their cumulative prob <= 1 - p."""
    z = np.exp((x.astype(np.float64) - x.max()) / temperature)
    probs = z / z.sum()
    order = np.argsort(probs)
    removed = np.cumsum(probs[order]) <= 1 - p
    removed[-1] = False
    return set(order[~removed].tolist())


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 8.0])  # flat (full sort) to peaked (short list)
def test_top_p_matches_brute_force(scale):
    for seed in range(4):
        x = _rows(1, v=20000, scale=scale, seed=10 + seed)[0]
        for p in (0.1, 0.5, 0.9, 0.99):
            z = np.exp((x - x.max()) / np.float32(0.7))
            assert set(sampling._top_p(z, p).tolist()) == _brute_top_p(x, 0.7, p)


def test_sampled_tokens_stay_inside_top_p_and_top_k():
    x = _rows(1, v=3000, scale=2.0, seed=4)[0]
    nucleus = _brute_top_p(x, 1.0, 0.5)
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=5))
    assert {s(x) for _ in range(500)} <= nucleus
    s = Sampler(SamplingParams(temperature=1.0, top_k=3, top_p=0.999, seed=5))
    assert {s(x) for _ in range(300)} == set(np.argsort(-x)[:3].tolist())


def test_repetition_penalty_by_hand():
    s = Sampler(SamplingParams(repetition_penalty=2.0), prompt_ids=[0])
    logits = np.array([2.0, -1.0, 1.5, 2.2], dtype=np.float32)
    # step 1: 0 seen -> [1.0, -1, 1.5, 2.2] -> 3; step 2: 3 seen -> 2.2/2 = 1.1 -> 2 (1.5);
    # step 3: 2 seen -> 0.75 -> [1.0, -1, 0.75, 1.1] -> 3
    assert [s(logits) for _ in range(3)] == [3, 2, 3]
    neg = Sampler(SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 0])
    assert neg(np.array([-1.0, -1.5], dtype=np.float32)) == 1  # -1 * 2 = -2 < -1.5
    late = Sampler(SamplingParams(repetition_penalty=2.0))
    assert late(logits) == 3
    late.observe([2, 2])  # observed after the first call: 3 and 2 both seen now
    assert late(logits) == 0  # [2.0, -1, 0.75, 1.1]
    assert np.array_equal(logits, np.array([2.0, -1.0, 1.5, 2.2], dtype=np.float32))  # input untouched


def test_temperature_to_zero_is_greedy():
    logits = _rows(3, v=1000, scale=1.0, seed=6)
    for t in (1e-7, 1e-3):
        s = Sampler(SamplingParams(temperature=t, seed=0))
        assert [s(row) for row in logits for _ in range(20)] == np.repeat(logits.argmax(axis=1), 20).tolist()


def _frequencies(params, x, n):
    s = Sampler(params)
    return np.bincount([s(x) for _ in range(n)], minlength=x.size) / n


def test_empirical_distribution_matches_softmax():
    x = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -3.0, 1.5, 0.7], dtype=np.float32)
    n = 20000
    want = np.exp(x / 0.7) / np.exp(x / 0.7).sum()
    got = _frequencies(SamplingParams(temperature=0.7, seed=11), x, n)
    assert np.all(np.abs(got - want) < 4 * np.sqrt(want * (1 - want) / n) + 1e-3)
    top3 = np.argsort(-x)[:3]
    want_k = np.zeros_like(want)
    want_k[top3] = want[top3] / want[top3].sum()
    got_k = _frequencies(SamplingParams(temperature=0.7, top_k=3, seed=12), x, n)
    assert np.all(np.abs(got_k - want_k) < 4 * np.sqrt(want_k * (1 - want_k) / n) + 1e-3)


def test_distribution_across_many_blocks():
    x = np.full(1000, -4.0, dtype=np.float32)  # heavy tokens in different 256-wide blocks
    x[[3, 255, 256, 700, 999]] = [2.0, 1.0, 1.5, 0.5, 2.5]
    want = np.exp(x) / np.exp(x).sum()
    n = 20000
    got = _frequencies(SamplingParams(temperature=1.0, seed=13), x, n)
    assert np.all(np.abs(got - want) < 4 * np.sqrt(want * (1 - want) / n) + 1e-3)


def test_search_cumsum_equals_numpy():
    rng = np.random.default_rng(14)
    for size in (1, 5, 256, 257, 1000, 5000):
        z = rng.random(size).astype(np.float32)
        z[rng.random(size) < 0.2] = 0
        c = np.cumsum(z, dtype=np.float64)
        for v in list(rng.random(20) * c[-1]) + [0.0, float(c[size // 2])]:
            for side in ("left", "right"):
                assert sampling._search_cumsum(z, v, side) == min(int(np.searchsorted(c, v, side)), size - 1)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"seed": -3}, "seed"), ({"seed": 1.5}, "seed"),
    ({"stop_ids": [1, -2]}, "stop_ids"), ({"stop_ids": ["eos"]}, "stop_ids"), ({"top_k": True}, "top_k"),
])
def test_validation(kwargs, field):
    with pytest.raises(UserError, match=field):
        SamplingParams(**kwargs)


def test_valid_params_are_normalised():
    p = SamplingParams(temperature=0.6, top_p=0.9, top_k=np.int64(5), seed=0, stop_ids=[128001, np.int64(128009)])
    assert p.stop_ids == (128001, 128009)
