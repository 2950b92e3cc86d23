"""`Pipeline`: the ordered stages that together hold a whole model, run as one.

A stage may live in this process or behind IPC; the pipeline only needs the `Stage` methods
from each, and passes the boundary activation from one to the next. KV state never leaves a
stage: snapshots, restores and truncation are asked of every stage in its own process.
"""

from __future__ import annotations

import torch

from .errors import ConfigError, PlacementError
from .stage import Captured


class Pipeline:
    def __init__(self, stages: list):
        if not stages:
            raise PlacementError("stages: a pipeline needs at least one stage")
        for before, after in zip(stages, stages[1:]):
            if before.span.stop != after.span.start:
                raise PlacementError(f"stages: {before.span} is not followed by a stage starting at layer {before.span.stop}")
        if not stages[0].span.embed or not stages[-1].span.head:
            raise PlacementError("stages: the first stage must hold the embedding and the last the head")
        self.stages = stages

    @property
    def cfg(self):
        return self.stages[0].cfg

    @property
    def length(self) -> int:
        return self.stages[-1].length

    @property
    def max_ctx(self) -> int:
        return min(s.max_ctx for s in self.stages)

    @property
    def max_seqs(self) -> int:
        return min(s.max_seqs for s in self.stages)

    def length_of(self, seq: int) -> int:
        return self.stages[-1].lengths[seq]

    def _to_last(self, ids: torch.Tensor, base_pos: int, capture: tuple[int, ...],
                 seq: int = 0) -> tuple[torch.Tensor, list[Captured]]:
        x, captured = ids, []
        for stage in self.stages[:-1]:
            x, caps = stage.run(x, base_pos, capture=capture, seq=seq)
            captured += caps
        return x, captured

    def run(self, ids: torch.Tensor, base_pos: int, *, all_logits: bool = False,
            capture: tuple[int, ...] = (), seq: int = 0) -> tuple[torch.Tensor, list[Captured]]:
        """float32 logits ([1, vocab] for the last position, [n, vocab] with all_logits) and the
        hidden states of the `capture` layers, gathered from every stage that holds one; in
        sequence `seq` of every stage's KV cache."""
        x, captured = self._to_last(ids, base_pos, capture, seq)
        logits, caps = self.stages[-1].run(x, base_pos, all_logits=all_logits, capture=capture, seq=seq)
        return logits, captured + caps

    def forward(self, ids: torch.Tensor, base_pos: int, all_logits: bool = False) -> torch.Tensor:
        return self.run(ids, base_pos, all_logits=all_logits)[0]

    def greedy_all(self, ids: torch.Tensor, base_pos: int, *, all_logits: bool = False,
                   capture: tuple[int, ...] = (), seq: int = 0) -> tuple[list[int], list[Captured]]:
        """Argmax tokens; a remote head sends back token ids, not logits."""
        x, captured = self._to_last(ids, base_pos, capture, seq)
        tokens, caps = self.stages[-1].run_argmax(x, base_pos, all_logits=all_logits, capture=capture, seq=seq)
        return tokens, captured + caps

    def decode_batch(self, tokens: list[int], seqs: list[int], positions: list[int], *,
                     argmax: bool = False, outputs: list[int] | None = None) -> torch.Tensor | list[int]:
        """One step of several sequences at once: token i of sequence seqs[i] at positions[i] (the
        rows of one sequence at consecutive positions: a decode token, or a prompt chunk). float32
        logits of the rows `outputs` (default all), or their argmax (token ids from a remote head)
        with argmax=True."""
        x = torch.tensor(tokens, dtype=torch.long)
        for stage in self.stages[:-1]:
            x = stage.run_batch(x, seqs, positions)
        return self.stages[-1].run_batch(x, seqs, positions, tokens=argmax, outputs=outputs)

    def greedy(self, ids: torch.Tensor, base_pos: int) -> int:
        return self.greedy_all(ids, base_pos)[0][-1]

    def early_exit(self, ids: torch.Tensor, base_pos: int, layer: int) -> torch.Tensor:
        """The hidden state after `layer`, running only the layers up to it (drafting)."""
        if not 0 <= layer < self.stages[-1].span.stop:
            raise ConfigError(f"capture layer: {layer} is outside the model's {self.stages[-1].span.stop} layers")
        x = ids
        for stage in self.stages:
            inside = stage.span.start <= layer < stage.span.stop
            x, _ = stage.run(x, base_pos, stop_after=layer if inside else None)
            if inside:
                return x
        raise AssertionError("unreachable: the stages cover every layer")

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.stages[-1].project(hidden)

    def project_argmax(self, hidden: torch.Tensor) -> list[int]:
        return self.stages[-1].project_argmax(hidden)

    def truncate(self, n: int, seq: int = 0) -> None:
        for stage in self.stages:
            stage.truncate(n, seq)

    def reset(self, seq: int | None = None) -> None:
        for stage in self.stages:
            stage.reset(seq)

    def kv_copy(self, src: int, seq: int, n: int) -> int:
        """Sequence `seq` takes the first n tokens of sequence `src`, in every stage."""
        return [stage.kv_copy(src, seq, n) for stage in self.stages][-1]

    def kv_snapshot(self, slot: int, seq: int = 0) -> int:
        return [stage.kv_snapshot(slot, seq) for stage in self.stages][-1]

    def kv_restore(self, slot: int, seq: int = 0) -> int:
        return [stage.kv_restore(slot, seq) for stage in self.stages][-1]

    def kv_free(self, slot: int) -> None:
        for stage in self.stages:
            stage.kv_free(slot)
