"""Continuous batching: the sequences `serve` decodes together.

`BatchScheduler` owns the sequence slots of every stage's KV cache (`--max-seqs` of them).
Requests join between steps, each in a free slot. Decoding sequences sit in as many groups as
the pipeline has stages; each group's step is one forward of at most `max_batch_tokens` rows:
one token of each of its decoding sequences, then chunks of the prompts waiting to be prefilled,
in arrival order, as many as the budget holds (several prompts in one forward). Every row sits
at its own position over its own sequence's cache, so a burst of new requests prefills together
while the streams already running take a token every step: a long prompt cannot starve them.
The groups move through the stages as a wavefront (wavefront.py), so that with the model split
over S processes all S work at once. A sequence leaves when it ends, is cancelled, or its client
goes away, and its slot takes the next request.

Prefixes are prefilled once: a joining request whose prompt shares at least `MIN_SHARED` tokens
with a running one (a system prompt) copies that prefix of its KV (`kv_copy`, inside each
stage), waiting first if the other one has not prefilled that far; prefix-cache snapshots are
shared by every slot, so a request may also reuse what an earlier one left. A generation that
began alone (speculative, in slot 0) joins the batch where it stopped (`adopt`).

A model with recurrent state (qwen35) shares no prefix with a running request (its state is held
at the donor's end only), and its prompt stops one token short for a prefix-cache snapshot
(PrefixCache.checkpoint_at), taken at the next settle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..generate import Decoding, Generation, Handover
from ..sampling import Sampler
from ..spec.prefix_cache import common_prefix
from ..wavefront import Wavefront, Work

MAX_BATCH_TOKENS = 512  # rows of one step (decode tokens and prompt chunks), --max-batch-tokens
MIN_SHARED = 16  # prompt tokens another running request must share for its KV to be copied
MIN_CHUNK = 16  # prompt rows a step takes even when the decode rows fill its budget (prefill never stalls)


@dataclass
class ShareStats:
    """Prompts that took their prefix from a running request, and the tokens that saved."""

    requests: int = 0
    tokens: int = 0


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
    donor: "Running | None" = None  # a running request whose prompt prefix this one waits to copy
    shared: int = 0  # how much of it
    checkpoint: int | None = None  # where its prefill stops for a prefix-cache snapshot
    started: float = field(default_factory=time.perf_counter)
    prefill_done: float | None = None
    number: int = 0  # in admission order (the step log's request number)
    admitted: float = field(default_factory=time.monotonic)

    @property
    def prompt(self) -> list[int]:
        return self.job.prompt_ids

    @property
    def position(self) -> int:
        """Where next_token goes: after the prompt and every token before it."""
        return len(self.prompt) + len(self.out.tokens) - 1


class BatchScheduler:
    def __init__(self, pipeline, tokenizer, prefix_cache=None, max_batch_tokens: int = MAX_BATCH_TOKENS,
                 step_log=None):
        if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise ConfigError(f"--max-batch-tokens: {max_batch_tokens!r} is not a whole number >= 1")
        self.pipeline, self.tokenizer, self.prefix_cache = pipeline, tokenizer, prefix_cache
        self.max_batch_tokens = max_batch_tokens
        self.step_log = step_log  # step_log.StepLog or None
        self._admitted = 0
        self._sent = [0, 0, 0]  # this step's decode rows, prompt rows, prompts (for the step log)
        self.wave = Wavefront(pipeline.stages)
        self.running: list[Running] = []  # every sequence with a slot, in arrival order
        self.groups: list[list[Running]] = [[] for _ in pipeline.stages]  # decoding, by wavefront group
        self._busy = [False] * len(pipeline.stages)  # a group's step is in the wavefront
        self._joining: list[Running] = []  # admitted, their slot not set up yet
        self._leaving: list[Running] = []  # ended, their slot not yet given back
        self._drain_seconds = 0.0  # of the last settle: waiting for the forwards in flight
        self._copying: list[Running] = []  # their donor has prefilled what they share: copy at the next settle
        self._checkpointing: list[Running] = []  # prefilled to their checkpoint: snapshot at the next settle
        self._free = list(range(pipeline.max_seqs))
        self.shared = ShareStats()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def unsettled(self) -> bool:
        """Ended requests whose slots (and prefix-cache snapshots) wait for a settle."""
        return bool(self._leaving or self._copying or self._checkpointing)

    def admit(self, job) -> None:
        """Give `job` a slot; its prefill starts with the next step. ConfigError if it cannot run."""
        prompt, params = job.prompt_ids, job.params
        if not prompt:
            raise ConfigError("prompt: is empty; give at least one token of text")
        if len(prompt) + params.max_tokens > self.pipeline.max_ctx:
            raise ConfigError(f"prompt + max_tokens: {len(prompt)} + {params.max_tokens} exceed max_ctx "
                              f"{self.pipeline.max_ctx}")
        self._admitted += 1
        run = Running(job, self._free.pop(0), Decoding(self.tokenizer, params, job.on_text), Sampler(params), 0, 0,
                      number=self._admitted)
        self.running.append(run)
        self._joining.append(run)

    def adopt(self, job, handover: Handover, seq: int = 0) -> None:
        """Take over a generation that ran elsewhere in slot `seq` (free here): it decodes on from
        its last token, which its KV does not hold yet."""
        self._free.remove(seq)
        out = handover.out
        self._admitted += 1
        # it took its slot when it started, alone (`started` is a perf_counter reading)
        admitted = time.monotonic() - (time.perf_counter() - handover.started)
        run = Running(job, seq, out, handover.sampler, handover.reused, len(job.prompt_ids), out.tokens[-1],
                      started=handover.started, prefill_done=handover.prefill_done, number=self._admitted,
                      admitted=admitted)
        self.running.append(run)
        min(self.groups, key=len).append(run)

    def drop_all(self) -> list[Running]:
        """Every sequence, taken out (their stages failed or are closing)."""
        running = self.running
        self.running, self._joining, self._leaving, self._copying, self._checkpointing = [], [], [], [], []
        self.groups = [[] for _ in self.pipeline.stages]
        self._busy = [False] * len(self.pipeline.stages)
        self.wave.clear()
        self._free = list(range(self.pipeline.max_seqs))
        return running

    def step(self) -> list[tuple[Running, Generation]]:
        """Slots set up and given back, then the next forwards in flight; returns what finished."""
        t0, cpu0, joined = time.monotonic(), time.thread_time(), len(self._joining)
        gone = [r for r in self.running if r.job.cancelled() and not r.in_flight and r not in self._joining]
        finished = [self._end(r, "cancelled") for r in gone]
        self._drain_seconds = 0.0
        if self._joining or self.unsettled:
            finished += self.settle()
        settled, settle_cpu, forwarded = time.monotonic(), time.thread_time() - cpu0, self._forward_seconds()
        self._sent = [0, 0, 0]
        self._put_work()
        for work in self.wave.advance():
            finished += self._returned(work)
        if self.step_log is not None:
            decode, prefill, prompts = self._sent
            self.step_log.step(settle_ms=round((settled - t0) * 1e3, 2), settle_cpu_ms=round(settle_cpu * 1e3, 2),
                               drain_ms=round(self._drain_seconds * 1e3, 2), decode=decode, prefill=prefill,
                               prompts=prompts, joined=joined, finished=len(finished),
                               forward_ms=round((self._forward_seconds() - forwarded) * 1e3, 2),
                               ms=round((time.monotonic() - t0) * 1e3, 2))
        return finished

    def _forward_seconds(self) -> float:
        """Time the stages' forwards have taken so far (a daemon's: from its request to its reply)."""
        return sum(getattr(stage, "forward_seconds", 0.0) for stage in self.pipeline.stages)

    # -- slots: set up and given back while nothing is in flight (they ask every stage) --------

    def settle(self) -> list[tuple[Running, Generation]]:
        """Give back the slots of the sequences that ended, set up those that joined (nothing is
        in flight after it)."""
        finished, t0 = [], time.monotonic()
        for work in self.wave.drain():
            finished += self._returned(work)
        self._drain_seconds = time.monotonic() - t0
        checkpointing, self._checkpointing = self._checkpointing, []
        for run in checkpointing:
            if run in self.running:
                self.prefix_cache.store(run.prompt[: run.checkpoint], run.seq)
                run.checkpoint = None
        leaving, self._leaving = self._leaving, []
        self._copy_shared(leaving)  # a leaving donor's KV is still whole until its slot is given back
        for run in self._kept(leaving):
            self._store_prefix(run)
        self._free += [run.seq for run in leaving]
        joining, self._joining = self._joining, []
        pending = set(map(id, joining))  # not set up yet: no donor for another
        for run in joining:
            pending.discard(id(run))
            if self.prefix_cache is not None:
                run.reused = run.prefilled = self.prefix_cache.restore(run.prompt, run.seq)
                run.checkpoint = self.prefix_cache.checkpoint_at(run.prompt, run.reused)
            else:
                self.pipeline.reset(run.seq)
            if run.job.cancelled():
                finished.append(self._end(run, "cancelled"))
            elif run.sampler.params.max_tokens == 0:
                finished.append(self._end(run, "length"))
            else:
                self._find_donor(run, pending)
        self._copy_shared(leaving)
        return finished

    # -- prefixes shared with running requests ----------------------------------------------------

    def _find_donor(self, run: Running, pending: set[int]) -> None:
        """The running request whose prompt shares the most with this one's, if it shares more
        than the prefix cache gave; copied now if it is prefilled that far, else waited for.
        Requests waiting for a donor, and those not set up yet (`pending` ids), are no donors."""
        if self.pipeline.cfg.hybrid:  # a recurrent state is held at the donor's end, not at the prefix
            return
        best, shared = None, 0
        for other in self.running:
            if other is run or other.donor is not None or id(other) in pending:
                continue
            # one that does not share MIN_SHARED tokens past what the prefix cache gave is no donor
            n = common_prefix(other.prompt, run.prompt, at_least=run.prefilled + MIN_SHARED)
            if n > shared:
                best, shared = other, n
        shared = min(shared, len(run.prompt) - 1)  # at least one token must run, for the next logits
        if best is None or shared - run.prefilled < MIN_SHARED:
            return
        run.donor, run.shared = best, shared
        if min(best.prefilled, self.pipeline.length_of(best.seq)) >= shared:
            self._copying.append(run)

    def _copy_shared(self, leaving: list[Running]) -> None:
        """Copy the shared prefix into every request whose donor has prefilled it (or is leaving:
        then as much as it holds). Only while nothing is in flight."""
        for run in [r for r in self.running if r.donor is not None and r.donor in leaving]:
            run.shared = min(run.shared, self.pipeline.length_of(run.donor.seq))
            if run not in self._copying:
                self._copying.append(run)
        copying, self._copying = self._copying, []
        for run in copying:
            donor, n = run.donor, run.shared
            run.donor = None
            if run not in self.running or n - run.prefilled < MIN_SHARED:
                continue  # ended meanwhile, or too little left to copy: it prefills by itself
            self.pipeline.kv_copy(donor.seq, run.seq, n)
            self.shared.requests += 1
            self.shared.tokens += n - run.prefilled
            run.reused = run.prefilled = n

    def _kept(self, leaving: list[Running]) -> list[Running]:
        """The leaving requests whose KV goes into the prefix cache: the last as many as
        it has slots. Each store takes the least recently used slot, so the earlier ones would be
        evicted again within this settle (a burst of 64 ending together on 16 slots: 48 snapshots
        of the whole KV copied for nothing)."""
        slots = self.prefix_cache.slots if self.prefix_cache is not None else 0
        return leaving[len(leaving) - slots:] if slots else []

    def _store_prefix(self, run: Running) -> None:
        if self.prefix_cache is None or run.prefill_done is None:
            return
        tokens = run.out.tokens
        held = min(self.pipeline.length_of(run.seq), len(run.prompt) + len(tokens))
        self.pipeline.truncate(held, run.seq)
        self.prefix_cache.store((list(run.prompt) + tokens)[:held], run.seq)

    # -- forwards into the wavefront, and what comes back ----------------------------------------

    def _put_work(self) -> None:
        """A step for every group with none in flight: its decode tokens, then prompt chunks of the
        waiting requests (arrival order) while the step has room."""
        waiting = [r for r in self.running if r.prefilled < len(r.prompt) and not r.in_flight and r.donor is None
                   and r.prefilled != r.checkpoint and r not in self._leaving and r not in self._copying
                   and not r.job.cancelled()]
        for g, group in enumerate(self.groups):
            if self._busy[g]:
                continue
            decode = [r for r in group if r.next_token is not None]
            room, chunks = max(self.max_batch_tokens - len(decode), MIN_CHUNK), []
            while waiting and room > 0:
                run = waiting.pop(0)
                end = len(run.prompt) if run.checkpoint is None else run.checkpoint
                chunks.append((run, min(room, end - run.prefilled)))
                room -= chunks[-1][1]
            if decode or chunks:
                self._send(g, decode, chunks)

    def _send(self, group: int, decode: list[Running], chunks: list[tuple[Running, int]]) -> None:
        tokens, seqs, positions, outputs, rows = [], [], [], [], []
        for run in decode:
            tokens.append(run.next_token)
            seqs.append(run.seq)
            positions.append(run.position)
            outputs.append(len(tokens) - 1)
            rows.append(run)
        for run, take in chunks:
            start = run.prefilled
            tokens += run.prompt[start : start + take]
            seqs += [run.seq] * take
            positions += range(start, start + take)
            run.prefilled = start + take  # in flight: its next chunk waits for this one
            if run.prefilled == len(run.prompt):  # the prompt's last row gives the first token
                outputs.append(len(tokens) - 1)
            rows.append(run)
        sampled = [rows[i] for i in range(len(rows)) if rows[i] in decode or rows[i].prefilled == len(rows[i].prompt)]
        self._sent = [self._sent[0] + len(decode), self._sent[1] + len(tokens) - len(decode),
                      self._sent[2] + len(chunks)]
        for run in rows:
            run.in_flight = True
        self._busy[group] = True
        self.wave.put(Work(rows, seqs, torch.tensor(tokens, dtype=torch.long), positions,
                           outputs or [len(tokens) - 1], argmax=all(r.sampler.params.greedy for r in sampled),
                           group=group))

    def _returned(self, work: Work) -> list[tuple[Running, Generation]]:
        self._busy[work.group] = False
        for run in work.rows:
            run.in_flight = False
        finished, out = [], 0
        for run in work.rows:
            gives = run.prefill_done is not None or run.prefilled == len(run.prompt)
            row, out = out, out + gives  # this run's row among the outputs
            if run.job.cancelled():
                finished.append(self._end(run, "cancelled"))
                continue
            if not gives:
                self._donor_progress(run)
                if run.prefilled == run.checkpoint:
                    self._checkpointing.append(run)
                continue
            first = run.prefill_done is None
            if first:
                run.prefill_done = time.perf_counter()
                self._donor_progress(run)
            token = self._token(run, work.output, row, work.argmax)
            if not run.out.commit(token):
                finished.append(self._end(run, run.out.finish))
                continue
            run.next_token = token
            if first:
                min(self.groups, key=len).append(run)
        return finished

    def _donor_progress(self, donor: Running) -> None:
        """The requests waiting for this one's prefix: ready to copy once it has prefilled it."""
        for run in self.running:
            if run.donor is donor and donor.prefilled >= run.shared and run not in self._copying:
                self._copying.append(run)

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
        if self.step_log is not None:
            job = run.job
            self.step_log.request(run.number, received=job.received, arrived=job.arrived, admitted=run.admitted,
                                  first_token=job.first_token_at, prompt_tokens=len(run.prompt), reused=run.reused,
                                  tokens=len(run.out.tokens), finish=reason,
                                  **({} if job.http_cpu is None else {"http_cpu_ms": round(job.http_cpu * 1e3, 2)}))
        now = time.perf_counter()
        prefill_end = run.prefill_done or now
        return run, Generation(list(run.prompt), list(run.out.tokens), text, reason, prefill_end - run.started,
                               now - prefill_end, prefilled_tokens=len(run.prompt) - run.reused,
                               reused_tokens=run.reused)
