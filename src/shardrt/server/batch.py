"""Continuous batching: the sequences `serve` decodes together.

`BatchScheduler` owns the sequence slots of every stage's KV cache (`--max-seqs` of them).
Requests join between steps, each in a free slot. A new request's prompt is prefilled in chunks
of `prefill_chunk` tokens, one chunk per step, so the streams already running keep flowing; then
every sequence with a token to feed takes part in one batched decode step (one forward over all
of them, each at its own position and over its own cache). A sequence leaves when it ends, is
cancelled, or its client goes away, and its slot takes the next request at once. Prefix-cache
snapshots are shared by every slot: a request may reuse what another one left.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..generate import Decoding, Generation
from ..sampling import Sampler

PREFILL_CHUNK = 256  # prompt tokens run per step while other sequences decode


@dataclass
class Running:
    """One request in a sequence slot."""

    job: object  # engine.Job
    seq: int
    out: Decoding
    sampler: Sampler
    reused: int  # prompt tokens restored from the prefix cache
    prefilled: int  # prompt tokens in the cache so far
    next_token: int | None = None  # sampled and committed, to be fed at the next decode step
    started: float = field(default_factory=time.perf_counter)
    prefill_done: float | None = None

    @property
    def prompt(self) -> list[int]:
        return self.job.prompt_ids

    @property
    def position(self) -> int:
        """Where next_token goes: after the prompt and every token before it."""
        return len(self.prompt) + len(self.out.tokens) - 1


class BatchScheduler:
    def __init__(self, pipeline, tokenizer, prefix_cache=None, prefill_chunk: int = PREFILL_CHUNK):
        self.pipeline, self.tokenizer, self.prefix_cache = pipeline, tokenizer, prefix_cache
        self.prefill_chunk = prefill_chunk
        self.running: list[Running] = []
        self._free = list(range(pipeline.max_seqs))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def admit(self, job) -> None:
        """Give `job` a slot; its prefill starts with the next step. ConfigError if it cannot run."""
        prompt, params = job.prompt_ids, job.params
        if not prompt:
            raise ConfigError("prompt: is empty; give at least one token of text")
        if len(prompt) + params.max_tokens > self.pipeline.max_ctx:
            raise ConfigError(f"prompt + max_tokens: {len(prompt)} + {params.max_tokens} exceed max_ctx "
                              f"{self.pipeline.max_ctx}")
        seq = self._free.pop(0)
        try:
            if self.prefix_cache is not None:
                reused = self.prefix_cache.restore(prompt, seq)
            else:
                self.pipeline.reset(seq)
                reused = 0
        except BaseException:
            self._free.insert(0, seq)
            raise
        run = Running(job, seq, Decoding(self.tokenizer, params, job.on_text), Sampler(params), reused, reused)
        self.running.append(run)
        if params.max_tokens == 0:
            run.prefilled = len(prompt)  # nothing to run: it ends with the next step

    def drop_all(self) -> list[Running]:
        """Every running sequence, taken out (their stages failed or are closing)."""
        running, self.running = self.running, []
        self._free = list(range(self.pipeline.max_seqs))
        return running

    def step(self) -> list[tuple[Running, Generation]]:
        """Cancellations, one prefill chunk, one batched decode step; returns what finished."""
        finished = []
        for run in list(self.running):
            if run.job.cancelled():
                run.out.finish = "cancelled"
                finished.append(self._finish(run))
        prefilling = next((r for r in self.running if r.prefilled < len(r.prompt)), None)
        if prefilling is not None:
            if not self._prefill_chunk(prefilling):
                finished.append(self._finish(prefilling))
        decoding = [r for r in self.running if r.next_token is not None]
        if decoding:
            for run, token in zip(decoding, self._decode(decoding)):
                run.next_token = token if run.out.commit(token) else None
                if run.next_token is None:
                    finished.append(self._finish(run))
        finished += [self._finish(r) for r in list(self.running)
                     if r.prefilled == len(r.prompt) and r.next_token is None and r.prefill_done is None]
        return finished

    def _prefill_chunk(self, run: Running) -> bool:
        """Run the next chunk of the prompt; after the last, the first token. False when it ends there."""
        start = run.prefilled
        chunk = run.prompt[start : start + self.prefill_chunk]
        x = torch.tensor(chunk, dtype=torch.long)
        run.prefilled += len(chunk)
        last = run.prefilled == len(run.prompt)
        if not last or run.sampler.params.greedy:
            token = self.pipeline.greedy_all(x, start, seq=run.seq)[0][-1]
        else:
            token = run.sampler(self.pipeline.run(x, start, seq=run.seq)[0][-1])
        if not last:
            return True
        run.prefill_done = time.perf_counter()
        going = run.out.commit(token)
        run.next_token = token if going else None
        return going

    def _decode(self, rows: list[Running]) -> list[int]:
        tokens, seqs, positions = [r.next_token for r in rows], [r.seq for r in rows], [r.position for r in rows]
        if all(r.sampler.params.greedy for r in rows):
            return self.pipeline.decode_batch(tokens, seqs, positions, argmax=True)
        logits = self.pipeline.decode_batch(tokens, seqs, positions)
        return [int(logits[i].argmax()) if r.sampler.params.greedy else r.sampler(logits[i])
                for i, r in enumerate(rows)]

    def _finish(self, run: Running) -> tuple[Running, Generation]:
        self.running.remove(run)
        self._free.append(run.seq)
        text = run.out.close()
        now = time.perf_counter()
        prefill_end = run.prefill_done or now
        tokens = run.out.tokens
        if self.prefix_cache is not None and run.prefill_done is not None:
            held = min(self.pipeline.length_of(run.seq), len(run.prompt) + len(tokens))
            self.pipeline.truncate(held, run.seq)
            self.prefix_cache.store((list(run.prompt) + tokens)[:held], run.seq)
        return run, Generation(list(run.prompt), list(tokens), text, run.out.finish, prefill_end - run.started,
                               now - prefill_end, prefilled_tokens=len(run.prompt) - run.reused,
                               reused_tokens=run.reused)
