"""The generation loop: prefill the prompt, then decode token by token until a stop."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .errors import ConfigError
from .pipeline import Pipeline
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_tokens) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes out of the prefill; the rest are one decode step each
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out["prefill_tokens_per_s"] = round(self.prefill_tokens_per_s, 2)
        out["decode_tokens_per_s"] = round(self.decode_tokens_per_s, 2)
        return out


class _StopText:
    """Finds stop strings in the growing text and holds back what could still become one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.emitted = 0

    def cut(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def ready(self, text: str, final: bool) -> str:
        end = len(text) if final else max(self.emitted, len(text) - self.hold)
        if not final:
            while end > self.emitted and text[end - 1] == "\ufffd":  # half of a multi-byte character
                end -= 1
        piece, self.emitted = text[self.emitted : end], max(self.emitted, end)
        return piece


def generate(pipeline: Pipeline, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
             on_text: Callable[[str], None] | None = None) -> Generation:
    if not prompt_ids:
        raise ConfigError("prompt: is empty; give at least one token of text")
    max_ctx = min(s.max_ctx for s in pipeline.stages)
    if len(prompt_ids) + params.max_tokens > max_ctx:
        raise ConfigError(f"prompt + max_tokens: {len(prompt_ids)} + {params.max_tokens} exceed max_ctx {max_ctx}")
    sample = Sampler(params)
    stop_text = _StopText(params.stop)
    pipeline.reset()

    def next_token(ids: list[int], base_pos: int) -> int:
        x = torch.tensor(ids, dtype=torch.long)
        return pipeline.greedy(x, base_pos) if params.greedy else sample(pipeline.forward(x, base_pos)[-1])

    t0 = time.perf_counter()
    token = next_token(prompt_ids, 0) if params.max_tokens else None
    t1 = time.perf_counter()

    tokens: list[int] = []
    text, finish = "", "length"
    while token is not None:
        if token in tokenizer.stop_ids and not params.ignore_eos:
            finish = "stop"
            break
        tokens.append(token)
        text = tokenizer.decode(tokens)
        cut = stop_text.cut(text)
        if cut is not None:
            text, finish = text[:cut], "stop"
            break
        if on_text:
            on_text(stop_text.ready(text, final=False))
        if len(tokens) >= params.max_tokens:
            break
        token = next_token([token], len(prompt_ids) + len(tokens) - 1)
    if on_text:
        on_text(stop_text.ready(text, final=True))
    t2 = time.perf_counter()
    return Generation(list(prompt_ids), tokens, text, finish, t1 - t0, t2 - t1)
