"""Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no cut
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks, soak tests)

    def __post_init__(self):
        checks = (
            ("max_tokens", self.max_tokens, isinstance(self.max_tokens, int) and self.max_tokens >= 0, "an integer >= 0"),
            ("temperature", self.temperature, _finite(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", self.top_p, _finite(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("seed", self.seed, self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "an integer >= 0"),
        )
        for name, value, ok, accepted in checks:
            if not ok:
                raise ConfigError(f"{name}: {value!r} is not accepted; give {accepted}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [vocab] float32 on any device."""
        if self.params.greedy:
            return int(logits.argmax())
        return self.draw(self.probs(logits))

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution sampling draws from: temperature, then top-k, then top-p."""
        p = self.params
        logits = logits.float().cpu() / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return probs / probs.sum()
