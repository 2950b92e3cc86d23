"""`GraphRunner`: a GPU stage's forward captured as CUDA graphs (hipGraphs on ROCm builds of
torch), one per token-count bucket, so a decode or speculative-verify step is one graph launch
instead of hundreds of kernel launches from Python.

It owns what a graph reads and writes: the input (token ids or boundary activation) and the
positions, both staged through pinned host memory and copied in one go; and the outputs (every
layer's hidden state, and on the stage with the head the logits and their argmax). A step of n
tokens replays the smallest bucket >= n. Its padding rows compute at positions after the real
ones, which no real query attends to and the next real tokens overwrite in the KV cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .model import Step

BUCKETS = (1, 2, 4, 8, 16)  # a decode step, and speculative verifies of up to 15 draft tokens
PROFILE_ENV = "SHARDRT_PROFILE"  # "1": measure one replay per stage at load (stats report it)


@dataclass
class StepOutputs:
    """The static tensors a captured graph writes, each [bucket, ...]."""

    hidden: list[torch.Tensor]  # after each layer of the stage
    logits: torch.Tensor | None  # float32, on the stage with the head
    tokens: torch.Tensor | None  # their argmax


class GraphRunner:
    def __init__(self, stage, buckets: tuple[int, ...] = BUCKETS):
        self.stage, self.device = stage, stage.device
        self.buckets = tuple(b for b in sorted(buckets) if b <= stage.max_ctx)
        top = self.buckets[-1]
        self.profile: dict | None = None
        with torch.cuda.device(self.device), torch.inference_mode():
            self.staged = torch.zeros(2, top, dtype=torch.long).pin_memory()  # token ids, positions
            self.ids_positions = torch.zeros(2, top, dtype=torch.long, device=self.device)
            self.activation = None if stage.span.embed else \
                torch.zeros(top, stage.cfg.dim, dtype=stage.dtype, device=self.device)
            self.copied = torch.cuda.Event()  # the staging buffer may be written again
            pool = torch.cuda.graph_pool_handle()  # one pool: buckets never run at once
            self.graphs = {n: self._capture(n, pool) for n in reversed(self.buckets)}
            if os.environ.get(PROFILE_ENV) == "1":
                self.profile = self.measure()
        stage.reset()

    def _inputs(self, n: int) -> torch.Tensor:
        return self.ids_positions[0, :n] if self.activation is None else self.activation[:n]

    def _capture(self, n: int, pool) -> tuple[torch.cuda.CUDAGraph, StepOutputs]:
        step = Step(self.ids_positions[1, :n])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # Triton compiles, cuBLAS picks its kernels, outside the capture
            self.stage.step_outputs(self._inputs(n), step)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = self.stage.step_outputs(self._inputs(n), step)
        return graph, outputs

    def bucket(self, n: int, base_pos: int) -> int | None:
        """The bucket a step of n tokens at base_pos replays; None: run it eagerly."""
        return next((b for b in self.buckets if b >= n and base_pos + b <= self.stage.max_ctx), None)

    def replay(self, inputs: torch.Tensor, base_pos: int, bucket: int) -> StepOutputs:
        """Run the graph for `bucket` over `inputs` (n <= bucket rows) at base_pos. The outputs are
        the graph's own tensors: read or copy them before the next replay."""
        n = inputs.shape[0]
        graph, outputs = self.graphs[bucket]
        with torch.cuda.device(self.device):
            self.copied.synchronize()
            torch.arange(base_pos, base_pos + bucket, out=self.staged[1, :bucket])
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
        return {"bucket": bucket, "replay_ms": round(start.elapsed_time(end) / repeats, 4),
                "kernels": len(kernels), "kernel_ms": round(sum(e.time_range.elapsed_us() for e in kernels) / 1000, 4)}

    def describe(self) -> dict:
        return {"buckets": list(self.buckets), "profile": self.profile}
