"""`Stage`: a contiguous layer range of one model on one torch device, with its own KV cache.

The same class runs inside the coordinator and inside a worker daemon. The first stage takes
token ids, every other stage a boundary activation; the stage with the head returns logits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError
from .gguf_file import GGUFFile
from .gguf_loader import LayerSpan, StageWeights
from .model import Block, ModelConfig, rms_norm, rope_tables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Captured:
    """A capture slice: the hidden states after `layer` for `count` tokens from position `start`."""

    layer: int
    start: int
    data: torch.Tensor  # [count, dim]

    @property
    def count(self) -> int:
        return self.data.shape[0]


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' or a torch dtype name -> the dtype a stage on `device` computes in."""
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


class Stage:
    def __init__(self, model_path: str | Path, start: int, stop: int, device: str | torch.device = "cpu",
                 max_ctx: int = 4096, dtype: torch.dtype | None = None):
        t0 = time.perf_counter()
        self.model_path = Path(model_path)
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        with GGUFFile(model_path) as gguf:
            self.cfg = ModelConfig.from_gguf(gguf)
            self.span = LayerSpan.of(start, stop, self.cfg.n_layers)
            if max_ctx <= 0:
                raise ConfigError(f"max_ctx: {max_ctx} is not a positive number of tokens")
            self.max_ctx = max_ctx
            weights = StageWeights(gguf, self.cfg, self.span)
            self.cover = weights.cover
            self._load(weights)
            self.bytes_read = weights.bytes_read
        self.length = 0  # tokens held in the KV cache, valid in every layer
        self._partial_end = 0  # end of the last early-exit (stop_after) write
        self.snapshots: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.forwards, self.forward_seconds = 0, 0.0
        if self.device.type != "cpu":
            self._warm_up()
        self.load_seconds = time.perf_counter() - t0
        log.info("stage %s on %s: %s, loaded in %.2fs", self.span, self.device, self.cover, self.load_seconds)

    def _load(self, weights: StageWeights) -> None:
        cfg, dev, dt = self.cfg, self.device, self.dtype
        self.blocks = [Block(cfg, weights.load_block(i, dev, dt)) for i in range(self.span.start, self.span.stop)]
        rope_freqs = weights.load("rope_freqs.weight", dev, torch.float32) if cfg.has_rope_freqs else None
        self.cos, self.sin = rope_tables(cfg, self.max_ctx, dev, rope_freqs)
        self.embedding = weights.load("token_embd.weight", dev, dt) if self.span.embed else None
        if self.span.head:
            self.output_norm = weights.load("output_norm.weight", dev, dt)
            head_name = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
            self.output = self.embedding if head_name == "token_embd.weight" and self.embedding is not None \
                else weights.load(head_name, dev, dt)
        cache_shape = (len(self.blocks), cfg.n_kv_heads, self.max_ctx, cfg.head_dim)
        self.k_cache = torch.zeros(cache_shape, device=dev, dtype=dt)
        self.v_cache = torch.zeros(cache_shape, device=dev, dtype=dt)

    def _warm_up(self) -> None:
        """One throwaway token, so a GPU's lazy initialisation is paid at load time, not by the first request."""
        x = torch.zeros(1, dtype=torch.long) if self.span.embed else torch.zeros(1, self.cfg.dim, dtype=self.dtype)
        self.forward(x, 0)
        torch.cuda.synchronize(self.device)
        self.reset()

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, base_pos: int, *, all_logits: bool = False, capture: tuple[int, ...] = (),
            stop_after: int | None = None) -> tuple[torch.Tensor, list[Captured]]:
        """Run `inputs` at positions base_pos.. through this stage.

        inputs: token ids [n] on the embedding stage, else a boundary activation [n, dim].
        Returns the activation [n, dim], or float32 logits ([1, vocab] for the last position,
        [n, vocab] with all_logits) on the stage with the head; and the hidden states after each
        layer in `capture` that this stage holds. With `stop_after`, only layers up to and
        including that one run (an early exit for drafting): it returns that layer's hidden state
        and leaves the cache length alone, its partial KV to be overwritten by the next full run.
        """
        t0 = time.perf_counter()
        try:
            return self._run(inputs, base_pos, all_logits, capture, stop_after)
        finally:
            self.forwards += 1
            self.forward_seconds += time.perf_counter() - t0

    def _run(self, inputs, base_pos, all_logits, capture, stop_after):
        n = inputs.shape[0]
        limit = max(self.length, self._partial_end) if stop_after is not None else self.length
        if not 0 <= base_pos <= limit:
            raise ConfigError(f"base_pos: {base_pos} is outside the {self.length} cached tokens")
        if n == 0 or base_pos + n > self.max_ctx:
            raise ConfigError(f"tokens: {n} at position {base_pos} do not fit max_ctx {self.max_ctx}")
        last = self.span.stop - 1 if stop_after is None else stop_after
        if not self.span.start <= last < self.span.stop:
            raise ConfigError(f"stop_after: layer {stop_after} is outside this stage's layers {self.span}")
        if self.span.embed:
            x = torch.nn.functional.embedding(inputs.to(self.device), self.embedding)
        else:
            x = inputs.to(device=self.device, dtype=self.dtype)
        cos, sin = self.cos[base_pos : base_pos + n], self.sin[base_pos : base_pos + n]
        captured = []
        for i, block in enumerate(self.blocks[: last - self.span.start + 1]):
            x = block(x, cos, sin, self.k_cache[i], self.v_cache[i], base_pos)
            if self.span.start + i in capture:
                captured.append(Captured(self.span.start + i, base_pos, x.clone()))
        if stop_after is not None:
            self._partial_end = base_pos + n
            return x, captured
        self.length, self._partial_end = base_pos + n, 0
        if not self.span.head:
            return x, captured
        return self.project(x if all_logits else x[-1:]), captured

    def forward(self, inputs: torch.Tensor, base_pos: int, all_logits: bool = False) -> torch.Tensor:
        return self.run(inputs, base_pos, all_logits=all_logits)[0]

    @torch.inference_mode()
    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head over hidden states [n, dim] -> float32 logits [n, vocab]."""
        if not self.span.head:
            raise ConfigError(f"project: stage {self.span} does not hold the head")
        x = hidden.to(device=self.device, dtype=self.dtype)
        return torch.nn.functional.linear(rms_norm(x, self.output_norm, self.cfg.norm_eps), self.output).float()

    def run_argmax(self, inputs: torch.Tensor, base_pos: int, *, all_logits: bool = False,
                   capture: tuple[int, ...] = ()) -> tuple[list[int], list[Captured]]:
        """Greedy tokens (the last, or every position) from the stage with the head."""
        logits, captured = self.run(inputs, base_pos, all_logits=all_logits, capture=capture)
        return logits.argmax(-1).tolist(), captured

    def project_argmax(self, hidden: torch.Tensor) -> list[int]:
        return self.project(hidden).argmax(-1).tolist()

    def truncate(self, n: int) -> None:
        """Forget KV beyond the first n tokens (speculative rollback)."""
        if not 0 <= n <= self.length:
            raise ConfigError(f"kv_truncate: {n} is outside the {self.length} cached tokens")
        self.length, self._partial_end = n, 0

    def reset(self) -> None:
        self.length, self._partial_end = 0, 0

    # -- KV snapshots: numbered slots kept in this process, for prefix reuse and rollback --------

    def kv_snapshot(self, slot: int) -> int:
        """Copy the cached tokens into `slot` (replacing what it held); returns their count."""
        n = self.length
        self.snapshots[slot] = (n, self.k_cache[:, :, :n].clone(), self.v_cache[:, :, :n].clone())
        return n

    def kv_restore(self, slot: int) -> int:
        if slot not in self.snapshots:
            raise ConfigError(f"kv_restore: slot {slot} holds no snapshot")
        n, k, v = self.snapshots[slot]
        if n > self.max_ctx:
            raise ConfigError(f"kv_restore: slot {slot} holds {n} tokens, more than max_ctx {self.max_ctx}")
        self.k_cache[:, :, :n] = k
        self.v_cache[:, :, :n] = v
        self.length, self._partial_end = n, 0
        return n

    def kv_free(self, slot: int) -> None:
        if self.snapshots.pop(slot, None) is None:
            raise ConfigError(f"kv_free: slot {slot} holds no snapshot")

    @property
    def has_head(self) -> bool:
        return self.span.head

    def stats(self) -> dict:
        """The same numbers a daemon's `stats` reply carries."""
        return {"forwards": self.forwards, "forward_seconds": self.forward_seconds, "length": self.length,
                "cover": [str(self.cover)]}

    def describe(self) -> str:
        return f"layers {self.span} on {self.device} ({self.dtype}), {self.cover}"
