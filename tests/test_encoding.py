"""Prompts from many threads encoded together (server/encoding.py), with the demo model's real
tokenizer: each thread gets exactly what encoding its text alone gives, whatever it was batched
with, special tokens or not; an error reaches every request of its batch."""

from __future__ import annotations

import threading

import pytest

from shardrt.server.encoding import BatchedEncoder
from shardrt.server.engine import SharedTokenizer

SYSTEM = "You answer questions about a library's catalogue briefly and only from what you are told. " * 60


def texts(n: int) -> list[str]:
    return [f"{SYSTEM if i % 2 else ''}Question {i}: which shelf holds book {i}? héllo\n\n  <|im_end|>" for i in range(n)]


def test_many_threads_get_what_each_text_alone_gives(demo_tokenizer):
    encoder = BatchedEncoder(demo_tokenizer)
    got: dict[int, list[int]] = {}
    start = threading.Barrier(64, timeout=30)

    def one(i: int, text: str) -> None:
        start.wait()
        got[i] = encoder.encode(text, special=i % 3 == 0)

    threads = [threading.Thread(target=one, args=(i, t)) for i, t in enumerate(texts(64))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    for i, text in enumerate(texts(64)):
        alone = demo_tokenizer.encode(text) if i % 3 == 0 else demo_tokenizer.encode_rendered(text)
        assert got[i] == alone


def test_the_server_tokenizer_encodes_chats_as_the_tokenizer_does(demo_tokenizer):
    shared = SharedTokenizer(demo_tokenizer)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is book 7?"}]
    assert shared.encode_chat(messages) == demo_tokenizer.encode_chat(messages)
    assert shared.encode("The capital of France is") == demo_tokenizer.encode("The capital of France is")


def test_an_error_reaches_every_request_of_its_batch(demo_tokenizer):
    encoder = BatchedEncoder(demo_tokenizer)
    with pytest.raises(TypeError):
        encoder.encode(None, special=False)  # not text: the tokenizer refuses it
    assert encoder.encode("still works", special=False) == demo_tokenizer.encode_rendered("still works")
