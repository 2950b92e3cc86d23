"""Shared fixtures: the real demo GGUF (fetched once into the cache) and its tokenizer."""

from __future__ import annotations

import pytest

from shardrt.demo_model import demo_model_path


@pytest.fixture(scope="session")
def demo_model():
    return demo_model_path(progress=False)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model):
    from shardrt.tokenizer import Tokenizer

    return Tokenizer(demo_model)
