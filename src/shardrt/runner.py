"""`GraphRunner`: a GPU stage's forward captured as CUDA graphs (hipGraphs on ROCm builds of
torch), so a decode or speculative-verify step is one graph launch instead of hundreds of kernel
launches from Python. Two families of graphs:

- token buckets: n tokens of one sequence (a decode step, a speculative verify of n - 1 draft
  tokens, a short prompt or prompt chunk). Their padding rows compute at positions after the
  real ones, which no real query attends to and the next real tokens overwrite in the KV cache.
- batch buckets (a stage with several sequence slots): one token of each of b sequences, each at
  its own position. Their padding rows sit at position -1: they write no KV and see no keys.

A hybrid model (qwen35: DeltaNet layers with a recurrent state per sequence) gets token bucket 1
and the batch buckets only. Its layers take every row of a graph's step as one token of the
sequence its slot names (deltanet.DeltaNetBlock.decode); a token bucket's padding rows after the
real ones would run through the recurrence of that sequence and move its state on, so its
verifies and prompt chunks run eagerly. Padding rows of a batch run through a padding slot of the
state, and a one-token step keeps what it fed for rollback at a row the host stages beside the
positions (recurrent_state).

A step replays the smallest bucket that holds it. The runner owns what a graph reads and writes:
the input (token ids or boundary activation), the positions and the slots, staged through pinned
host memory and copied in one go; and the outputs (every layer's hidden state, and on the stage
with the head the logits and their argmax).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .kernels.moe import GATHER_ROWS
from .model import Step
from .recurrent_state import SCRATCH_ROW

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # decode, speculative verifies of up to 15 draft tokens, short prompts
MAX_BATCH_BUCKET = 128  # larger batches run eagerly: their steps are long enough to hide the launches
PROFILE_ENV = "SHARDRT_PROFILE"  # "1": measure one replay per stage at load (stats report it)


@dataclass
class StepOutputs:
    """The static tensors a captured graph writes, each [bucket, ...]."""

    hidden: list[torch.Tensor]  # after each layer of the stage
    logits: torch.Tensor | None  # float32, on the stage with the head
    tokens: torch.Tensor | None  # their argmax


def batch_buckets(max_seqs: int) -> tuple[int, ...]:
    """The batch sizes captured for a stage of `max_seqs` slots: powers of two, and max_seqs."""
    sizes = {1 << i for i in range(MAX_BATCH_BUCKET.bit_length()) if 1 << i < max_seqs}
    return tuple(sorted(sizes | {min(max_seqs, MAX_BATCH_BUCKET)})) if max_seqs > 1 else ()


def graph_buckets(stage, buckets: tuple[int, ...], batches: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The token and batch buckets of those asked that a stage's graphs can run: a mixture of
    experts only the rows it gathers experts for (kernels.moe), a recurrent state one token per
    sequence (see above)."""
    most = GATHER_ROWS // stage.cfg.n_experts_used if stage.cfg.moe else None
    recurrent = stage.state is not None
    tokens = tuple(b for b in sorted(buckets) if b <= stage.max_ctx and (most is None or b <= most)
                   and (not recurrent or b == 1))
    return tokens, tuple(b for b in sorted(batches) if most is None or b <= most)


