"""`Pipeline`: the ordered stages that together hold a whole model, run as one.

A stage may live in this process or behind IPC; the pipeline only needs `forward`,
`truncate` and `reset` from each, and passes the boundary activation from one to the next.
"""

from __future__ import annotations

import torch

from .errors import PlacementError


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

    def _to_last(self, ids: torch.Tensor, base_pos: int) -> torch.Tensor:
        x = ids
        for stage in self.stages[:-1]:
            x = stage.forward(x, base_pos)
        return x

    def forward(self, ids: torch.Tensor, base_pos: int, all_logits: bool = False) -> torch.Tensor:
        """float32 logits: [1, vocab] for the last position, or [n, vocab] with all_logits."""
        return self.stages[-1].forward(self._to_last(ids, base_pos), base_pos, all_logits=all_logits)

    def greedy(self, ids: torch.Tensor, base_pos: int) -> int:
        """The argmax next token; a remote head sends back the token id, not the logits."""
        return self.stages[-1].argmax(self._to_last(ids, base_pos), base_pos)

    def truncate(self, n: int) -> None:
        for stage in self.stages:
            stage.truncate(n)

    def reset(self) -> None:
        for stage in self.stages:
            stage.reset()
