"""The decoder-only transformer of the llama family (llama, mistral, qwen2, qwen3, qwen3moe with
mixture-of-experts feed-forwards, gemma3 with its local/global layers, gpt-oss with attention
sinks, biases everywhere and YaRN rope, and the full-attention layers of qwen35, whose
linear-attention layers are deltanet.py's) on one screen.

`ModelConfig` reads every shape and rope parameter from GGUF metadata; `Block` is one
transformer layer over a preallocated KV cache, its ops from `kernels` (Triton on GPUs, the
torch references elsewhere). Weights stay in GGUF's layout: llama files
carry q/k rows permuted for interleaved ("normal") rope, qwen files use half-split ("neox")
rope, so each family applies the rope its file was written for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from . import kernels
from .errors import ModelFormatError
from .gguf_file import GGUFFile

# architecture -> rope style its GGUF weights are laid out for
ROPE_STYLE = {"llama": "interleaved", "mistral": "interleaved", "qwen2": "neox", "qwen3": "neox", "qwen3moe": "neox",
              "gemma3": "neox", "gpt-oss": "neox", "qwen35": "neox", "qwen35moe": "neox"}
# Gemma 3: embeddings scaled by sqrt(dim), GeGLU, norms after attention and after the feed-forward
# (the GGUF's norm weights hold 1 + w, as Gemma's norms apply them), and five local layers (a
# sliding window, rope base 10000) to every global one (the file's rope base and scaling)
GEMMA3_LOCAL_ROPE_BASE, GEMMA3_PATTERN = 10000.0, 6
MOE_ARCHS = ("qwen3moe", "gpt-oss", "qwen35moe")  # a router and stacked experts instead of one feed-forward
# gpt-oss: every other layer local (a sliding window, the same rope), one learned sink logit per
# head in each softmax, biases on q/k/v, the attention output, the router and the experts, the
# clamped SwiGLU (kernels.clamped_swiglu), and its feed-forward norm named post_attention_norm
GPT_OSS_PATTERN = 2
# qwen35 (Qwen3.5, Qwen3.6): gated DeltaNet linear-attention layers (deltanet.py) with every
# full_attention_interval-th layer a full one, whose q projection carries an output gate per head
# (rows q_h then gate_h), with q/k norms and rope over the first rope.dimension_count dims of a head;
# the feed-forward norm is named post_attention_norm. The ssm.* keys give the DeltaNet's shape.
# qwen35moe: the same with qwen3moe's experts and a shared expert behind a sigmoid gate.
HYBRID_ARCHS = ("qwen35", "qwen35moe")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float
    context_length: int
    rope_base: float
    rope_dim: int
    rope_style: str
    rope_linear_factor: float
    has_rope_freqs: bool  # llama 3 rope scaling: per-frequency divisors in tensor rope_freqs.weight
    qkv_bias: bool
    qk_norm: bool
    tied_embeddings: bool
    n_experts: int = 0  # mixture of experts: experts per layer (0: a dense feed-forward)
    n_experts_used: int = 0  # the top k each token goes through
    expert_ffn_dim: int = 0
    expert_weights_norm: bool = True  # the top k's probabilities renormalized to sum to one
    shared_expert_ffn_dim: int = 0  # a shared expert beside the routed ones (qwen35moe); 0: none
    embed_scale: float = 1.0  # token embeddings are multiplied by this
    activation: str = "silu"  # the gated feed-forward's: silu (SwiGLU) or gelu (GeGLU, tanh)
    post_norms: bool = False  # RMSNorms on the attention's and the feed-forward's outputs
    attention_scale: float = 0.0  # q.k scale; 0: 1 / sqrt(head_dim)
    sliding_window: int = 0  # local layers see the last this many positions; 0: every layer global
    global_every: int = 0  # with a window: layer i is global when (i + 1) % global_every == 0
    local_rope_base: float = 0.0  # the local layers' rope base
    logit_softcap: float = 0.0  # the head's logits l -> c tanh(l / c); 0: none
    yarn: kernels.rope.Yarn | None = None  # YaRN rope scaling
    attention_sinks: bool = False  # gpt-oss: attn_sinks.weight, a logit per head
    output_bias: bool = False  # attn_output.bias
    expert_biases: bool = False  # gpt-oss: biases on the router and on each expert's matrices
    full_attention_every: int = 0  # qwen35: layer i is full attention when (i + 1) % this == 0, else DeltaNet; 0: all full
    attention_gate: bool = False  # qwen35: sigmoid(gate) on the attention output, the gate rows in attn_q
    ssm_conv_kernel: int = 0  # DeltaNet: the causal convolution's width over q/k/v
    ssm_k_dim: int = 0  # DeltaNet: the key (and query) head size, the state's rows
    ssm_k_heads: int = 0  # DeltaNet: key heads (ssm.group_count)
    ssm_v_heads: int = 0  # DeltaNet: value heads (ssm.time_step_rank), each with its own state
    ssm_inner: int = 0  # DeltaNet: value heads x value head size (ssm.inner_size)

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    @property
    def hybrid(self) -> bool:
        """Whether some layers are linear attention with a recurrent state (qwen35)."""
        return self.full_attention_every > 0

    def recurrent(self, layer: int) -> bool:
        """Whether `layer` is a linear-attention (DeltaNet) layer, with a recurrent state and no KV."""
        return self.hybrid and (layer + 1) % self.full_attention_every != 0

    @property
    def ssm_v_dim(self) -> int:
        return self.ssm_inner // self.ssm_v_heads

    @property
    def conv_dim(self) -> int:
        """Channels of the DeltaNet's convolution: q, k and v side by side."""
        return 2 * self.ssm_k_heads * self.ssm_k_dim + self.ssm_inner

    def local(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window (a local layer)."""
        return self.sliding_window > 0 and (layer + 1) % self.global_every != 0

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "ModelConfig":
        arch = gguf.architecture
        if arch not in ROPE_STYLE:
            raise ModelFormatError(
                f"model: general.architecture = {arch!r} is not supported; supported: {', '.join(sorted(ROPE_STYLE))}"
            )

        def key(name: str, default=None, required: bool = True):
            full = f"{arch}.{name}"
            if full in gguf.metadata:
                return gguf.get(full)
            if required and default is None:
                raise ModelFormatError(f"model: {gguf.path.name!r} lacks metadata key {full!r}")
            return default

        n_heads = int(key("attention.head_count"))
        dim = int(key("embedding_length"))
        head_dim = int(key("attention.key_length", dim // n_heads))
        n_kv_heads = int(key("attention.head_count_kv", n_heads))
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ModelFormatError(f"model: head_count {n_heads} is not a positive multiple of head_count_kv {n_kv_heads}")
        scaling = str(key("rope.scaling.type", "none"))
        if scaling not in ("none", "linear", "yarn"):
            raise ModelFormatError(f"model: {arch}.rope.scaling.type = {scaling!r} is not supported; supported: none, "
                                   "linear, yarn")
        if "token_embd.weight" not in gguf.tensors:
            raise ModelFormatError(f"model: {gguf.path.name!r} lacks tensor 'token_embd.weight'")
        vocab = int(key("vocab_size", gguf.tensors["token_embd.weight"].shape[1]))
        moe = arch in MOE_ARCHS
        extra = {}
        if arch == "gemma3":
            window = int(key("attention.sliding_window"))
            if window <= 0:
                raise ModelFormatError(f"model: {arch}.attention.sliding_window = {window} is not a positive window")
            n_layers = int(key("block_count"))
            # llama.cpp's rule: the 27B (62 layers) scales by its dim / heads, the others by head_dim
            per_head = dim / n_heads if n_layers == 62 else head_dim
            extra = {"embed_scale": math.sqrt(dim), "activation": "gelu", "attention_scale": 1.0 / math.sqrt(per_head),
                     "sliding_window": window, "global_every": GEMMA3_PATTERN, "local_rope_base": GEMMA3_LOCAL_ROPE_BASE,
                     "post_norms": True}
        if arch == "gpt-oss":
            window = int(key("attention.sliding_window"))
            if window <= 0:
                raise ModelFormatError(f"model: {arch}.attention.sliding_window = {window} is not a positive window")
            extra = {"sliding_window": window, "global_every": GPT_OSS_PATTERN, "local_rope_base": 0.0,
                     "activation": "clamped_swiglu", "attention_sinks": True, "output_bias": True,
                     "expert_biases": True}
        if arch in HYBRID_ARCHS:
            extra = hybrid_keys(key, arch)
        if scaling == "yarn":
            factor = float(key("rope.scaling.factor"))
            original = int(key("rope.scaling.original_context_length"))
            if factor < 1 or original <= 0:
                raise ModelFormatError(f"model: {arch}.rope.scaling.factor = {factor} is below 1 or "
                                       f"original_context_length = {original} is not positive")
            extra["yarn"] = kernels.rope.Yarn(
                factor, original, float(key("rope.scaling.yarn_beta_fast", 32.0)),
                float(key("rope.scaling.yarn_beta_slow", 1.0)), float(key("rope.scaling.attn_factor", 0.0)),
                truncate=arch != "gpt-oss")
        attention = extra.get("full_attention_every", 1) - 1  # the first attention layer: its tensors say what all have
        softcap = float(key("final_logit_softcapping", 0.0))
        if softcap:
            extra["logit_softcap"] = softcap
        if float(key("attn_logit_softcapping", 0.0)):
            raise ModelFormatError(f"model: {arch}.attn_logit_softcapping is not supported (Gemma 2's attention "
                                   "soft-capping)")
        experts: dict = {}
        if moe:
            experts = {"n_experts": int(key("expert_count")), "n_experts_used": int(key("expert_used_count")),
                       "expert_ffn_dim": int(key("expert_feed_forward_length")),
                       "shared_expert_ffn_dim": int(key("expert_shared_feed_forward_length", 0))}
            if not 0 < experts["n_experts_used"] <= experts["n_experts"] or experts["expert_ffn_dim"] <= 0:
                raise ModelFormatError(f"model: {arch}.expert_used_count {experts['n_experts_used']} and "
                                       f"expert_count {experts['n_experts']} are not 0 < used <= count, or "
                                       f"expert_feed_forward_length {experts['expert_ffn_dim']} is not positive")
        return cls(
            arch=arch,
            n_layers=int(key("block_count")),
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_dim=int(key("feed_forward_length", 0 if moe else None)),
            vocab_size=vocab,
            norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            context_length=int(key("context_length", 2048)),
            rope_base=float(key("rope.freq_base", 10000.0)),
            rope_dim=int(key("rope.dimension_count", head_dim)),
            rope_style=ROPE_STYLE[arch],
            rope_linear_factor=float(key("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
            has_rope_freqs="rope_freqs.weight" in gguf.tensors,
            qkv_bias=f"blk.{attention}.attn_q.bias" in gguf.tensors,
            qk_norm=f"blk.{attention}.attn_q_norm.weight" in gguf.tensors,
            tied_embeddings="output.weight" not in gguf.tensors,
            **experts,
            **extra,
        )


def hybrid_keys(key, arch: str) -> dict:
    """The DeltaNet's shape from llama.cpp's ssm.* keys, checked against each other."""
    shape = {"ssm_conv_kernel": int(key("ssm.conv_kernel")), "ssm_k_dim": int(key("ssm.state_size")),
             "ssm_k_heads": int(key("ssm.group_count")), "ssm_v_heads": int(key("ssm.time_step_rank")),
             "ssm_inner": int(key("ssm.inner_size"))}
    every = int(key("full_attention_interval", 4))
    if min(shape.values()) <= 0 or every <= 0 or shape["ssm_conv_kernel"] < 2:
        raise ModelFormatError(f"model: {arch}.ssm.* = {shape} and full_attention_interval = {every} are not all "
                               "positive (and the convolution at least 2 wide)")
    if shape["ssm_v_heads"] % shape["ssm_k_heads"] or shape["ssm_inner"] % shape["ssm_v_heads"]:
        raise ModelFormatError(f"model: {arch}.ssm.time_step_rank {shape['ssm_v_heads']} is not a multiple of "
                               f"ssm.group_count {shape['ssm_k_heads']}, or ssm.inner_size {shape['ssm_inner']} not a "
                               "multiple of it")
    return {**shape, "full_attention_every": every, "attention_gate": True}


def rope_tables(cfg: ModelConfig, max_ctx: int, device, rope_freqs: torch.Tensor | None = None):
    """(global, local): cos and sin, each [max_ctx, rope_dim/2] float32, for the global layers
    (the file's base and scaling) and the local ones (their own base, unscaled; the global
    tables again where the model has no local layers)."""
    full = kernels.rope_tables(cfg.rope_base, cfg.rope_dim, max_ctx, device, cfg.rope_linear_factor, rope_freqs,
                               cfg.yarn)
    if not cfg.sliding_window or not cfg.local_rope_base:  # (gpt-oss: its local layers rotate as the others)
        return full, full
    return full, kernels.rope_tables(cfg.local_rope_base, cfg.rope_dim, max_ctx, device)


@dataclass(frozen=True)
class Step:
    """Where a forward's tokens sit: `positions` [n] int64 on the stage's device, and in an eager
    run of one sequence `base_pos`, the first of them as a host int. Inside a captured graph
    `base_pos` is None: nothing on the host may change between replays, so every op reads the
    positions tensor, and the sequence too: `slots` [n] int64 names each token's sequence (the
    block then gets every sequence's cache). `batch`: rows of several sequences (a decode token
    each, or prompt chunks: consecutive rows of one sequence), where a negative position is a
    padding row; else tokens of slots[0]. `runs`: an eager batch's runs of rows of one sequence,
    planned once for every layer (attention.Runs), when some run is a prompt chunk. `seq_runs`: an
    eager batch's (first row, end row, sequence) of every run, for the DeltaNet layers' states;
    without them (a graph's step) a DeltaNet layer takes each row as one token of its slot's
    sequence. `kept_at`: in a graph's one-token step, [1] int64, the kept row (recurrent_state)
    that the DeltaNet layers write what they fed to."""

    positions: torch.Tensor
    base_pos: int | None = None
    slots: torch.Tensor | None = None
    batch: bool = False
    runs: "kernels.attention.Runs | None" = None
    seq_runs: tuple = ()
    kept_at: torch.Tensor | None = None

    @classmethod
    def eager(cls, base_pos: int, n: int, device) -> "Step":
        return cls(torch.arange(base_pos, base_pos + n, device=device), base_pos)

    @classmethod
    def batched(cls, positions: list[int], seqs: list[int], device) -> "Step":
        both = torch.tensor([positions, seqs], dtype=torch.long).to(device)
        runs = kernels.attention.Runs.of(seqs, positions, both[0])
        chunks = any(stop - start > 1 for start, stop, _, _ in runs.runs)  # else one token each: a decode batch
        return cls(both[0], slots=both[1], batch=True, runs=runs if chunks else None,
                   seq_runs=tuple((start, stop, seq) for start, stop, seq, _ in runs.runs))


class FeedForward:
    """A layer's gated feed-forward: one (gate/up stacked, then down), or a mixture of experts."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        self.cfg, self.act = cfg, ACTIVATIONS[cfg.activation]
        if cfg.moe:
            self.router, self.experts_gate_up, self.experts_down = \
                weights["ffn_gate_inp"], weights["ffn_gate_up_exps"], weights["ffn_down_exps"]
            self.expert_biases = kernels.ExpertBiases(weights["ffn_gate_inp_bias"], weights["ffn_gate_up_exps_bias"],
                                                      weights["ffn_down_exps_bias"]) if cfg.expert_biases else None
        else:
            self.ffn_gate_up, self.ffn_down = weights["ffn_gate_up"], weights["ffn_down"]
        self.shared = weights.get("ffn_gate_up_shexp") is not None
        if self.shared:
            self.ffn_gate_up, self.ffn_down = weights["ffn_gate_up_shexp"], weights["ffn_down_shexp"]
            self.shared_gate = weights["ffn_gate_inp_shexp"].reshape(1, -1)

    def __call__(self, h: torch.Tensor, hq=None) -> torch.Tensor:
        """h [n, dim], and where `quantizes_input` said so, hq: h quantized (its norm's kernel did it)."""
        if not self.cfg.moe:
            return self.dense(h, hq)
        out = kernels.moe(h, self.router, self.experts_gate_up, self.experts_down, self.cfg.n_experts_used,
                          self.cfg.expert_weights_norm, self.act, self.expert_biases, hq)
        if self.shared:  # the shared expert, behind its sigmoid gate
            out = out + torch.sigmoid(kernels.linear(h, self.shared_gate)) * self.dense(h, hq)
        return out

    def quantizes_input(self, x: torch.Tensor) -> bool:
        """Whether its first products multiply rows like x quantized."""
        if self.cfg.moe and kernels.moe_quantizes_input(x, self.experts_gate_up, self.cfg.n_experts_used, self.act):
            return True
        return (not self.cfg.moe or self.shared) and kernels.integer_rows(x, self.ffn_gate_up)

    def dense(self, h: torch.Tensor, hq=None) -> torch.Tensor:
        gate_up = kernels.linear(h, self.ffn_gate_up, xq=hq)
        if kernels.integer_rows(h, self.ffn_down):  # the unit's kernel quantizes what it writes, for the down product
            hidden, hidden_q = kernels.gated_quantized(self.act, gate_up)
            return kernels.linear(hidden, self.ffn_down, xq=hidden_q)
        return kernels.linear(self.act(gate_up), self.ffn_down)


class Block:
    """One transformer layer. `weights` holds its tensors in device layout: q/k/v fused into
    `attn_qkv` (rows q, then k, then v) and gate/up into `ffn_gate_up`, as the loader builds them;
    a matrix is dense or quantized (kernels.QuantizedWeight), whichever the loader kept."""

    recurrent = False  # a DeltaNet layer (deltanet.py) is, with a state instead of KV

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], layer: int = 0):
        self.cfg = cfg
        self.local = cfg.local(layer)  # a sliding-window layer, with the local rope tables
        self.window = cfg.sliding_window if self.local else 0
        self.attn_norm, self.ffn_norm = weights["attn_norm"], weights["ffn_norm"]
        self.post_attention_norm, self.post_ffw_norm = weights.get("post_attention_norm"), weights.get("post_ffw_norm")
        self.attn_qkv, self.attn_qkv_bias = weights["attn_qkv"], weights.get("attn_qkv_bias")
        self.q_norm, self.k_norm = weights.get("attn_q_norm"), weights.get("attn_k_norm")
        self.attn_output, self.attn_output_bias = weights["attn_output"], weights.get("attn_output_bias")
        self.sinks = weights.get("attn_sinks")
        self.feed_forward = FeedForward(cfg, weights)
        self.scale = cfg.attention_scale or 1.0 / math.sqrt(cfg.head_dim)

    def __call__(self, x, ropes: tuple, k_cache, v_cache, step: Step) -> torch.Tensor:
        """x: [n, dim] at `step`'s positions; ropes: the cos/sin tables of the global and the local
        layers (model.rope_tables); k/v_cache: one sequence's
        [kv_heads, max_ctx, head_dim], or every sequence's [max_seqs, ...] for a step with slots
        (a batch: the matrix products run once over all rows, so the weights are read once per
        step, not once per sequence; attention reads each row's own sequence)."""
        cfg, n = self.cfg, x.shape[0]
        h, hq = kernels.normed(x, self.attn_norm, cfg.norm_eps, kernels.integer_rows(x, self.attn_qkv))
        qkv = kernels.linear(h, self.attn_qkv, self.attn_qkv_bias, xq=hq)
        gate = None
        if cfg.attention_gate:
            qkv, gate = split_gate(qkv, cfg)
        q = kernels.rope_kv_write(qkv, *ropes[self.local], step.positions, k_cache, v_cache, cfg.n_heads,
                                  cfg.rope_style, self.q_norm, self.k_norm, cfg.norm_eps, step.slots)
        attn = self.attend(q, k_cache, v_cache, step).reshape(n, cfg.n_heads * cfg.head_dim)
        if gate is not None:
            attn = attn * torch.sigmoid(gate)
        out = kernels.linear(attn, self.attn_output, self.attn_output_bias)
        if self.post_attention_norm is not None:
            out = kernels.rms_norm(out, self.post_attention_norm, cfg.norm_eps)
        x, h, hq = kernels.add_normed(x, out, self.ffn_norm, cfg.norm_eps, self.feed_forward.quantizes_input(x))
        out = self.feed_forward(h, hq)
        if self.post_ffw_norm is not None:
            out = kernels.rms_norm(out, self.post_ffw_norm, cfg.norm_eps)
        return x + out

    def attend(self, q, k_cache, v_cache, step: Step) -> torch.Tensor:
        """q [n, heads, head_dim] over the cache: the cached-attention kernel for a few tokens, a
        batch of sequences and always inside a graph; scaled_dot_product_attention over the live
        prefix for an eager prefill."""
        cfg, n = self.cfg, q.shape[0]
        if step.runs is not None:  # an eager mixed step with prompt chunks in it
            return kernels.attention.ragged_attention(q, k_cache, v_cache, step.positions, step.slots, step.runs,
                                                      self.scale, self.window, self.sinks)
        # with sinks (no scaled_dot_product_attention takes them), a prefill too goes to the kernel
        if step.base_pos is None or kernels.attention.kernel_takes(q) \
                or (self.sinks is not None and kernels.attention.use_triton(q)):
            return kernels.cached_attention(q, k_cache, v_cache, step.positions, self.scale, step.slots, step.batch,
                                            self.window, sinks=self.sinks)
        if self.sinks is not None:
            return kernels.attention.attention_reference(q, k_cache, v_cache, step.positions, self.scale,
                                                         window=self.window, sinks=self.sinks)
        end = step.base_pos + n
        # query i sees keys up to base_pos + i: causal, aligned to the last key. A bias object, not
        # a mask tensor, so flash attention serves it (a mask tensor sends it to a backend that
        # plans anew for every new key length, tens of ms each on a GPU); a sliding window needs one
        mask = causal_lower_right(n, end) if n > 1 else None
        if self.window:
            mask = kernels.attention.seen_keys(step.base_pos, n, end, self.window, q.device)
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k_cache[None, :, :end], v_cache[None, :, :end], attn_mask=mask,
            scale=self.scale, enable_gqa=cfg.n_heads != cfg.n_kv_heads,
        )
        return attn[0].transpose(0, 1)


