"""Sampling rules on hand-made logits, where the right answer is known exactly."""

from __future__ import annotations

import pytest
import torch

from shardrt.errors import ConfigError
from shardrt.sampling import Sampler, SamplingParams

LOGITS = torch.tensor([0.0, 5.0, 4.9, 1.0, -3.0])


def draws(params: SamplingParams, n: int = 400) -> set[int]:
    sample = Sampler(params)
    return {sample(LOGITS) for _ in range(n)}


def test_greedy_is_argmax():
    assert draws(SamplingParams(), 5) == {1}


def test_top_k_two_keeps_the_two_best():
    assert draws(SamplingParams(temperature=1.0, top_k=2, seed=0)) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS, -1)
    assert probs[1] < 0.6 < probs[1] + probs[2]
    assert draws(SamplingParams(temperature=1.0, top_p=0.6, seed=0)) == {1, 2}
    assert draws(SamplingParams(temperature=1.0, top_p=0.3, seed=0)) == {1}


def test_high_temperature_reaches_every_token():
    assert draws(SamplingParams(temperature=50.0, seed=1), 2000) == {0, 1, 2, 3, 4}


def test_seed_repeats_the_sequence():
    a, b = Sampler(SamplingParams(temperature=1.0, seed=3)), Sampler(SamplingParams(temperature=1.0, seed=3))
    assert [a(LOGITS) for _ in range(50)] == [b(LOGITS) for _ in range(50)]


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
    ("max_tokens", -1), ("seed", -5), ("temperature", "hot"),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**{field: value})
