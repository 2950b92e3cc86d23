"""The feature ring: capture slices (hidden states of chosen layers) by position, for a draft.

Slot = position mod capacity, so the ring always holds the most recent `capacity` positions of
every capture layer; a DFlash-style draft conditions on these features.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..stage import Captured


class FeatureRing:
    def __init__(self, layers: tuple[int, ...], dim: int, capacity: int = 4096):
        if capacity <= 0:
            raise ConfigError(f"feature ring capacity: {capacity} is not a positive number of positions")
        self.layers, self.dim, self.capacity = tuple(layers), dim, capacity
        self._index = {layer: i for i, layer in enumerate(self.layers)}
        self.data = torch.zeros(len(self.layers), capacity, dim, dtype=torch.float32)
        self.position = torch.full((len(self.layers), capacity), -1, dtype=torch.long)  # which position a slot holds

    def write(self, captured: list[Captured]) -> None:
        for piece in captured:
            if piece.layer not in self._index:
                continue
            li = self._index[piece.layer]
            positions = torch.arange(piece.start, piece.start + piece.count)[-self.capacity:]
            slots = positions % self.capacity  # distinct: at most `capacity` consecutive positions
            self.data[li, slots] = piece.data.detach().float().cpu()[-self.capacity:]
            self.position[li, slots] = positions

    def write_one(self, layer: int, position: int, hidden: torch.Tensor) -> None:
        self.write([Captured(layer, position, hidden.reshape(1, -1))])

    def read(self, layer: int, start: int, count: int = 1) -> torch.Tensor:
        """Hidden states [count, dim] of `layer` at positions start..start+count."""
        if layer not in self._index:
            raise ConfigError(f"feature ring: layer {layer} is not captured (captured: {list(self.layers)})")
        li = self._index[layer]
        positions = torch.arange(start, start + count)
        slots = positions % self.capacity
        if not torch.equal(self.position[li, slots], positions):
            raise ConfigError(f"feature ring: positions {start}..{start + count} of layer {layer} are not held")
        return self.data[li, slots].clone()