def split_gate(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """qwen35's fused projection, its q rows a query and a gate per head, -> (q/k/v as rope_kv_write
    takes them, the gate [n, heads * head_dim])."""
    n, width = qkv.shape[0], 2 * cfg.n_heads * cfg.head_dim
    q_gate = qkv[:, :width].view(n, cfg.n_heads, 2, cfg.head_dim)
    q = q_gate[:, :, 0].reshape(n, width // 2)
    return torch.cat((q, qkv[:, width:]), dim=1), q_gate[:, :, 1].reshape(n, width // 2)


ACTIVATIONS = {"silu": kernels.silu_mul, "gelu": kernels.gelu_mul, "clamped_swiglu": kernels.clamped_swiglu}

# a Block's weights -> the GGUF tensors (short names) stacked row-wise into each
BLOCK_WEIGHTS = {
    "attn_norm": ("attn_norm.weight",), "attn_qkv": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
    "attn_output": ("attn_output.weight",), "ffn_norm": ("ffn_norm.weight",),
}
FFN_WEIGHTS = {"ffn_gate_up": ("ffn_gate.weight", "ffn_up.weight"), "ffn_down": ("ffn_down.weight",)}
BIAS_WEIGHTS = {"attn_qkv_bias": ("attn_q.bias", "attn_k.bias", "attn_v.bias")}
# a mixture of experts instead of ffn_gate_up / ffn_down: the router, and each expert's gate and up
# stacked per expert ([E, 2 * ff, dim]; in blocks, the pair of QuantizedExperts) and its down ([E, dim, ff])
MOE_WEIGHTS = {"ffn_gate_inp": ("ffn_gate_inp.weight",), "ffn_gate_up_exps": ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
               "ffn_down_exps": ("ffn_down_exps.weight",)}
QK_NORM_WEIGHTS = {"attn_q_norm": ("attn_q_norm.weight",), "attn_k_norm": ("attn_k_norm.weight",)}
POST_NORM_WEIGHTS = {"post_attention_norm": ("post_attention_norm.weight",), "post_ffw_norm": ("post_ffw_norm.weight",)}
# gpt-oss: its feed-forward norm is stored as post_attention_norm; sinks; biases of the output and
# the experts (gate and up side by side per expert, like their matrices)
GPT_OSS_WEIGHTS = {"ffn_norm": ("post_attention_norm.weight",), "attn_sinks": ("attn_sinks.weight",),
                   "attn_output_bias": ("attn_output.bias",), "ffn_gate_inp_bias": ("ffn_gate_inp.bias",),
                   "ffn_gate_up_exps_bias": ("ffn_gate_exps.bias", "ffn_up_exps.bias"),
                   "ffn_down_exps_bias": ("ffn_down_exps.bias",)}


# qwen35: the feed-forward norm stored as post_attention_norm; a DeltaNet layer's q/k/v, output gate,
# beta and decay inputs in one product (ssm_in), its convolution, decay (ssm_a = -exp(A_log), ssm_dt
# the bias before the softplus), gated norm and output
QWEN35_WEIGHTS = {"ffn_norm": ("post_attention_norm.weight",)}
DELTANET_WEIGHTS = {
    "attn_norm": ("attn_norm.weight",), "ffn_norm": ("post_attention_norm.weight",),
    "ssm_in": ("attn_qkv.weight", "attn_gate.weight", "ssm_beta.weight", "ssm_alpha.weight"),
    "ssm_conv1d": ("ssm_conv1d.weight",), "ssm_a": ("ssm_a",), "ssm_dt": ("ssm_dt.bias",),
    "ssm_norm": ("ssm_norm.weight",), "ssm_out": ("ssm_out.weight",),
}


# qwen35moe: a shared expert beside the routed ones, its gate one row
SHARED_EXPERT_WEIGHTS = {"ffn_gate_up_shexp": ("ffn_gate_shexp.weight", "ffn_up_shexp.weight"),
                         "ffn_down_shexp": ("ffn_down_shexp.weight",), "ffn_gate_inp_shexp": ("ffn_gate_inp_shexp.weight",)}


def block_weights(cfg: ModelConfig, layer: int = 0) -> dict[str, tuple[str, ...]]:
    """The weights of layer `layer`: a Block's, or a DeltaNet layer's where cfg.recurrent(layer)."""
    weights = {**(DELTANET_WEIGHTS if cfg.recurrent(layer) else BLOCK_WEIGHTS), **(MOE_WEIGHTS if cfg.moe else FFN_WEIGHTS)}
    if cfg.shared_expert_ffn_dim:
        weights.update(SHARED_EXPERT_WEIGHTS)
    if cfg.recurrent(layer):
        return weights
    if cfg.qkv_bias:
        weights.update(BIAS_WEIGHTS)
    if cfg.qk_norm:
        weights.update(QK_NORM_WEIGHTS)
    if cfg.post_norms:
        weights.update(POST_NORM_WEIGHTS)
    if cfg.arch == "gpt-oss":
        weights.update(GPT_OSS_WEIGHTS)
    if cfg.hybrid:
        weights.update(QWEN35_WEIGHTS)
    return weights


def block_tensor_names(cfg: ModelConfig, layer: int = 0) -> tuple[str, ...]:
    return tuple(name for parts in block_weights(cfg, layer).values() for name in parts)
