"""`RecurrentState`: the conv and recurrent states of a stage's DeltaNet layers, per sequence slot,
and the ways back to an earlier position that speculative rollback and the prefix cache need.

A KV cache goes back by moving a length; a recurrent state cannot be undone. So:
- **Sequence 0** (where speculative decoding and the drafters run) keeps a *mark*, a copy of its
  state at some position, and what every layer fed its convolution and recurrence for each row
  since (deltanet.Fed, at most KEEP_ROWS rows). Going back to a position p at or after the mark
  restores the mark and replays the kept rows up to p, one token at a time with the very
  arithmetic that computed them: the state comes back bit for bit. A forward of at most
  KEEP_ROWS rows is kept, moving the mark to where it starts when the rows would not fit; a
  longer one (a prompt) drops the mark.
- **Snapshots** (the prefix cache) copy a sequence's state at its length, beside its KV.
- **Early exits** (the capture drafter) run on a scratch copy, so the state a verify starts from
  is never touched by a draft.
- **Graph steps** (runner.GraphRunner) cannot ask the host where rows go: the states hold one slot
  more than there are sequences (`padding_slot`), which a batch graph's padding rows run through,
  and the kept rows one more row (`SCRATCH_ROW`), which a one-token graph writes to when its step
  keeps nothing; `begin` still decides on the host, and the row to write is staged like a position.
Any other position is refused by name: nothing silently computes from a wrong state.
"""

from __future__ import annotations

import torch

from .deltanet import Fed
from .errors import ConfigError
from .kernels import deltanet as rule
from .model import ModelConfig

KEEP_ROWS = 64  # rows of sequence 0 replayable after its mark: a verify of up to 63 drafts rolls back exactly
SCRATCH_ROW = KEEP_ROWS  # the row past the kept ones: what a graph step that keeps nothing writes goes here


def state_bytes(cfg: ModelConfig, layers: int, seqs: int, element: int) -> int:
    """What RecurrentState holds for `layers` DeltaNet layers and `seqs` sequences: the states
    (the recurrent one float32) with the padding slot, sequence 0's mark, and its kept rows with
    the scratch row."""
    conv = cfg.conv_dim * (cfg.ssm_conv_kernel - 1) * element
    ssm = cfg.ssm_v_heads * cfg.ssm_k_dim * cfg.ssm_v_dim * 4
    row = cfg.conv_dim * element + (2 * cfg.ssm_k_heads * cfg.ssm_k_dim + cfg.ssm_inner + 2 * cfg.ssm_v_heads) * 4
    return layers * ((seqs + 2) * (conv + ssm) + (KEEP_ROWS + 1) * row)


