"""Speculative prefill (PFlash): a small drafter reads a long prompt and keeps what matters.

The coordinator's side. The drafter lives in its own pinned daemon (any backend); it prefills
the prompt in chunks and scores every token by the attention its last window of queries pays it
(attention_scores.py, op `score_prompt`). Here those scores become a selection: smoothed over
neighbouring tokens, cut into chunks, the best chunks taken until `keep` of the prompt's tokens
are spent, always with the first tokens, the scoring window at the end and the user's final turn.
The boundary between drafter and target is text: the kept tokens are turned back into the
prompt's text they came from, and the target's tokenizer encodes that, so the two models need
not share a vocabulary. docs/PFLASH.md describes the method and its parameters.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError

log = logging.getLogger(__name__)

PFLASH_MAX_CTX = 32768  # the drafter's KV cache: its trained context, at most this
# tokens the drafter's GPU stage prefills in one launch of each layer: a drafter's layers are small,
# and in chunks of 1024 a 16K prompt cost ~40 us a token of launching (an H200's drafter took
# longer than the 8B target's own prefill of the whole prompt)
PFLASH_PREFILL = 8192


@dataclass(frozen=True)
class Scoring:
    """How the drafter scores and how the selection keeps (docs/PFLASH.md)."""

    window: int = 32  # the prompt's last tokens: their queries do the scoring, and they are always kept
    head: int = 16  # the first tokens: always kept, and left out of the scores (attention sinks)
    chunk: int = 16  # tokens are kept in whole chunks of this many
    smooth: int = 9  # scores are averaged over this many neighbouring tokens first
    prefill_chunk: int = PFLASH_PREFILL  # the drafter prefills the prompt this many tokens at a time
    first_layer: float = 1 / 6  # layers scored: the drafter's global-attention layers from this height up
    last_layer: float = 0.7  # ... up to this height; the drafter's prefill stops there (its upper layers never run)

    def __post_init__(self):
        if not 0 <= self.first_layer <= self.last_layer <= 1:
            raise ConfigError(f"pflash scoring: layers from {self.first_layer} to {self.last_layer} of the drafter's "
                              "height; give 0 <= first_layer <= last_layer <= 1")


@dataclass(frozen=True)
class PromptText:
    """A prompt as text, which the drafter reads, with where its user's final turn begins.

    `turn_start`: the character where the final user turn begins (0 for a plain prompt: all of it
    is the turn); `line_start`: where that turn's last line begins. `chat`: written by the chat
    template (so the target encodes it without adding special tokens of its own)."""

    text: str
    turn_start: int = 0
    line_start: int = 0
    chat: bool = False

    @classmethod
    def plain(cls, text: str) -> "PromptText":
        return cls(text, 0, _last_line(text, 0, len(text)))

    @classmethod
    def from_chat(cls, tokenizer, messages: list[dict]) -> "PromptText":
        """The conversation as the target's chat template writes it; the final turn is the content
        of the last user message (found in the rendered text), up to the end."""
        text = tokenizer.render_chat(messages)
        users = [m["content"] for m in messages if m.get("role") == "user" and m.get("content")]
        start = text.rfind(users[-1]) if users else -1
        if start < 0:  # a template that rewrites the content: only the end of the text is kept for sure
            return cls(text, len(text), len(text), chat=True)
        return cls(text, start, _last_line(text, start, start + len(users[-1])), chat=True)


def _last_line(text: str, start: int, end: int) -> int:
    """Where the last non-empty line of text[start:end] begins."""
    body = text[start:end].rstrip()
    return start + body.rfind("\n") + 1


@dataclass
class Report:
    """What PFlash did to one prompt, for `--json` and the server's responses."""

    prompt_tokens: int  # the target's tokens of the whole prompt
    kept_tokens: int  # the target's tokens of the kept text (what it prefills)
    drafter_ms: float  # tokenizing, the drafter's prefill and scoring, the selection
    kept_text: str
    passed_through: str | None = None  # why the prompt went to the target unchanged
    drafter_tokens: int = 0  # the drafter's tokens of the prompt, and of those it kept
    drafter_kept: int = 0

    @property
    def keep_ratio(self) -> float:
        return self.kept_tokens / self.prompt_tokens if self.prompt_tokens else 1.0

    def to_json(self, target_prefill_seconds: float) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "kept_tokens": self.kept_tokens,
                "keep_ratio": round(self.keep_ratio, 4), "drafter_ms": round(self.drafter_ms, 1),
                "target_prefill_ms": round(target_prefill_seconds * 1000, 1), "kept_text": self.kept_text,
                "passed_through": self.passed_through, "drafter_tokens": self.drafter_tokens,
                "drafter_kept": self.drafter_kept}


