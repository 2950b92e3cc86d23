"""`Stage`: a contiguous layer range of one model on one torch device, with its own KV cache (and
the recurrent state of its DeltaNet layers, recurrent_state.py).

The same class runs inside the coordinator and inside a worker daemon. The first stage takes
token ids, every other stage a boundary activation; the stage with the head returns logits.
On a GPU, steps of a few tokens replay captured graphs (`runner.GraphRunner`); everything else,
and every step on a CPU, runs the eager layer loop, which stays the reference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError
from .gguf_file import GGUFFile
from .gguf_loader import MIB, LayerSpan, StageWeights
from . import kernels
from .kernels.attention import MAX_QUERY_TOKENS
from .kernels.support import bf16_native, device_kernel_path
from .deltanet import DeltaNetBlock
from .model import Block, ModelConfig, Step, rope_tables
from .recurrent_state import SCRATCH_ROW, RecurrentState

log = logging.getLogger(__name__)

# A GPU stage prefills in chunks of at most 1024 tokens, each padded up to one of these sizes, and
# runs each size once at load: the first use of a new matrix shape loads and selects kernels
# (~1 s on an H200), which would otherwise land on the first request of every new prompt length.
PREFILL_BUCKETS = (32, 64, 128, 256, 512, 1024)


def prefill_buckets(max_prefill: int) -> tuple[int, ...]:
    """The chunk sizes of a stage that prefills up to `max_prefill` tokens at once: the buckets
    above, doubled on past 1024 (a PFlash drafter takes a long prompt in a few launches of every
    layer, not in one per 1024 tokens: its layers are small, and launching them costs more than
    running them)."""
    if max_prefill < PREFILL_BUCKETS[-1] or max_prefill & (max_prefill - 1):
        raise ConfigError(f"max_prefill: {max_prefill} is not a power of two of at least {PREFILL_BUCKETS[-1]}")
    buckets = PREFILL_BUCKETS
    while buckets[-1] < max_prefill:
        buckets += (2 * buckets[-1],)
    return buckets


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
    if device.type == "cuda" and bf16_native(device):
        return torch.bfloat16
    return torch.float16


def batch_ends(seqs: list[int], positions: list[int], lengths: list[int], max_ctx: int) -> dict[int, int]:
    """The length each sequence of a batch will hold after it, checking its rows: consecutive
    positions in order, the first at most what the sequence holds, the last inside max_ctx."""
    ends: dict[int, int] = {}
    for seq, pos in zip(seqs, positions):
        if not 0 <= seq < len(lengths):
            raise ConfigError(f"seqs: sequence {seq} is outside 0..{len(lengths) - 1} (max_seqs {len(lengths)})")
        want = ends.get(seq)
        if want is None and not 0 <= pos <= lengths[seq] or want is not None and pos != want or pos >= max_ctx:
            held = f"the {lengths[seq]} tokens cached" if want is None else f"the row before it, at {want - 1},"
            raise ConfigError(f"positions: {pos} for sequence {seq} does not follow {held} (max_ctx {max_ctx})")
        ends[seq] = pos + 1
    return ends


class Stage:
    def __init__(self, model_path: str | Path, start: int, stop: int, device: str | torch.device = "cpu",
                 max_ctx: int = 4096, dtype: torch.dtype | None = None, graphs: bool = True,
                 weights: str = "auto", max_seqs: int = 1, max_prefill: int = PREFILL_BUCKETS[-1]):
        t0 = time.perf_counter()
        self.prefill_buckets = prefill_buckets(max_prefill)
        self.model_path = Path(model_path)
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        with GGUFFile(model_path) as gguf:
            self.cfg = ModelConfig.from_gguf(gguf)
            self.span = LayerSpan.of(start, stop, self.cfg.n_layers)
            if max_ctx <= 0:
                raise ConfigError(f"max_ctx: {max_ctx} is not a positive number of tokens")
            self.max_ctx = max_ctx
            if max_seqs <= 0:
                raise ConfigError(f"max_seqs: {max_seqs} is not a positive number of sequences")
            self.max_seqs = max_seqs
            # a GPU keeps quantized matrices in their blocks (auto: where the kernels run); a CPU
            # computes with dequantized ones
            self.kernels = device_kernel_path(self.device)
            self.quantized = self.device.type != "cpu" and (
                weights == "quantized" or (weights == "auto" and self.kernels.path == "triton"))
            if self.quantized and self.kernels.path != "triton":
                log.warning("%s: --weights quantized on a GPU that runs the torch references (%s): every product "
                            "dequantizes its matrix in float32; --weights auto holds them dense", self.device,
                            self.kernels.reason)
            loader = StageWeights(gguf, self.cfg, self.span, quantized=self.quantized)
            self.cover = loader.cover
            try:
                self._load(loader)
            except torch.OutOfMemoryError as exc:
                raise ConfigError(f"{self.device}: out of memory loading layers {self.span} with max_ctx {max_ctx} "
                                  f"({str(exc).splitlines()[0]}); see `shardrt plan` for what it needs") from None
            self.bytes_read = loader.bytes_read
            if loader.without_kernel:  # said once per stage: these matrices take 2-4x their file bytes
                log.warning("layers %s on %s: %s have no quantized kernel and are dequantized to %s", self.span,
                            self.device, ", ".join(f"{n} matrices of {t}" for t, n in sorted(loader.without_kernel.items())),
                            str(self.dtype).removeprefix("torch."))
        self.lengths = [0] * max_seqs  # tokens each sequence holds in the KV cache, valid in every layer
        self._partial_end = 0  # end of the last early-exit (stop_after) write, in sequence 0
        self.snapshots: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.forwards, self.forward_seconds, self.graph_forwards = 0, 0.0, 0
        self.runner = None
        if self.device.type != "cpu":
            self._warm_up()
            # a hybrid model (DeltaNet layers) gets graphs for one token of one sequence and for
            # batches of one token per sequence only: in a larger token bucket the padding rows after
            # the real ones would run through the recurrence (runner.py), so its verifies and prompt
            # chunks stay eager
            if graphs and self.device.type == "cuda":  # torch.cuda drives ROCm builds too
                from .kernels._triton import use_triton
                from .runner import GraphRunner, batch_buckets

                # batch graphs need the Triton kernels: the references pick real rows on the host
                self.runner = GraphRunner(self, batches=batch_buckets(max_seqs) if use_triton(self.k_cache) else ())
        self.load_seconds = time.perf_counter() - t0
        log.info("stage %s on %s: %s, loaded in %.2fs", self.span, self.device, self.cover, self.load_seconds)

    def _load(self, weights: StageWeights) -> None:
        cfg, dev, dt = self.cfg, self.device, self.dtype
        self.blocks, self.weight_bytes = [], 0
        for i in range(self.span.start, self.span.stop):
            block = weights.load_block(i, dev, dt)
            self.weight_bytes += sum(kernels.weight_bytes(w) for w in block.values())
            self.blocks.append((DeltaNetBlock if cfg.recurrent(i) else Block)(cfg, block, layer=i))
        rope_freqs = weights.load("rope_freqs.weight", dev, torch.float32) if cfg.has_rope_freqs else None
        self.ropes = rope_tables(cfg, self.max_ctx, dev, rope_freqs)
        self.embedding = weights.load("token_embd.weight", dev, dt) if self.span.embed else None
        if self.span.head:
            self.output_norm = weights.load("output_norm.weight", dev, dt)
            head_name = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
            self.output = self.embedding if head_name == "token_embd.weight" and self.embedding is not None \
                else weights.load(head_name, dev, dt)
        self.weight_bytes += sum(kernels.weight_bytes(w) for w in (
            self.embedding, getattr(self, "output_norm", None),
            self.output if self.span.head and self.output is not self.embedding else None))
        # each block's row of the KV cache (attention layers) or of the recurrent state (DeltaNet layers)
        attention = [i for i, b in enumerate(self.blocks) if not b.recurrent]
        recurrent = [i for i, b in enumerate(self.blocks) if b.recurrent]
        self.row_of = {i: row for rows in (attention, recurrent) for row, i in enumerate(rows)}
        cache_shape = (len(attention), self.max_seqs, cfg.n_kv_heads, self.max_ctx, cfg.head_dim)
        self.k_cache = torch.zeros(cache_shape, device=dev, dtype=dt)
        self.v_cache = torch.zeros(cache_shape, device=dev, dtype=dt)
        self.state = RecurrentState(cfg, len(recurrent), self.max_seqs, dt, dev) if recurrent else None

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Throwaway forwards, so a GPU's lazy initialisation and kernel selection are paid at load
        time, not by the first request: one prefill chunk of every size, and a one-token step."""
        # every chunk size, then a prompt of two chunks (attention over keys before the chunk)
        sizes = [b for b in self.prefill_buckets if b < self.max_ctx] or [1]
        if 2 * sizes[-1] < self.max_ctx:
            sizes.append(2 * sizes[-1])
        for n in sizes:
            self.reset()
            x = torch.zeros(n, dtype=torch.long) if self.span.embed else torch.zeros(n, self.cfg.dim, dtype=self.dtype)
            self._run(x, 0, False, (), None, False, 0)
        if n < self.max_ctx:
            self._run(x[:1], n, False, (), None, False, 0)
        torch.cuda.synchronize(self.device)
        self.reset()

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, base_pos: int, *, all_logits: bool = False, capture: tuple[int, ...] = (),
            stop_after: int | None = None, seq: int = 0) -> tuple[torch.Tensor, list[Captured]]:
        """Run `inputs` at positions base_pos.. through this stage.

        inputs: token ids [n] on the embedding stage, else a boundary activation [n, dim].
        Returns the activation [n, dim], or float32 logits ([1, vocab] for the last position,
        [n, vocab] with all_logits) on the stage with the head; and the hidden states after each
        layer in `capture` that this stage holds. With `stop_after`, only layers up to and
        including that one run (an early exit for drafting): it returns that layer's hidden state
        and leaves the cache length alone, its partial KV to be overwritten by the next full run.
        `seq` picks the sequence slot of the KV cache (0..max_seqs-1).
        """
        return self._timed(self._run, inputs, base_pos, all_logits, capture, stop_after, False, seq)

    @torch.inference_mode()
    def run_argmax(self, inputs: torch.Tensor, base_pos: int, *, all_logits: bool = False,
                   capture: tuple[int, ...] = (), seq: int = 0) -> tuple[list[int], list[Captured]]:
        """Greedy tokens (the last, or every position) from the stage with the head."""
        if not self.span.head:
            raise ConfigError(f"argmax: stage {self.span} does not hold the head")
        return self._timed(self._run, inputs, base_pos, all_logits, capture, None, True, seq)

    @torch.inference_mode()
    def run_batch(self, inputs: torch.Tensor, seqs: list[int], positions: list[int], *,
                  tokens: bool = False, outputs: list[int] | None = None) -> torch.Tensor | list[int]:
        """Tokens of several sequences in one forward: inputs [b] token ids on the embedding stage,
        else a boundary activation [b, dim]; row i is sequence seqs[i]'s token at positions[i]. The
        rows of one sequence have consecutive positions, in order, the first at most its cached
        length (a position before the end overwrites): one row each for a decode step, many for a
        prompt chunk, both in one step. Returns the activation [b, dim], or on the stage with the
        head float32 logits (their argmax with tokens=True) of the rows `outputs` (default all).
        On a GPU it replays the smallest captured batch graph that holds b rows; larger steps run
        eagerly, padded to a power of two."""
        return self._timed(self._run_batch, inputs, seqs, positions, tokens, outputs)

    # the interface of a RemoteStage, whose daemon computes while its caller goes on: here the
    # work is done at once and the returned function gives its result
    def start_batch(self, inputs: torch.Tensor, seqs: list[int], positions: list[int], *, tokens: bool = False,
                    outputs: list[int] | None = None):
        out = self.run_batch(inputs, seqs, positions, tokens=tokens, outputs=outputs)
        return lambda: out

    def _timed(self, run, inputs, *args):
        t0 = time.perf_counter()
        try:
            return run(inputs, *args)
        except torch.OutOfMemoryError as exc:
            raise ConfigError(f"{self.device}: out of memory running {inputs.shape[0]} tokens through layers "
                              f"{self.span} ({str(exc).splitlines()[0]})") from None
        finally:
            self.forwards += 1
            self.forward_seconds += time.perf_counter() - t0

    def _check_seq(self, seq: int, field: str = "seq") -> None:
        if not 0 <= seq < self.max_seqs:
            raise ConfigError(f"{field}: sequence {seq} is outside 0..{self.max_seqs - 1} (max_seqs {self.max_seqs})")

    def _run_batch(self, inputs, seqs, positions, tokens, outputs):
        b = inputs.shape[0]
        if b == 0 or len(seqs) != b or len(positions) != b:
            raise ConfigError(f"batch: {b} inputs for {len(seqs)} sequences and {len(positions)} positions")
        if tokens and not self.span.head:
            raise ConfigError(f"argmax: stage {self.span} does not hold the head")
        ends = batch_ends(seqs, positions, self.lengths, self.max_ctx)
        if outputs is not None and (not outputs or sorted(set(outputs)) != list(outputs) or not 0 <= outputs[0]
                                    or outputs[-1] >= b):
            raise ConfigError(f"outputs: {list(outputs)[:8]} are not increasing rows of the {b} in the batch")
        if self.state is not None:  # each sequence from the state at its first row; a batch keeps no way back
            for seq in ends:
                self.state.rewind(seq, positions[seqs.index(seq)], self.lengths[seq])
                self.state.forget(seq)
        # a recurrent state's batch graph takes one row per sequence (a decode batch)
        graphable = self.runner is not None and (self.state is None or len(ends) == b)
        bucket = self.runner.batch_bucket(b) if graphable else None
        if bucket is not None:
            graphed = self.runner.replay_batch(inputs, seqs, positions, bucket)
            self.graph_forwards += 1
            rows = slice(0, b) if outputs is None else torch.tensor(outputs, device=self.device)
        else:
            # the head ran on `outputs` (or on every row, padding included: keep the batch's own)
            graphed, rows = self._eager_batch(inputs, seqs, positions, outputs), slice(None if outputs else b)
        for seq, end in ends.items():
            self._set_length(seq, end)
        if not self.span.head:  # a graph's output is overwritten by its next replay
            return graphed.hidden[-1][:b].clone() if bucket else graphed.hidden[-1][:b]
        if tokens:
            return graphed.tokens[rows].tolist()
        return graphed.logits[rows].clone() if bucket else graphed.logits[rows]

    def _eager_batch(self, inputs, seqs, positions, outputs):
        """A step too large for a batch graph. On a GPU its rows are padded to a power of two (up to
        1024, the prefill buckets the stage ran at load, so cuBLAS meets no new shape): padding rows
        sit at position -1, where they write no KV and see no keys. Only the rows of `outputs` go
        through the head."""
        b = inputs.shape[0]
        pad = 0
        if self.device.type != "cpu":
            pad = min(max(b, 1 << (b - 1).bit_length()), max(b, PREFILL_BUCKETS[-1])) - b
        if pad:
            filler = inputs[:1].expand(pad, *inputs.shape[1:]) if inputs.dim() > 1 else inputs.new_zeros(pad)
            inputs = torch.cat([inputs.to(self.device), filler.to(self.device)])
            seqs, positions = list(seqs) + [0] * pad, list(positions) + [-1] * pad
        rows = None if outputs is None else torch.tensor(outputs, device=self.device)
        return self.step_outputs(inputs, Step.batched(positions, seqs, self.device), every_layer=False, rows=rows)

    def _run(self, inputs, base_pos, all_logits, capture, stop_after, tokens, seq):
        n = inputs.shape[0]
        self._check_seq(seq)
        if stop_after is not None and seq != 0:
            raise ConfigError(f"stop_after: early exits run in sequence 0, not {seq}")
        length = self.lengths[seq]
        limit = max(length, self._partial_end) if stop_after is not None else length
        if not 0 <= base_pos <= limit:
            raise ConfigError(f"base_pos: {base_pos} is outside the {length} cached tokens")
        if n == 0 or base_pos + n > self.max_ctx:
            raise ConfigError(f"tokens: {n} at position {base_pos} do not fit max_ctx {self.max_ctx}")
        last = self.span.stop - 1 if stop_after is None else stop_after
        if not self.span.start <= last < self.span.stop:
            raise ConfigError(f"stop_after: layer {stop_after} is outside this stage's layers {self.span}")
        keep = {layer for layer in capture if self.span.start <= layer <= last}
        if self.state is not None and stop_after is None:
            self.state.rewind(seq, base_pos, length)  # a forward from before the end starts from the state there
        graphable = self.runner is not None and stop_after is None
        bucket = self.runner.bucket(n, base_pos) if graphable else None
        if bucket is not None:
            # a recurrent state: what the graph's layers feed is kept where `begin` says, as `_layers` does
            kept = self.state is not None and self.state.begin(seq, base_pos, n)
            graphed = self.runner.replay(inputs, base_pos, bucket, seq,
                                         kept_at=self.state.kept if kept else SCRATCH_ROW)
            if kept:
                self.state.kept_forward(n)
            self.graph_forwards += 1
            hidden = {layer: graphed.hidden[layer - self.span.start][:n] for layer in keep | {last}}
        elif self.device.type != "cpu" and n > MAX_QUERY_TOKENS:
            graphed, hidden = None, self._prefill(inputs, base_pos, last, keep, seq)
        else:
            graphed = None
            hidden = self._layers(self._embed(inputs), Step.eager(base_pos, n, self.device), last, keep, seq,
                                  draft=stop_after is not None)
        captured = [Captured(layer, base_pos, hidden[layer].clone()) for layer in sorted(keep)]
        if stop_after is not None:
            self._partial_end = base_pos + n
            if self.state is not None:
                self.state.drafted(base_pos + n)
            return hidden[last], captured
        self._set_length(seq, base_pos + n)
        if not self.span.head:
            return (hidden[last].clone() if graphed else hidden[last]), captured
        rows = slice(0, n) if all_logits else slice(n - 1, n)
        if graphed is not None:
            out = graphed.tokens[rows].tolist() if tokens else graphed.logits[rows].clone()
        else:
            logits = self._project(hidden[last][rows])
            out = logits.argmax(-1).tolist() if tokens else logits
        return out, captured

    def _embed(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.span.embed:
            x = kernels.embedding(inputs.to(self.device), self.embedding, self.dtype)
            # Gemma scales by sqrt(dim) rounded to the compute dtype first, as transformers does
            return x if self.cfg.embed_scale == 1.0 else x * torch.tensor(self.cfg.embed_scale, dtype=self.dtype)
        return inputs.to(device=self.device, dtype=self.dtype)

    def _prefill(self, inputs: torch.Tensor, base_pos: int, last: int, keep: set[int],
                 seq: int) -> dict[int, torch.Tensor]:
        """Many tokens on a GPU: chunks of at most the largest prefill bucket, each padded up to a
        bucket size the warm-up ran (the padding rows sit after the real ones: no real query sees
        them, and the next real tokens overwrite their KV)."""
        pieces, n, largest = [], inputs.shape[0], self.prefill_buckets[-1]
        for start in range(0, n, largest):
            count = min(largest, n - start)
            pos = base_pos + start
            padded = next((b for b in self.prefill_buckets if b >= count and pos + b <= self.max_ctx), count) \
                if self.state is None else count  # padding rows would run through a recurrent state
            chunk = inputs[start : start + count]
            if padded > count:
                chunk = torch.cat((chunk, chunk.new_zeros((padded - count, *chunk.shape[1:]))))
            hidden = self._layers(self._embed(chunk), Step.eager(pos, padded, self.device), last, keep, seq)
            pieces.append({layer: h[:count] for layer, h in hidden.items()})
        if len(pieces) == 1:
            return pieces[0]
        return {layer: torch.cat([p[layer] for p in pieces]) for layer in pieces[0]}

    def _layers(self, x: torch.Tensor, step: Step, last: int, keep: set[int], seq: int = 0,
                draft: bool = False) -> dict[int, torch.Tensor]:
        """The hidden states after layer `last` and after each layer in `keep`, for n tokens of
        one sequence. A `draft` (an early exit) runs the DeltaNet layers on a scratch state."""
        hidden, n, state = {}, x.shape[0], self.state
        runs, kept = ((0, n, seq),), False
        if state is not None and draft:
            conv, ssm = state.draft_state(step.base_pos, self.lengths[seq])
            conv, ssm, runs = conv[:, None], ssm[:, None], ((0, n, 0),)
        elif state is not None:
            conv, ssm = state.conv, state.ssm
            kept = state.begin(seq, step.base_pos, n)
        for i, block in enumerate(self.blocks[: last - self.span.start + 1]):
            row = self.row_of[i]
            if not block.recurrent:
                x = block(x, self.ropes, self.k_cache[row, seq], self.v_cache[row, seq], step)
            elif kept:
                x, fed = block(x, conv[row], ssm[row], runs, keep=True)
                state.keep(row, fed)
            else:
                x = block(x, conv[row], ssm[row], runs)
            if self.span.start + i in keep:
                hidden[self.span.start + i] = x
        if kept:
            state.kept_forward(n)
        hidden[last] = x
        return hidden

    def step_outputs(self, inputs: torch.Tensor, step: Step, every_layer: bool = True,
                     rows: torch.Tensor | None = None) -> "StepOutputs":
        """The whole stage as the graph runner captures it: every layer's hidden state (or only
        the last), and on the stage with the head the logits of every row (or of `rows`) and their
        argmax. The step's slots name the sequence of each row. A DeltaNet layer follows the host's
        runs of an eager batch (`seq_runs`); a graph's step has none, and there each row is one
        token of its slot's sequence, a padding row (position < 0) one of the padding slot."""
        from .runner import StepOutputs

        x, hidden, state = self._embed(inputs), [], self.state
        graphed = state is not None and not step.seq_runs
        if graphed:
            if not step.batch and x.shape[0] > 1:
                raise ConfigError(f"graph step: {x.shape[0]} tokens of one sequence through a recurrent state; "
                                  "a graph step of a hybrid model takes one token per sequence")
            seqs = torch.where(step.positions >= 0, step.slots, state.padding_slot)
        for i, block in enumerate(self.blocks):
            row = self.row_of[i]
            if block.recurrent and graphed:
                kept = state.kept_rows(row) if step.kept_at is not None else None
                x = block.decode(x, state.padded_conv[row], state.padded_ssm[row], seqs, kept, step.kept_at)
            elif block.recurrent:
                x = block(x, state.conv[row], state.ssm[row], step.seq_runs)
            else:
                x = block(x, self.ropes, self.k_cache[row], self.v_cache[row], step)
            if every_layer or i == len(self.blocks) - 1:
                hidden.append(x)
        logits = self._project(x if rows is None else x[rows]) if self.span.head else None
        return StepOutputs(hidden, logits, logits.argmax(-1) if logits is not None else None)

    def forward(self, inputs: torch.Tensor, base_pos: int, all_logits: bool = False, seq: int = 0) -> torch.Tensor:
        return self.run(inputs, base_pos, all_logits=all_logits, seq=seq)[0]

    @torch.inference_mode()
    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head over hidden states [n, dim] -> float32 logits [n, vocab]."""
        if not self.span.head:
            raise ConfigError(f"project: stage {self.span} does not hold the head")
        return self._project(hidden.to(device=self.device, dtype=self.dtype))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        h, hq = kernels.normed(x, self.output_norm, self.cfg.norm_eps, kernels.integer_rows(x, self.output))
        logits = kernels.linear(h, self.output, xq=hq).float()
        cap = self.cfg.logit_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap

    def project_argmax(self, hidden: torch.Tensor) -> list[int]:
        return self.project(hidden).argmax(-1).tolist()

    @property
    def length(self) -> int:
        """Tokens sequence 0 holds (the one sequence of `launch`)."""
        return self.lengths[0]

    def truncate(self, n: int, seq: int = 0) -> None:
        """Forget a sequence's KV beyond its first n tokens (speculative rollback)."""
        self._check_seq(seq)
        if not 0 <= n <= self.lengths[seq]:
            raise ConfigError(f"kv_truncate: {n} is outside the {self.lengths[seq]} cached tokens")
        if self.state is not None:
            self.state.rewind(seq, n, self.lengths[seq])
        self._set_length(seq, n)

    def _set_length(self, seq: int, n: int) -> None:
        """A sequence now holds n valid tokens; in sequence 0 that ends any early exit's partial KV."""
        self.lengths[seq] = n
        if seq == 0:
            self._partial_end = 0

    def reset(self, seq: int | None = None) -> None:
        """Empty one sequence, or every one."""
        if seq is None:
            self.lengths, self._partial_end = [0] * self.max_seqs, 0
            if self.state is not None:
                self.state.reset()
        else:
            self.truncate(0, seq)

    def kv_copy(self, src: int, seq: int, n: int) -> int:
        """Make sequence `seq` hold the first n tokens of sequence `src` (a prompt prefix that
        another running request has prefilled); returns n."""
        self._check_seq(src, "src_seq")
        self._check_seq(seq)
        if not 0 <= n <= self.lengths[src]:
            raise ConfigError(f"kv_copy: {n} is outside the {self.lengths[src]} tokens cached for sequence {src}")
        if self.state is not None:
            self.state.copy(src, seq, n, self.lengths[src])
        if src != seq:
            self.k_cache[:, seq, :, :n] = self.k_cache[:, src, :, :n]
            self.v_cache[:, seq, :, :n] = self.v_cache[:, src, :, :n]
        self._set_length(seq, n)
        return n

    # -- KV snapshots: numbered slots kept in this process, for prefix reuse and rollback --------

    def kv_snapshot(self, slot: int, seq: int = 0) -> int:
        """Copy a sequence's cached tokens into `slot` (replacing what it held); returns their count."""
        self._check_seq(seq)
        n = self.lengths[seq]
        self.snapshots[slot] = (n, self.k_cache[:, seq, :, :n].clone(), self.v_cache[:, seq, :, :n].clone())
        if self.state is not None:
            self.state.snapshot(slot, seq)
        return n

    def kv_restore(self, slot: int, seq: int = 0) -> int:
        """Put the tokens of `slot` into a sequence (any sequence: slots are shared)."""
        self._check_seq(seq)
        if slot not in self.snapshots:
            raise ConfigError(f"kv_restore: slot {slot} holds no snapshot")
        n, k, v = self.snapshots[slot]
        if n > self.max_ctx:
            raise ConfigError(f"kv_restore: slot {slot} holds {n} tokens, more than max_ctx {self.max_ctx}")
        self.k_cache[:, seq, :, :n] = k
        self.v_cache[:, seq, :, :n] = v
        if self.state is not None:
            self.state.restore(slot, seq)
        self._set_length(seq, n)
        return n

    def kv_free(self, slot: int) -> None:
        if self.snapshots.pop(slot, None) is None:
            raise ConfigError(f"kv_free: slot {slot} holds no snapshot")
        if self.state is not None:
            self.state.free(slot)

    @property
    def has_head(self) -> bool:
        return self.span.head

    def stats(self) -> dict:
        """The same numbers a daemon's `stats` reply carries for each of its stages."""
        out = {"forwards": self.forwards, "forward_seconds": self.forward_seconds, "length": self.length,
               "lengths": list(self.lengths), "cover": [str(self.cover)], "graph_forwards": self.graph_forwards,
               "weight_bytes": self.weight_bytes, "quantized": self.quantized, "kernels": self.kernels.describe()}
        if self.state is not None:
            out["state_bytes"] = self.state.nbytes
        if self.quantized:  # which product path each matrix and row count took (this process's)
            out["quantized_paths"] = kernels.quant.choices()
        if self.runner is not None:
            out["graphs"] = self.runner.describe()
        if self.device.type == "cuda":
            out["device_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        return out

    def kernels_line(self) -> str:
        """Which kernels run this stage and how it holds its matrices, e.g. 'kernels triton, weights as blocks'."""
        return f"kernels {self.kernels.describe()}, weights as {'blocks' if self.quantized else 'dense'}"

    def describe(self) -> str:
        graphs = ""
        if self.runner is not None:
            graphs = f", graphs for {','.join(map(str, self.runner.buckets))} tokens"
            if self.runner.batch_buckets:
                graphs += f" and batches of {','.join(map(str, self.runner.batch_buckets))}"
        weights = f"weights {self.weight_bytes / MIB:.1f} MiB"
        return f"layers {self.span} on {self.device} ({self.dtype}), {self.cover}, {weights}, {self.kernels_line()}{graphs}"
