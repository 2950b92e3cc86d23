"""The generation loop: prefill the prompt, then decode token by token until a stop."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .errors import ConfigError
from .pipeline import Pipeline
from .sampling import Sampler, SamplingParams
from .tokenizer import TextStream, Tokenizer


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled"
    prefill_seconds: float
    decode_seconds: float
    prefilled_tokens: int = 0  # prompt tokens actually run (the rest came from the prefix cache)
    reused_tokens: int = 0
    spec: dict | None = None
    pflash: dict | None = None  # what speculative prefill did to the prompt (pflash.Report), when it ran

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
        for optional in ("spec", "pflash"):
            if out[optional] is None:
                del out[optional]
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


class Decoding:
    """The text side of one generation: takes tokens one at a time, ends at EOS, a stop string or
    max_tokens, streams the text that can no longer change, and gives the final text."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, on_text: Callable[[str], None] | None = None):
        self.tokenizer, self.params, self.on_text = tokenizer, params, on_text
        self.tokens: list[int] = []
        self.text, self.finish = "", "length"
        self._stream, self._stop_text, self._cut = TextStream(tokenizer), _StopText(params.stop), False

    def commit(self, token: int) -> bool:
        """Take one token; False when generation ends."""
        if token in self.tokenizer.stop_ids and not self.params.ignore_eos:
            self.finish = "stop"
            return False
        self.tokens.append(token)
        self.text = self._stream.update(self.tokens)
        cut = self._stop_text.cut(self.text)
        if cut is not None:
            self.text, self.finish, self._cut = self.text[:cut], "stop", True
            return False
        if self.on_text:
            self.on_text(self._stop_text.ready(self.text, final=False))
        return len(self.tokens) < self.params.max_tokens

    def close(self) -> str:
        """The final text (sent on as the last piece of the stream)."""
        if not self._cut:
            text = self.tokenizer.decode(self.tokens)  # whole, with a character the stream may still hold back
            cut = self._stop_text.cut(text)
            self.text = text[:cut] if cut is not None else text
        if self.on_text:
            self.on_text(self._stop_text.ready(self.text, final=True))
        return self.text


@dataclass
class SpecStats:
    drafter: str
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    committed: int = 0  # tokens committed by decode steps (each verify commits accepted + 1)

    def to_json(self) -> dict:
        return {"drafter": self.drafter, "drafted": self.drafted, "accepted": self.accepted,
                "target_forwards": self.target_forwards,
                "acceptance_length": round(self.committed / self.target_forwards, 3) if self.target_forwards else 0.0,
                "accept_rate": round(self.accepted / self.drafted, 3) if self.drafted else 0.0}


@dataclass
class Handover:
    """A generation stopped between two steps so that it can go on elsewhere (in the batch of
    `serve`): its KV holds the prompt and every token but the last, which is still to be fed."""

    out: Decoding
    sampler: Sampler
    reused: int  # prompt tokens restored from the prefix cache
    started: float  # perf_counter at the start, and when the first token was out
    prefill_done: float


class _DraftBudget:
    """How many tokens to draft next: more after a fully accepted draft, half after a rejected
    one, and none for a while once drafting stops paying, with a one-token probe now and then."""

    PROBE_EVERY = 8

    def __init__(self, most: int):
        self.most, self.now, self.idle = most, most, 0

    def next(self) -> int:
        if self.now > 0:
            return self.now
        self.idle += 1
        return 1 if self.idle % self.PROBE_EVERY == 0 else 0

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        if accepted == drafted:
            self.now = min(self.most, max(self.now, drafted) + 1)
        elif accepted == 0:
            self.now //= 2
        else:
            self.now = max(1, accepted)


