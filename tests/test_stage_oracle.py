"""The demo model through `Stage` against transformers on the same GGUF."""

from __future__ import annotations

import pytest
import torch

from shardrt.errors import ConfigError
from shardrt.pipeline import Pipeline
from shardrt.stage import Stage

from .oracle import hf_greedy, hf_last_logits, load_hf_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
]
N_LAYERS = 30
GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def hf_model(demo_model):
    return load_hf_model(demo_model)


@pytest.fixture(scope="module")
def whole(demo_model):
    return Stage(demo_model, 0, N_LAYERS, "cpu", max_ctx=256)


def greedy(pipeline: Pipeline, ids: list[int], n: int) -> list[int]:
    pipeline.reset()
    logits = pipeline.forward(torch.tensor(ids), 0)
    tokens = []
    for _ in range(n):
        tokens.append(int(logits[-1].argmax()))
        logits = pipeline.forward(torch.tensor([tokens[-1]]), len(ids) + len(tokens) - 1)
    return tokens


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_and_greedy_match_transformers(prompt, whole, hf_model, demo_tokenizer):
    ids = demo_tokenizer.encode(prompt)
    whole.reset()
    ours = whole.forward(torch.tensor(ids), 0)[-1]
    theirs = hf_last_logits(hf_model, ids)
    assert (ours - theirs).abs().max().item() < 1e-3
    assert greedy(Pipeline([whole]), ids, GREEDY_TOKENS) == hf_greedy(hf_model, ids, GREEDY_TOKENS)


@pytest.mark.parametrize("cut", [1, 13, 29])
def test_two_chained_stages_equal_one(cut, demo_model, whole, demo_tokenizer):
    ids = demo_tokenizer.encode(PROMPTS[2])
    first = Stage(demo_model, 0, cut, "cpu", max_ctx=256)
    second = Stage(demo_model, cut, N_LAYERS, "cpu", max_ctx=256)
    assert first.span.embed and not first.span.head and second.span.head and not second.span.embed
    chained = Pipeline([first, second])
    whole.reset()
    expected = whole.forward(torch.tensor(ids), 0, all_logits=True)
    got = chained.forward(torch.tensor(ids), 0, all_logits=True)
    assert got.shape == expected.shape == (len(ids), 49152)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)
    assert greedy(chained, ids, 8) == greedy(Pipeline([whole]), ids, 8)


def test_decode_one_token_equals_prefill_of_all(whole, demo_tokenizer):
    ids = demo_tokenizer.encode(PROMPTS[0])
    whole.reset()
    full = whole.forward(torch.tensor(ids), 0, all_logits=True)
    whole.reset()
    whole.forward(torch.tensor(ids[:-1]), 0)
    step = whole.forward(torch.tensor(ids[-1:]), len(ids) - 1)
    assert torch.allclose(step[0], full[-1], atol=1e-4, rtol=0)


def test_truncate_rolls_back_to_an_earlier_state(whole, demo_tokenizer):
    ids = demo_tokenizer.encode(PROMPTS[1])
    whole.reset()
    whole.forward(torch.tensor(ids), 0)
    reference = whole.forward(torch.tensor([42]), len(ids))
    whole.forward(torch.tensor([7, 8, 9]), len(ids) + 1)
    whole.truncate(len(ids))
    assert whole.length == len(ids)
    again = whole.forward(torch.tensor([42]), len(ids))
    assert torch.allclose(again, reference, atol=1e-5, rtol=0)


def test_positions_beyond_the_cache_are_refused(demo_model):
    stage = Stage(demo_model, 0, N_LAYERS, "cpu", max_ctx=8)
    with pytest.raises(ConfigError, match="max_ctx 8"):
        stage.forward(torch.arange(9), 0)
    with pytest.raises(ConfigError, match="base_pos"):
        stage.forward(torch.arange(2), 5)
    with pytest.raises(ConfigError, match="kv_truncate"):
        stage.truncate(3)
    stage.forward(torch.arange(8), 0)  # still usable after the refusals
    assert stage.length == 8
