"""Prefix cache: KV snapshots of earlier requests, kept in numbered slots inside each stage.

A new prompt that shares a prefix with a cached slot restores that slot on every stage,
drops what does not match, and prefills only the rest. Least recently used slots go first.

A model with recurrent state (qwen35's DeltaNet layers) holds that state only at the end of a
snapshot, so an entry is reused whole or not at all; each request therefore also keeps a
snapshot of its prompt but the last token (`checkpoint_at`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ..errors import ConfigError


def common_prefix(a, b, at_least: int = 0) -> int:
    """How many leading tokens two sequences share. Slices of one type compare in C, so the
    answer is found by halving the range in doubt (a burst of requests behind one 1000-token
    system prompt asks this for every pair: a token-by-token loop cost ~50 ms of the engine's
    thread). With `at_least`, 0 is the answer as soon as the first at_least tokens differ."""
    if type(a) is not type(b):  # a tuple and a list are never equal
        a, b = list(a), list(b)
    lo, hi = 0, min(len(a), len(b))
    if at_least and (hi < at_least or a[:at_least] != b[:at_least]):
        return 0
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class PrefixStats:
    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0
    stores: int = 0  # snapshots taken

    def to_json(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "reused_tokens": self.reused_tokens, "stores": self.stores}


class PrefixCache:
    def __init__(self, pipeline, slots: int = 16):
        if not isinstance(slots, int) or slots < 0:
            raise ConfigError(f"--prefix-cache-slots: {slots!r} is not a whole number >= 0")
        self.pipeline, self.slots = pipeline, slots
        self.whole_only = pipeline.cfg.hybrid  # entries are reused whole: their recurrent state is at their end
        self.entries: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # slot -> tokens, oldest first
        self.stats = PrefixStats()

    def restore(self, prompt: list[int], seq: int = 0) -> int:
        """Set sequence `seq` of the pipeline up for `prompt`; returns how many of its tokens are
        already cached."""
        best_slot, best = None, 0
        for slot, tokens in self.entries.items():
            n = common_prefix(tokens, prompt)
            if self.whole_only and (n < len(tokens) or n >= len(prompt)):
                continue
            if n > best:
                best_slot, best = slot, n
        usable = min(best, len(prompt) - 1)  # at least one token must run, for the next logits
        if best_slot is None or usable <= 0:
            self.stats.misses += 1
            self.pipeline.reset(seq)
            return 0
        self.pipeline.kv_restore(best_slot, seq)
        self.pipeline.truncate(usable, seq)
        self.entries.move_to_end(best_slot)
        self.stats.hits += 1
        self.stats.reused_tokens += usable
        return usable

    def store(self, tokens: list[int], seq: int = 0) -> None:
        """Snapshot sequence `seq` of the pipeline's cache, which holds exactly `tokens`."""
        if self.slots == 0 or not tokens:
            return
        held = self.pipeline.length_of(seq)
        if held != len(tokens):
            raise ConfigError(f"prefix cache: sequence {seq} holds {held} tokens, not {len(tokens)}")
        # a slot whose tokens this extends (an earlier turn of the same chat) is replaced; where
        # entries are reused whole, only one of the very same tokens
        slot = next((s for s, t in self.entries.items() if common_prefix(t, tokens) == len(t)
                     and (not self.whole_only or len(t) == len(tokens))), None)
        if slot is None:
            if len(self.entries) >= self.slots:
                oldest, _ = self.entries.popitem(last=False)
                self.pipeline.kv_free(oldest)
                slot = oldest
            else:
                slot = next(s for s in range(self.slots) if s not in self.entries)
        self.pipeline.kv_snapshot(slot, seq)
        self.stats.stores += 1
        self.entries[slot] = tuple(tokens)
        self.entries.move_to_end(slot)

    def checkpoint_at(self, prompt: list[int], reused: int) -> int | None:
        """Where the prefill of `prompt` (its first `reused` tokens restored) stops for a snapshot
        of its own (`store`), before running its last token: where entries are reused whole, the
        point a later prompt that repeats this one, or shares it but not the answer, restarts
        from. None: no stop."""
        end = len(prompt) - 1
        return end if self.whole_only and self.slots and end > reused else None