# -- the selection: scores -> kept positions ------------------------------------------------

def forced_tail(n: int, budget: int, turn_token: int, line_token: int, s: Scoring) -> int:
    """Where the always-kept end of the prompt begins: the user's final turn when it fits the
    budget, else its last line when that does, else the scoring window alone."""
    room = budget - s.head
    for start in (turn_token, line_token):
        if n - start <= room:
            return min(start, n - s.window)
    return n - s.window


def select(scores: torch.Tensor, budget: int, tail: int, s: Scoring) -> torch.Tensor:
    """Which positions to keep: a bool mask [n]. The first `s.head` and those from `tail` on
    always; then whole chunks of `s.chunk` by their mean smoothed score, best first, while the
    budget (tokens in all) lasts. A chunk partly kept already costs only its other tokens."""
    n = scores.shape[0]
    kept = torch.zeros(n, dtype=torch.bool)
    kept[: s.head] = True
    kept[tail:] = True
    room = budget - int(kept.sum())
    if room <= 0:
        return kept
    smooth = s.smooth if s.smooth % 2 else s.smooth + 1  # centred
    smoothed = F.avg_pool1d(scores.float()[None, None], smooth, 1, smooth // 2, count_include_pad=False)[0, 0]
    chunks = []
    for start in range(0, n, s.chunk):
        free = ~kept[start : start + s.chunk]
        cost = int(free.sum())
        if cost:
            chunks.append((float(smoothed[start : start + s.chunk][free].mean()), start, cost))
    for _, start, cost in sorted(chunks, key=lambda c: (-c[0], c[1])):
        if cost <= room:
            kept[start : start + s.chunk] = True
            room -= cost
        if room <= 0:
            break
    return kept


def runs(kept: torch.Tensor) -> list[tuple[int, int]]:
    """The kept positions as [start, stop) runs, in order."""
    out: list[tuple[int, int]] = []
    for i in torch.nonzero(kept).flatten().tolist():
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def kept_text(text: str, offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> str:
    """The prompt's text under the kept token runs, in order (the exact characters those tokens
    were read from: what decoding them gives, without splitting a character at a run's edge).
    Where a gap would glue two words together, a space goes between."""
    pieces = []
    for start, stop in spans:
        marks = [o for o in offsets[start:stop] if o[1] > o[0]]  # special tokens added by the tokenizer have none
        if not marks:
            continue
        piece = text[min(a for a, _ in marks) : max(b for _, b in marks)]
        if pieces and not pieces[-1][-1:].isspace() and not piece[:1].isspace():
            pieces.append(" ")
        pieces.append(piece)
    return "".join(pieces)


def token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """The first token whose text ends after character `char` (len(offsets) if none does)."""
    return next((i for i, (_, end) in enumerate(offsets) if end > char), len(offsets))


# -- the coordinator's handle -----------------------------------------------------------------

class Compressor:
    """Compresses prompts through the drafter's daemon (a RemoteStage holding all its layers)."""

    def __init__(self, stage, tokenizer, keep: float, min_prompt: int, scoring: Scoring | None = None):
        self.stage, self.tokenizer = stage, tokenizer
        self.keep, self.min_prompt = keep, min_prompt
        self.scoring = scoring or Scoring()
        self.layers = scored_layers(stage.cfg, self.scoring.first_layer, self.scoring.last_layer)

    @property
    def max_ctx(self) -> int:
        return self.stage.max_ctx

    def warm_up(self) -> None:
        """Score one throwaway prompt of two prefill chunks, so that the kernels of a long prompt
        (its scoring products, attention over keys before the chunk) are loaded and chosen at
        load time: on an H200 the first 16K prompt's drafter took ~360 ms, the next ones ~180."""
        s = self.scoring
        n = min(self.max_ctx, PFLASH_PREFILL + 2 * s.window)
        if n > s.head + s.window + s.chunk:
            self.stage.score_prompt(torch.zeros(n, dtype=torch.long), window=s.window, skip=s.head,
                                    chunk=s.prefill_chunk, layers=self.layers)

    def applies(self, prompt_tokens: int) -> bool:
        return prompt_tokens > self.min_prompt

    def compress(self, prompt: PromptText, prompt_ids: list[int], target) -> tuple[list[int], Report]:
        """The target's token ids to prefill for `prompt` (whose target tokens are `prompt_ids`),
        and the report. A prompt of at most min_prompt tokens, or one longer than the drafter's
        context, goes through unchanged, the report saying why."""
        t0 = time.perf_counter()
        n_target = len(prompt_ids)
        if not self.applies(n_target):
            return prompt_ids, self._unchanged(prompt, n_target, f"prompt of {n_target} tokens is not longer than "
                                                                  f"min_prompt {self.min_prompt}")
        encoded = self.tokenizer.hf(prompt.text, return_offsets_mapping=True, add_special_tokens=not prompt.chat)
        ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
        n, s = len(ids), self.scoring
        if n > self.max_ctx:
            return prompt_ids, self._unchanged(prompt, n_target, f"prompt of {n} drafter tokens is longer than the "
                                                                  f"drafter's context of {self.max_ctx}")
        if n <= s.head + s.window + s.chunk:
            return prompt_ids, self._unchanged(prompt, n_target, f"prompt of {n} drafter tokens is too short to "
                                                                  "score")
        scores = self.stage.score_prompt(torch.tensor(ids, dtype=torch.long), window=s.window, skip=s.head,
                                         chunk=s.prefill_chunk, layers=self.layers)
        budget = math.ceil(self.keep * n)
        tail = forced_tail(n, budget, token_at(offsets, prompt.turn_start), token_at(offsets, prompt.line_start), s)
        kept = select(scores, budget, tail, s)
        text = kept_text(prompt.text, offsets, runs(kept))
        new_ids = target.encode_rendered(text) if prompt.chat else target.encode(text)
        report = Report(n_target, len(new_ids), (time.perf_counter() - t0) * 1000, text, None, n, int(kept.sum()))
        log.info("pflash: kept %d of %d tokens (%d of %d drafter tokens) in %.0f ms", len(new_ids), n_target,
                 report.drafter_kept, n, report.drafter_ms)
        return new_ids, report

    def _unchanged(self, prompt: PromptText, n: int, why: str) -> Report:
        log.info("pflash: passed through: %s", why)
        return Report(n, n, 0.0, prompt.text, why)


def scored_layers(cfg, first_layer: float, last_layer: float) -> list[int]:
    """The drafter's layers whose attention scores the prompt: those that see the whole prompt
    (not sliding-window ones), from `first_layer` of the way up (the lowest layers attend mostly
    by position) to `last_layer` of it (the drafter stops there: layers above it never run)."""
    low = min(int(first_layer * cfg.n_layers), cfg.n_layers - 1)
    high = min(max(int(last_layer * cfg.n_layers), low), cfg.n_layers - 1)
    layers = [i for i in range(low, high + 1) if not cfg.local(i)]
    if not layers:
        raise ConfigError(f"pflash.model: the drafter has no global-attention layer in layers {low}..{high} to score "
                          "with")
    return layers
