"""Prompts from many HTTP threads encoded together.

A burst of requests used to encode its prompts one after another behind the tokenizer's lock
(~1.5 ms for a 1,000-token prompt, and the tokenizer holds the GIL while it runs), so the last
of 64 requests that share a system prompt reached the engine ~100 ms late. Here a thread that
finds no encode under way becomes the leader: it takes every text waiting, its own among them,
and encodes them in one `encode_batch` (the Rust tokenizer leaves the GIL and uses every core),
then the texts that arrived meanwhile, for at most MAX_ROUNDS batches; the other threads wait
for their result, and one of them leads next if texts are still waiting.
"""

from __future__ import annotations

import threading

MAX_ROUNDS = 4  # batches a leader encodes before it hands the lead on (its own text is in the first)
WAIT_S = 1.0  # a waiting thread looks again this often (a leader always wakes it when done)


class _Text:
    def __init__(self, text: str, special: bool):
        self.text, self.special = text, special
        self.ids: list[int] | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.ids is not None or self.error is not None

    def result(self) -> list[int]:
        if self.error is not None:
            raise self.error
        return self.ids


class BatchedEncoder:
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cond = threading.Condition()
        self._waiting: list[_Text] = []
        self._leading = False

    def encode(self, text: str, special: bool) -> list[int]:
        """`text`'s token ids (`special`: with the tokenizer's special tokens), encoded in a batch
        with whatever other threads are encoding at the same time."""
        mine = _Text(text, special)
        with self._cond:
            self._waiting.append(mine)
            while not mine.done and self._leading:
                self._cond.wait(WAIT_S)
            if mine.done:
                return mine.result()
            self._leading = True
        try:
            for _ in range(MAX_ROUNDS):
                with self._cond:
                    batch, self._waiting = self._waiting, []
                if not batch:
                    break
                self._encode(batch)
                with self._cond:
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._leading = False
                self._cond.notify_all()
        return mine.result()

    def _encode(self, batch: list[_Text]) -> None:
        for special in (False, True):
            texts = [t for t in batch if t.special == special]
            if not texts:
                continue
            try:
                for t, ids in zip(texts, self._tokenizer.encode_many([t.text for t in texts], special)):
                    t.ids = ids
            except Exception as exc:  # each waiting request gets the error, as its own encode would have
                for t in texts:
                    t.error = exc