class GraphRunner:
    def __init__(self, stage, buckets: tuple[int, ...] = BUCKETS, batches: tuple[int, ...] = ()):
        self.stage, self.device = stage, stage.device
        self.buckets, self.batch_buckets = graph_buckets(stage, buckets, batches)
        top = max(self.buckets + self.batch_buckets)
        self.profile: dict | None = None
        with torch.cuda.device(self.device), torch.inference_mode():
            # token ids, positions, slots, and (first column) the kept row of a one-token step
            self.staged = torch.zeros(4, top, dtype=torch.long).pin_memory()
            self.ids_positions = torch.zeros(4, top, dtype=torch.long, device=self.device)
            self.ids_positions[3].fill_(SCRATCH_ROW)  # the warm-up and capture runs keep nothing
            self.activation = None if stage.span.embed else \
                torch.zeros(top, stage.cfg.dim, dtype=stage.dtype, device=self.device)
            self.copied = torch.cuda.Event()  # the staging buffer may be written again
            pool = torch.cuda.graph_pool_handle()  # one pool: graphs never run at once
            self.graphs = {n: self._capture(self._step(n), pool) for n in reversed(self.buckets)}
            self.ids_positions[1].fill_(-1)  # the batch graphs' warm-up runs are all padding: no KV written
            self.batch_graphs = {b: self._capture(self._step(b, batch=True), pool)
                                 for b in reversed(self.batch_buckets)}
            if os.environ.get(PROFILE_ENV) == "1":
                self.profile = self.measure()
        stage.reset()

    def _step(self, n: int, batch: bool = False) -> Step:
        return Step(self.ids_positions[1, :n], slots=self.ids_positions[2, :n], batch=batch,
                    kept_at=None if batch else self.ids_positions[3, :1])

    def _inputs(self, n: int) -> torch.Tensor:
        return self.ids_positions[0, :n] if self.activation is None else self.activation[:n]

    def _capture(self, step: Step, pool) -> tuple[torch.cuda.CUDAGraph, StepOutputs]:
        n, every_layer = step.positions.shape[0], not step.batch  # batches feed no capture slices
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # Triton compiles, cuBLAS picks its kernels, outside the capture
            self.stage.step_outputs(self._inputs(n), step, every_layer)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = self.stage.step_outputs(self._inputs(n), step, every_layer)
        return graph, outputs

    def bucket(self, n: int, base_pos: int) -> int | None:
        """The bucket a step of n tokens of one sequence at base_pos replays; None: run it eagerly."""
        return next((b for b in self.buckets if b >= n and base_pos + b <= self.stage.max_ctx), None)

    def batch_bucket(self, b: int) -> int | None:
        """The batch bucket a step of b sequences replays; None: run it eagerly."""
        return next((size for size in self.batch_buckets if size >= b), None)

    def replay(self, inputs: torch.Tensor, base_pos: int, bucket: int, seq: int = 0,
               kept_at: int = SCRATCH_ROW) -> StepOutputs:
        """Run the graph for `bucket` over `inputs` (n <= bucket rows of sequence `seq`) at base_pos;
        a recurrent state's layers keep what they fed at kept row `kept_at` (RecurrentState.begin).
        The outputs are the graph's own tensors: read or copy them before the next replay."""
        def stage_positions(staged):
            torch.arange(base_pos, base_pos + bucket, out=staged[1, :bucket])
            staged[2, :bucket] = seq
            staged[3, 0] = kept_at

        return self._launch(self.graphs[bucket], inputs, stage_positions)

    def replay_batch(self, inputs: torch.Tensor, seqs: list[int], positions: list[int], bucket: int) -> StepOutputs:
        """Run the batch graph for `bucket` over `inputs`: row i one token of sequence seqs[i] at
        positions[i]; the rows after them up to `bucket` are padding."""
        b = len(seqs)

        def stage_positions(staged):
            staged[1:3, :b] = torch.tensor([positions, seqs])
            staged[1, b:bucket] = -1
            staged[2, b:bucket] = 0

        return self._launch(self.batch_graphs[bucket], inputs, stage_positions)

    def _launch(self, captured: tuple[torch.cuda.CUDAGraph, StepOutputs], inputs: torch.Tensor,
                stage_positions) -> StepOutputs:
        graph, outputs = captured
        n = inputs.shape[0]
        with torch.cuda.device(self.device):
            self.copied.synchronize()
            stage_positions(self.staged)
            if self.activation is None:
                self.staged[0, :n].copy_(inputs)
            else:
                self.activation[:n].copy_(inputs, non_blocking=True)
            self.ids_positions.copy_(self.staged, non_blocking=True)
            self.copied.record()
            graph.replay()
        return outputs

    def measure(self, bucket: int = 1, repeats: int = 20) -> dict:
        """GPU time of one replay of `bucket` (CUDA events), and the kernels it launches with their
        summed time (torch.profiler). The replays recompute the last step's KV in place."""
        from torch.profiler import ProfilerActivity, profile

        graph, _ = self.graphs[bucket]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize(self.device)
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:8]
        return {"bucket": bucket, "replay_ms": round(start.elapsed_time(end) / repeats, 4),
                "kernels": len(kernels), "kernel_ms": round(sum(e.time_range.elapsed_us() for e in kernels) / 1000, 4),
                "top_kernels": [{"name": name[:60], "count": len(times), "ms": round(sum(times) / 1000, 4)}
                                for name, times in top]}

    def describe(self) -> dict:
        return {"buckets": list(self.buckets), "batch_buckets": list(self.batch_buckets), "profile": self.profile}