class RecurrentState:
    def __init__(self, cfg: ModelConfig, layers: int, max_seqs: int, dtype: torch.dtype, device: torch.device):
        self.cfg = cfg
        conv_shape = (cfg.conv_dim, cfg.ssm_conv_kernel - 1)
        ssm_shape = (cfg.ssm_v_heads, cfg.ssm_k_dim, cfg.ssm_v_dim)
        # every sequence's slot and the padding slot after them; conv and ssm are the sequences' part
        self.padding_slot = max_seqs
        self.padded_conv = torch.zeros(layers, max_seqs + 1, *conv_shape, dtype=dtype, device=device)
        self.padded_ssm = torch.zeros(layers, max_seqs + 1, *ssm_shape, dtype=torch.float32, device=device)
        self.conv, self.ssm = self.padded_conv[:, :max_seqs], self.padded_ssm[:, :max_seqs]
        self.mark: int | None = None  # the position of mark_conv / mark_ssm (sequence 0), None: no way back
        self.mark_conv = torch.zeros(layers, *conv_shape, dtype=dtype, device=device)
        self.mark_ssm = torch.zeros(layers, *ssm_shape, dtype=torch.float32, device=device)
        self.kept = 0  # rows fed since the mark, in `rows`
        key = (cfg.ssm_k_heads, cfg.ssm_k_dim)
        self.rows = Fed(*(torch.zeros(layers, KEEP_ROWS + 1, *shape, dtype=kind, device=device) for shape, kind in (
            ((cfg.conv_dim,), dtype), (key, torch.float32), (key, torch.float32),
            ((cfg.ssm_v_heads, cfg.ssm_v_dim), torch.float32), ((cfg.ssm_v_heads,), torch.float32),
            ((cfg.ssm_v_heads,), torch.float32))))
        self.snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.draft: tuple[int, torch.Tensor, torch.Tensor] | None = None  # early exits: (position, conv, ssm)

    @property
    def nbytes(self) -> int:
        tensors = (self.padded_conv, self.padded_ssm, self.mark_conv, self.mark_ssm, *self.rows)
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- forwards ---------------------------------------------------------------------------

    def begin(self, seq: int, at: int, n: int) -> bool:
        """Before a forward of n rows of `seq` from position `at` (where its state stands): whether
        its rows are to be kept (`keep`), the mark moved here first when they would not fit."""
        if seq != 0:
            return False
        self.draft = None
        if n > KEEP_ROWS:
            self.mark = None
            return False
        if self.mark is None or self.mark + self.kept != at or self.kept + n > KEEP_ROWS:
            self.mark_conv.copy_(self.conv[:, 0])
            self.mark_ssm.copy_(self.ssm[:, 0])
            self.mark, self.kept = at, 0
        return True

    def keep(self, layer: int, fed: Fed) -> None:
        """What layer `layer` (of this stage) fed for the forward `begin` said to keep."""
        t = fed.mixed.shape[0]
        for kept, new in zip(self.rows, fed):
            kept[layer, self.kept : self.kept + t] = new

    def kept_rows(self, layer: int) -> Fed:
        """The kept rows of layer `layer` (of this stage), which a graph's one-token step writes
        what it fed to, at a row staged by the host from `begin` (`kept`, or SCRATCH_ROW)."""
        return Fed(*(kept[layer] for kept in self.rows))

    def kept_forward(self, n: int) -> None:
        """Every layer has kept the n rows of the forward."""
        self.kept += n

    def forget(self, seq: int) -> None:
        """`seq` moved on by rows that were not kept (a batch step): no way back into them."""
        if seq == 0:
            self.mark, self.draft = None, None

    def draft_state(self, at: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The scratch state an early exit at `at` in sequence 0 runs on: the one the last early
        exit left, when it ended at `at`, else a copy of the state at `at`."""
        if self.draft is None or self.draft[0] != at:
            conv, ssm = self.state_at(0, at, length)
            self.draft = (at, conv.clone(), ssm.clone())
        return self.draft[1], self.draft[2]

    def drafted(self, end: int) -> None:
        self.draft = (end, *self.draft[1:])

    # -- positions ----------------------------------------------------------------------------

    def state_at(self, seq: int, at: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The state of `seq` at position `at`, its live state standing at `length`: (conv, ssm),
        each with a first dimension of layers (views of the live state when at == length)."""
        if at == length:
            return self.conv[:, seq], self.ssm[:, seq]
        if at == 0:
            return torch.zeros_like(self.conv[:, seq]), torch.zeros_like(self.ssm[:, seq])
        if seq == 0 and self.mark is not None and self.mark <= at <= self.mark + self.kept:
            return self._replayed(at - self.mark)
        held = f"{self.mark}..{self.mark + self.kept}, " if seq == 0 and self.mark is not None else ""
        raise ConfigError(f"position {at}: the {self.cfg.arch} recurrent state of sequence {seq} is held only at "
                          f"positions {held}{length} and 0 (a DeltaNet state cannot be undone beyond what was kept)")

    def _replayed(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The mark's state after the first m kept rows."""
        rows = [kept[:, :m] for kept in self.rows]
        conv = torch.cat((self.mark_conv, rows[0].transpose(1, 2).to(self.mark_conv.dtype)), dim=2)
        conv = conv[:, :, conv.shape[2] - self.mark_conv.shape[2]:]
        ssm = self.mark_ssm.clone()
        for layer in range(ssm.shape[0]):
            q, k, v, g, beta = (r[layer, None] for r in rows[1:])
            ssm[layer] = rule.recurrent(q, k, v, g, beta, self.mark_ssm[layer, None])[1][0]
        return conv, ssm

    def rewind(self, seq: int, at: int, length: int) -> None:
        """Make the live state of `seq` the one at position `at` (speculative rollback)."""
        if at == length:
            return
        if at == 0:
            self.reset(seq)
            return
        conv, ssm = self.state_at(seq, at, length)  # (a replay from sequence 0's mark: it holds no other)
        self.conv[:, seq], self.ssm[:, seq] = conv, ssm
        self.draft, self.kept = None, at - self.mark

    def reset(self, seq: int | None = None) -> None:
        """Every sequence, or one, back to the empty state."""
        if seq is None:
            self.padded_conv.zero_()
            self.padded_ssm.zero_()
        else:
            self.conv[:, seq] = 0
            self.ssm[:, seq] = 0
        if seq in (None, 0):
            self.mark, self.draft = 0, None
            self.kept = 0
            self.mark_conv.zero_()
            self.mark_ssm.zero_()

    def copy(self, src: int, seq: int, n: int, length: int) -> None:
        """`seq` takes the state of `src` at position n (its live state standing at `length`)."""
        conv, ssm = self.state_at(src, n, length)
        if src != seq:
            self.conv[:, seq], self.ssm[:, seq] = conv, ssm
            self.forget(seq)
        else:
            self.rewind(seq, n, length)

    # -- snapshots (the prefix cache) --------------------------------------------------------------

    def snapshot(self, slot: int, seq: int) -> None:
        self.snapshots[slot] = (self.conv[:, seq].clone(), self.ssm[:, seq].clone())

    def restore(self, slot: int, seq: int) -> None:
        self.conv[:, seq], self.ssm[:, seq] = self.snapshots[slot]
        self.forget(seq)

    def free(self, slot: int) -> None:
        self.snapshots.pop(slot, None)