class _Verifier:
    """Runs one target forward over [last token] + draft and decides what to commit."""

    def __init__(self, pipeline: Pipeline, sampler: Sampler, capture: tuple[int, ...], ring):
        self.pipeline, self.sampler, self.capture, self.ring = pipeline, sampler, capture, ring

    def feed(self, prompt: list[int], pos: int) -> None:
        """Prompt tokens into the cache (from `pos`) with no token sampled after them."""
        _, captured = self.pipeline.greedy_all(torch.tensor(prompt, dtype=torch.long), pos, capture=self.capture)
        self._keep(captured)

    def prefill(self, prompt: list[int], pos: int) -> int:
        """The first token after the prompt (its positions from `pos` on)."""
        x = torch.tensor(prompt, dtype=torch.long)
        if self.sampler.params.greedy:
            tokens, captured = self.pipeline.greedy_all(x, pos, capture=self.capture)
            self._keep(captured)
            return tokens[-1]
        logits, captured = self.pipeline.run(x, pos, capture=self.capture)
        self._keep(captured)
        return self.sampler(logits[-1])

    def __call__(self, block: list[int], pos: int) -> tuple[int, list[int]]:
        """(number of draft tokens accepted, tokens to commit) for `block` at `pos`."""
        x = torch.tensor(block, dtype=torch.long)
        draft = block[1:]
        if self.sampler.params.greedy:
            target, captured = self.pipeline.greedy_all(x, pos, all_logits=bool(draft), capture=self.capture)
            self._keep(captured)
            accepted = 0
            while accepted < len(draft) and draft[accepted] == target[accepted]:
                accepted += 1
            return accepted, draft[:accepted] + [target[accepted] if draft else target[-1]]
        logits, captured = self.pipeline.run(x, pos, all_logits=bool(draft), capture=self.capture)
        self._keep(captured)
        # speculative sampling with a deterministic draft: accept d with probability p(d),
        # else draw from p with d removed; the committed tokens follow p exactly
        for i, d in enumerate(draft):
            probs = self.sampler.probs(logits[i])
            if self.sampler.uniform() < probs[d].item():
                continue
            probs[d] = 0.0
            return i, draft[:i] + [self.sampler.draw(probs / probs.sum())]
        return len(draft), draft + [self.sampler.draw(self.sampler.probs(logits[-1]))]

    def _keep(self, captured) -> None:
        if self.ring is not None and captured:
            self.ring.write(captured)


def generate(pipeline: Pipeline, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
             on_text: Callable[[str], None] | None = None, *, drafter=None, draft_tokens: int = 4,
             prefix_cache=None, ring=None, cancelled: Callable[[], bool] | None = None,
             handover: Callable[[], bool] | None = None) -> Generation | Handover:
    """Prefill (reusing a cached prefix where one matches), then decode until a stop.

    With a drafter, each decode step verifies up to `draft_tokens` proposals in one target
    forward and rolls the KV of every stage back past the first rejected one; greedy output is
    the same token for token as plain decoding. When `handover()` turns true between two steps,
    the generation stops there and returns its `Handover` instead.
    """
    if not prompt_ids:
        raise ConfigError("prompt: is empty; give at least one token of text")
    if len(prompt_ids) + params.max_tokens > pipeline.max_ctx:
        raise ConfigError(f"prompt + max_tokens: {len(prompt_ids)} + {params.max_tokens} exceed max_ctx {pipeline.max_ctx}")
    sampler = Sampler(params)
    out = Decoding(tokenizer, params, on_text)
    capture = tuple(sorted(set(ring.layers))) if ring is not None else ()
    verify = _Verifier(pipeline, sampler, capture, ring)
    spec = SpecStats(drafter.name) if drafter is not None else None
    budget = _DraftBudget(draft_tokens)

    t0 = time.perf_counter()
    if prefix_cache is not None:
        reused = prefix_cache.restore(prompt_ids)
    else:
        pipeline.reset()
        reused = 0
    tokens = out.tokens
    pending: list[int] = []
    if params.max_tokens:
        start = reused
        stop = prefix_cache.checkpoint_at(prompt_ids, reused) if prefix_cache is not None else None
        if stop is not None:
            verify.feed(prompt_ids[reused:stop], reused)
            prefix_cache.store(prompt_ids[:stop])
            start = stop
        pending = [verify.prefill(prompt_ids[start:], start)]
    if drafter is not None:
        drafter.begin(prompt_ids)
    t1 = time.perf_counter()

    going = True
    while going and pending:
        if cancelled is not None and cancelled():
            out.finish = "cancelled"
            break
        for token in pending:
            going = out.commit(token)
            if not going:
                break
        if not going:
            break
        if handover is not None and handover():
            return Handover(out, sampler, reused, t0, t1)
        context = list(prompt_ids) + tokens
        pos = len(context) - 1  # the last token is not in the cache yet
        room = min(params.max_tokens - len(tokens) - 1, pipeline.max_ctx - len(context) - 1)
        k = min(budget.next(), room) if drafter is not None else 0
        draft = drafter.propose(context, k) if k > 0 else []
        accepted, pending = verify([context[-1]] + draft, pos)
        budget.update(len(draft), accepted)
        if draft:
            pipeline.truncate(pos + 1 + accepted)
        if spec is not None:
            spec.drafted += len(draft)
            spec.accepted += accepted
            spec.target_forwards += 1
            spec.committed += len(pending)
    text = out.close()
    t2 = time.perf_counter()

    if prefix_cache is not None and params.max_tokens:
        held = min(pipeline.length, len(prompt_ids) + len(tokens))
        pipeline.truncate(held)
        prefix_cache.store((list(prompt_ids) + tokens)[:held])
    return Generation(list(prompt_ids), tokens, text, out.finish, t1 - t0, t2 - t1,
                      prefilled_tokens=len(prompt_ids) - reused if params.max_tokens else 0, reused_tokens=reused,
                      spec=spec.to_json() if spec is not None else None)
