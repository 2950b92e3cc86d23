"""`Wavefront`: several forwards in flight through the stages of a pipeline at once.

A forward (a `Work`: one step of a group of sequences, their decode tokens and prompt chunks
together) runs stage by stage. A stage in a daemon computes while this process does other work:
the wavefront sends each waiting forward to a free daemon at once, runs the stages of this
process on what waits for them meanwhile, and only then waits for the daemon that was asked
first. With S stages and S groups of sequences every stage is busy at once, as in any pipeline
split (GPipe's micro-batches, llama.cpp's and vLLM's pipeline parallel decode).

Each daemon takes one request at a time (its shared-memory slots hold one), so nothing else may
be asked of a stage while the wavefront has a forward in it: `drain` first.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Work:
    """One forward: rows of several sequences (a decode token each, or a chunk of a prompt), row i
    sequence seqs[i]'s token x[i] at positions[i]; the stage with the head returns the rows
    `outputs`, as token ids with `argmax`, else as logits. `rows` and `group` are the caller's."""

    rows: list
    seqs: list[int]
    x: torch.Tensor
    positions: list[int]
    outputs: list[int]
    argmax: bool = False
    group: int = 0
    stage: int = 0  # the next stage it runs in
    output: object = None  # what the last stage gave: logits, or token ids

    def start(self, stage, last: bool) -> Callable[[], object]:
        return stage.start_batch(self.x, self.seqs, self.positions, tokens=last and self.argmax,
                                 outputs=self.outputs if last else None)


@dataclass
class _Running:
    work: Work
    finish: Callable[[], object]
    since: float = field(default_factory=time.perf_counter)


class Wavefront:
    def __init__(self, stages: list):
        self.stages = stages
        self.local = [getattr(stage, "daemon", None) is None for stage in stages]
        self.waiting: list[deque[Work]] = [deque() for _ in stages]
        self.running: list[_Running | None] = [None] * len(stages)

    @property
    def idle(self) -> bool:
        return not any(self.waiting) and not any(self.running)

    def put(self, work: Work) -> None:
        self.waiting[work.stage].append(work)

    def advance(self) -> list[Work]:
        """Start every forward that can start (the stages of this process compute here), then wait
        for the daemon asked longest ago. Returns the forwards that left the last stage."""
        done: list[Work] = []
        started = True
        while started:
            started = False
            for s in reversed(range(len(self.stages))):  # the later stages first: they free the earlier
                if self.running[s] is None and self.waiting[s]:
                    work = self.waiting[s].popleft()
                    self.running[s] = _Running(work, work.start(self.stages[s], s == len(self.stages) - 1))
                    started = True
                    if self.local[s]:
                        self._finish(s, done)
        busy = [s for s, r in enumerate(self.running) if r is not None]
        if busy:
            self._finish(min(busy, key=lambda s: self.running[s].since), done)
        return done

    def drain(self) -> list[Work]:
        """Run until nothing is in flight."""
        done: list[Work] = []
        while not self.idle:
            done += self.advance()
        return done

    def clear(self) -> None:
        """Forget everything in flight (its stages failed)."""
        self.waiting = [deque() for _ in self.stages]
        self.running = [None] * len(self.stages)

    def _finish(self, s: int, done: list[Work]) -> None:
        running, self.running[s] = self.running[s], None
        output = running.finish()
        work = running.work
        work.stage += 1
        if work.stage == len(self.stages):
            work.output = output
            done.append(work)
        else:
            work.x = output
            self.waiting[work.stage].append(work)
