import pytest
import torch

from engine.sampling import SamplingParams, sample


def _logits(rows=4, vocab=1000, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax():
    logits = _logits()
    assert sample(logits, [SamplingParams()] * 4, [0, 1, 2, 3]) == logits.argmax(-1).tolist()


def test_seeded_sampling_depends_only_on_seed_and_index():
    logits = _logits(1)
    p = SamplingParams(temperature=1.0, seed=1234)
    draws = [sample(logits, [p], [k])[0] for k in range(20)]
    again = [sample(logits, [p], [k])[0] for k in range(20)]
    assert draws == again
    # Same (seed, k) in a different batch position and batch gives the same token.
    batch = torch.cat([_logits(2, seed=5), logits])
    assert sample(batch, [SamplingParams(), SamplingParams(), p], [0, 0, 7])[2] == draws[7]
    assert len(set(draws)) > 1  # k changes the randomness
    other_seed = [sample(logits, [SamplingParams(temperature=1.0, seed=99)], [k])[0] for k in range(20)]
    assert other_seed != draws


def test_unseeded_sampling_is_fresh():
    logits = torch.zeros(1, 1000)
    p = SamplingParams(temperature=1.0)
    assert len({sample(logits, [p], [0])[0] for _ in range(10)}) > 1


def test_tiny_top_p_is_argmax():
    logits = _logits()
    p = SamplingParams(temperature=5.0, top_p=1e-6, seed=3)
    assert sample(logits, [p] * 4, [0, 1, 2, 3]) == logits.argmax(-1).tolist()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    assert {sample(logits, [p], [k])[0] for k in range(200)} == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.8, 0.2]]))
    p = SamplingParams(temperature=1.0, seed=11)
    ones = sum(sample(logits, [p], [k])[0] for k in range(2000))
    assert 300 < ones < 500


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": "x"}, "seed"),
])
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
