"""Drafters: each proposes the next few tokens; the target verifies them in one forward.

All share one small interface, `propose(context, k)`, where `context` is every token so far
(its last one not yet in the target's cache):

- `NgramDrafter`: prompt lookup, no model: the tokens that followed the latest earlier
  occurrence of the context's last n tokens.
- `ModelDrafter`: a separate draft model with the same vocabulary, usually in its own daemon;
  it keeps its own KV cache and rolls it back to what the target accepted.
- `CaptureDrafter`: the DFlash conditioning path without trained weights. It reads the hidden
  state of a capture layer from the feature ring and projects it through the target's head (an
  early exit), feeding each draft token back through the target's first layers only.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..pipeline import Pipeline
from .feature_ring import FeatureRing
from .prefix_cache import common_prefix

DRAFTERS = ("ngram", "model", "capture")


class NgramDrafter:
    name = "ngram"
    capture_layers: tuple[int, ...] = ()

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def begin(self, prompt: list[int]) -> None:
        pass

    def propose(self, context: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            suffix = context[-n:]
            # the latest earlier occurrence, so the continuation is the freshest one
            for start in range(len(context) - n - 1, -1, -1):
                if context[start : start + n] == suffix:
                    follow = context[start + n : start + n + k]
                    if follow:
                        return follow
        return []


class ModelDrafter:
    name = "model"
    capture_layers: tuple[int, ...] = ()

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.cached: list[int] = []  # the tokens whose KV the draft holds

    def begin(self, prompt: list[int]) -> None:
        self.pipeline.reset()
        self.cached = []

    def propose(self, context: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        if len(context) + k > self.pipeline.max_ctx:
            return []  # the draft's cache is full: let the target decode alone
        keep = min(common_prefix(self.cached, context), len(context) - 1)  # re-run at least the last token
        self.pipeline.truncate(keep)
        token = self.pipeline.greedy(torch.tensor(context[keep:]), keep)
        proposals, pos = [token], len(context)
        while len(proposals) < k:
            token = self.pipeline.greedy(torch.tensor([token]), pos)
            proposals.append(token)
            pos += 1
        self.cached = context + proposals[:-1]
        return proposals


class CaptureDrafter:
    name = "capture"

    def __init__(self, target: Pipeline, ring: FeatureRing, layer: int, min_confidence: float = 0.5):
        if layer not in ring.layers:
            raise ConfigError(f"--capture-layers: the capture drafter needs layer {layer} in the feature ring")
        self.target, self.ring, self.layer = target, ring, layer
        self.min_confidence = min_confidence  # an early exit less sure than this is rarely accepted
        self.capture_layers = (layer,)

    def begin(self, prompt: list[int]) -> None:
        pass

    def propose(self, context: list[int], k: int) -> list[int]:
        if k <= 0 or len(context) + k > self.target.max_ctx:
            return []
        token, pos, proposals = context[-1], len(context) - 1, []
        for _ in range(k):
            hidden = self.target.early_exit(torch.tensor([token]), pos, self.layer)
            self.ring.write_one(self.layer, pos, hidden[-1])
            probs = torch.softmax(self.target.project(self.ring.read(self.layer, pos, 1))[-1], dim=-1)
            confidence, token = probs.max(dim=-1)
            if confidence.item() < self.min_confidence:
                break
            token = int(token)
            proposals.append(token)
            pos += 1
        return proposals
