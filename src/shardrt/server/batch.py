"""Continuous batching: the sequences `serve` decodes together.

`BatchScheduler` owns the sequence slots of every stage's KV cache (`--max-seqs` of them).
Requests join between steps, each in a free slot. A new request's prompt is prefilled in chunks
of `prefill_chunk` tokens, one chunk in flight at a time, so the streams already running keep
flowing. Decoding sequences sit in as many groups as the pipeline has stages; each group's step
is one batched forward (one token of each of its sequences, each at its own position and over
its own cache), and the groups move through the stages as a wavefront (wavefront.py), so that
with the model split over S processes all S work at once. A sequence leaves when it ends, is
cancelled, or its client goes away, and its slot takes the next request. Prefix-cache snapshots
are shared by every slot: a request may reuse what another one left. A generation that began
alone (speculative, in slot 0) joins the batch where it stopped (`adopt`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..generate import Decoding, Generation, Handover
from ..sampling import Sampler
from ..wavefront import Wavefront, Work

PREFILL_CHUNK = 256  # prompt tokens run per step while other sequences decode


@dataclass
class Running:
    """One request in a sequence slot."""

    job: object  # engine.Job
    seq: int
    out: Decoding
    sampler: Sampler
    reused: int  # prompt tokens restored from the prefix cache
    prefilled: int  # prompt tokens sent into the cache (the last chunk may still be in flight)
    next_token: int | None = None  # sampled and committed, to be fed at the next decode step
    in_flight: bool = False  # a forward of this sequence is in the wavefront
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
        self.wave = Wavefront(pipeline.stages)
        self.running: list[Running] = []  # every sequence with a slot
        self.groups: list[list[Running]] = [[] for _ in pipeline.stages]  # decoding, by wavefront group
        self._joining: list[Running] = []  # admitted, their slot not set up yet
        self._leaving: list[Running] = []  # ended, their slot not yet given back
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
        run = Running(job, self._free.pop(0), Decoding(self.tokenizer, params, job.on_text), Sampler(params), 0, 0)
        self.running.append(run)
        self._joining.append(run)

    def adopt(self, job, handover: Handover, seq: int = 0) -> None:
        """Take over a generation that ran elsewhere in slot `seq` (free here): it decodes on from
        its last token, which its KV does not hold yet."""
        self._free.remove(seq)
        out = handover.out
        run = Running(job, seq, out, handover.sampler, handover.reused, len(job.prompt_ids), out.tokens[-1],
                      started=handover.started, prefill_done=handover.prefill_done)
        self.running.append(run)
        min(self.groups, key=len).append(run)

    def drop_all(self) -> list[Running]:
        """Every sequence, taken out (their stages failed or are closing)."""
        running = self.running
        self.running, self._joining, self._leaving = [], [], []
        self.groups = [[] for _ in self.pipeline.stages]
        self.wave.clear()
        self._free = list(range(self.pipeline.max_seqs))
        return running

    def step(self) -> list[tuple[Running, Generation]]:
        """Slots set up and given back, then the next forwards in flight; returns what finished."""
        gone = [r for r in self.running if r.job.cancelled() and not r.in_flight and r not in self._joining]
        finished = [self._end(r, "cancelled") for r in gone]
        if self._joining or self._leaving:
            finished += self.settle()
        self._put_work()
        for work in self.wave.advance():
            finished += self._returned(work)
        return finished

    # -- slots: set up and given back while nothing is in flight (they ask every stage) --------

    def settle(self) -> list[tuple[Running, Generation]]:
        """Give back the slots of the sequences that ended, set up those that joined (nothing is
        in flight after it)."""
        finished = []
        for work in self.wave.drain():
            finished += self._returned(work)
        leaving, self._leaving = self._leaving, []
        for run in leaving:
            self._store_prefix(run)
            self._free.append(run.seq)
        joining, self._joining = self._joining, []
        for run in joining:
            if self.prefix_cache is not None:
                run.reused = run.prefilled = self.prefix_cache.restore(run.prompt, run.seq)
            else:
                self.pipeline.reset(run.seq)
            if run.job.cancelled():
                finished.append(self._end(run, "cancelled"))
            elif run.sampler.params.max_tokens == 0:
                finished.append(self._end(run, "length"))
        return finished

    def _store_prefix(self, run: Running) -> None:
        if self.prefix_cache is None or run.prefill_done is None:
            return
        tokens = run.out.tokens
        held = min(self.pipeline.length_of(run.seq), len(run.prompt) + len(tokens))
        self.pipeline.truncate(held, run.seq)
        self.prefix_cache.store((list(run.prompt) + tokens)[:held], run.seq)

    # -- forwards into the wavefront, and what comes back ----------------------------------------

    def _put_work(self) -> None:
        if not any(r.in_flight and r.prefill_done is None for r in self.running):
            run = next((r for r in self.running if r.prefilled < len(r.prompt) and r not in self._leaving
                        and not r.job.cancelled()), None)
            if run is not None:
                start = run.prefilled
                chunk = run.prompt[start : start + self.prefill_chunk]
                run.prefilled = start + len(chunk)  # in flight: the next chunk waits for this one
                last = run.prefilled == len(run.prompt)
                self._send([run], torch.tensor(chunk, dtype=torch.long), base_pos=start,
                           argmax=not last or run.sampler.params.greedy)
        for group in self.groups:
            rows = [r for r in group if r.next_token is not None]
            if rows and not any(r.in_flight for r in group):
                self._send(rows, torch.tensor([r.next_token for r in rows], dtype=torch.long),
                           positions=[r.position for r in rows], argmax=all(r.sampler.params.greedy for r in rows))

    def _send(self, rows: list[Running], x: torch.Tensor, **where) -> None:
        for run in rows:
            run.in_flight = True
        self.wave.put(Work(rows, [r.seq for r in rows], x, **where))

    def _returned(self, work: Work) -> list[tuple[Running, Generation]]:
        for run in work.rows:
            run.in_flight = False
        if work.positions is None:
            return self._prefilled(work)
        finished = []
        for i, run in enumerate(work.rows):
            if run.job.cancelled():
                finished.append(self._end(run, "cancelled"))
                continue
            token = self._token(run, work.output, i, work.argmax)
            if run.out.commit(token):
                run.next_token = token
            else:
                finished.append(self._end(run, run.out.finish))
        return finished

    def _prefilled(self, work: Work) -> list[tuple[Running, Generation]]:
        (run,) = work.rows
        if run.job.cancelled():
            return [self._end(run, "cancelled")]
        if run.prefilled < len(run.prompt):
            return []
        run.prefill_done = time.perf_counter()
        token = self._token(run, work.output, -1, work.argmax)
        if not run.out.commit(token):
            return [self._end(run, run.out.finish)]
        run.next_token = token
        min(self.groups, key=len).append(run)
        return []

    @staticmethod
    def _token(run: Running, output, row: int, argmax: bool) -> int:
        if argmax:
            return output[row]
        logits = output[row]
        return int(logits.argmax()) if run.sampler.params.greedy else run.sampler(logits)

    def _end(self, run: Running, reason: str) -> tuple[Running, Generation]:
        """Finish a sequence now; its slot is given back (after its prefix is kept) at the next settle."""
        run.out.finish = reason
        for group in self.groups:
            if run in group:
                group.remove(run)
        self.running.remove(run)
        self._leaving.append(run)
        text = run.out.close()
        now = time.perf_counter()
        prefill_end = run.prefill_done or now
        return run, Generation(list(run.prompt), list(run.out.tokens), text, reason, prefill_end - run.started,
                               now - prefill_end, prefilled_tokens=len(run.prompt) - run.reused,
                               reused_tokens=run.reused)
