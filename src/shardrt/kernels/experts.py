"""A mixture of experts' stacked matrices kept in their GGUF blocks on the device.

GGUF stores each expert tensor as one 3-D stack, experts x rows x cols, expert by expert. Read as
a matrix of experts * rows rows, it is an ordinary quantized matrix, so `QuantizedExperts` holds
it as one `QuantizedWeight` (the planes of `quant.split_planes`) and the expert stride: expert e's
row r is row e * rows + r of every plane. Its bytes are the file's (plus the unpacked scales of
`quant.EXTRA_BYTES`). The kernels that read it are in `moe_qdot`; here are the plain views:
one expert's matrix, for the products of a prefill, and the chosen experts' matrices
dequantized, for the float gathered path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import quant
from .quant import QuantizedWeight


@dataclass(frozen=True)
class QuantizedExperts:
    """`count` matrices [rows, cols] of one GGUF type, stacked by rows into `stacked`."""

    stacked: QuantizedWeight
    count: int

    @classmethod
    def from_blocks(cls, raw: np.ndarray, qtype: quant.Q, count: int, cols: int,
                    device: torch.device) -> "QuantizedExperts":
        """raw: uint8 [count * rows, row_bytes], the tensor's bytes as the file holds them."""
        return cls(quant.quantized_weight(raw, qtype, cols, device), count)

    @property
    def qtype(self) -> quant.Q:
        return self.stacked.qtype

    @property
    def rows(self) -> int:
        """Rows of one expert's matrix."""
        return self.stacked.rows // self.count

    @property
    def cols(self) -> int:
        return self.stacked.cols

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.count, self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        return self.stacked.nbytes

    @property
    def device(self) -> torch.device:
        return self.stacked.device

    def expert(self, e: int) -> QuantizedWeight:
        """Expert e's matrix: views of its rows of every plane, no copy."""
        rows = slice(e * self.rows, (e + 1) * self.rows)
        return QuantizedWeight(self.qtype, self.rows, self.cols, tuple(p[rows] for p in self.stacked.planes))

    def dequantize(self, experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The matrices of `experts` (a device tensor of ids, [m]) in `dtype`: [m, rows, cols]. Only
        their rows are read, and no id reaches the host, so it runs inside a captured graph."""
        rows = (experts.reshape(-1, 1) * self.rows + torch.arange(self.rows, device=experts.device)).reshape(-1)
        return quant.embedding(rows, self.stacked, dtype).view(-1, self.rows, self.cols)
