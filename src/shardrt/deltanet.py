"""`DeltaNetBlock`: one linear-attention layer of qwen35 (Qwen3.5 / Qwen3.6's gated DeltaNet) with
its feed-forward (qwen35moe's experts), over the conv and recurrent states of its sequences instead
of a KV cache.

One product gives the mixed q/k/v, the output gate z, beta and the decay input a; q/k/v pass a
causal depthwise convolution (SiLU) that carries the last kernel - 1 inputs of each sequence; q
and k are L2-normalised, and the delta rule (kernels.deltanet) updates each value head's state:
decay exp(g) with g = ssm_a * softplus(a + ssm_dt) (ssm_a = -exp(A_log)), write strength
sigmoid(b). The heads' outputs go through an RMSNorm gated by silu(z), then the output projection.

Two ways through the states: the host's runs of rows of each sequence (eager forwards: prompts,
verifies, batches with prompt chunks), and `decode`, one token per row with the rows' sequences
in a device tensor, which a CUDA graph captures (runner.GraphRunner).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import kernels
from .kernels import deltanet as rule
from .model import FeedForward, ModelConfig


class Fed(NamedTuple):
    """What a layer fed its convolution and recurrence for some rows of one sequence: enough to
    replay them from an earlier state bit for bit (recurrent_state.RecurrentState)."""

    mixed: torch.Tensor  # [t, conv_dim], the convolution's inputs
    q: torch.Tensor  # [t, key_heads, k_dim] float32, normalised and scaled
    k: torch.Tensor  # [t, key_heads, k_dim] float32, normalised
    v: torch.Tensor  # [t, heads, v_dim] float32
    g: torch.Tensor  # [t, heads] float32, the log decay
    beta: torch.Tensor  # [t, heads] float32


class DeltaNetBlock:
    recurrent = True

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], layer: int = 0):
        self.cfg, self.layer = cfg, layer
        self.attn_norm, self.ffn_norm = weights["attn_norm"], weights["ffn_norm"]
        self.ssm_in, self.conv1d, self.norm, self.out = \
            weights["ssm_in"], weights["ssm_conv1d"], weights["ssm_norm"], weights["ssm_out"]
        self.a, self.dt = weights["ssm_a"].float(), weights["ssm_dt"].float()
        self.feed_forward = FeedForward(cfg, weights)
        self.shape = rule.Shape(cfg.ssm_k_heads, cfg.ssm_k_dim, cfg.ssm_v_heads, cfg.ssm_v_dim)

    def __call__(self, x: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor, runs, keep: bool = False):
        """x [n, dim]; conv [seqs, conv_dim, kernel - 1] and ssm [seqs, heads, k_dim, v_dim] the
        states of this layer's sequences, updated in place; runs: (first row, end row, sequence) of
        the rows of each sequence, in position order (rows outside every run are padding, left
        alone). Returns the layer's output, and with `keep` (one run) also what it fed (`Fed`)."""
        cfg, n = self.cfg, x.shape[0]
        mixed, z, b, a = self._projection(x)
        core = torch.zeros(n, cfg.ssm_v_heads, cfg.ssm_v_dim, dtype=torch.float32, device=x.device)
        fed = None
        single = [r for r in runs if r[1] - r[0] == 1]  # decode rows of many sequences: one step for all
        if single and not keep:
            rows = torch.tensor([start for start, _, _ in single], device=x.device)
            seqs = torch.tensor([seq for _, _, seq in single], device=x.device)
            core[rows] = rule.decode_step(mixed[rows], a[rows], b[rows], conv, ssm, seqs, self.conv1d, self.a, self.dt,
                                          self.shape)
            single = []
        groups = ([single] if single else []) + [[r] for r in runs if r[1] - r[0] > 1]
        g, beta = rule.decay_and_strength(a, b, self.a, self.dt) if groups else (None, None)
        for group in groups:
            rows = torch.cat([torch.arange(start, stop, device=x.device) for start, stop, _ in group])
            seqs = torch.tensor([seq for _, _, seq in group], device=x.device)
            t = group[0][1] - group[0][0]
            out, conv[seqs], ssm[seqs], fed = self._rule(
                mixed[rows].view(len(group), t, -1), g[rows].view(len(group), t, -1),
                beta[rows].view(len(group), t, -1), conv[seqs], ssm[seqs])
            core[rows] = out.reshape(-1, cfg.ssm_v_heads, cfg.ssm_v_dim)
        x = self._output(x, core, z)
        return (x, fed) if keep else x

    def decode(self, x: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor, seqs: torch.Tensor,
               kept: Fed | None = None, kept_at: torch.Tensor | None = None) -> torch.Tensor:
        """The graph-safe form of a decode step: row i of x [n, dim] is one token of sequence
        seqs[i] ([n] int64 on the device; distinct, but for the padding slot that a graph's padding
        rows name, whose state is scratch). The states are read and written where that index puts
        them, so nothing here waits for the device or depends on its values: the same launches for
        every replay of a bucket. With `kept` (this layer's kept rows) what row 0 fed goes to its row
        kept_at ([1] int64 on the device)."""
        mixed, z, b, a = self._projection(x)
        core = rule.decode_step(mixed, a, b, conv, ssm, seqs, self.conv1d, self.a, self.dt, self.shape, kept, kept_at)
        return self._output(x, core, z)

    def _projection(self, x: torch.Tensor):
        """The one product's parts for rows x: (mixed, z, b, a), views of it."""
        cfg, heads = self.cfg, self.cfg.ssm_v_heads
        h, hq = kernels.normed(x, self.attn_norm, cfg.norm_eps, kernels.integer_rows(x, self.ssm_in))
        return kernels.linear(h, self.ssm_in, xq=hq).split([cfg.conv_dim, cfg.ssm_inner, heads, heads], dim=1)

    def _output(self, x: torch.Tensor, core: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The heads' outputs core [n, heads, v_dim] (float32) through the gated norm, the output
        projection and the feed-forward, added to x."""
        cfg, n = self.cfg, x.shape[0]
        gated = rule.gated_rms_norm(core, z.view(n, cfg.ssm_v_heads, cfg.ssm_v_dim), self.norm, cfg.norm_eps, x.dtype)
        x, h, hq = kernels.add_normed(x, kernels.linear(gated.reshape(n, cfg.ssm_inner), self.out), self.ffn_norm,
                                      cfg.norm_eps, self.feed_forward.quantizes_input(x))
        return x + self.feed_forward(h, hq)

    def _rule(self, mixed, g, beta, conv, ssm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Fed]:
        """The convolution and the delta rule over [b, t, ...] rows of b sequences from their states
        conv and ssm ([b, ...], not changed): (out, the conv state after, the ssm state after, what
        the first sequence fed)."""
        qkv, conv = rule.causal_conv(mixed, conv, self.conv1d)
        q, k, v = rule.split_heads(qkv, self.shape)
        delta = rule.recurrent if mixed.shape[1] <= rule.CHUNK else rule.chunked
        out, ssm = delta(q, k, v, g, beta, ssm)
        return out, conv, ssm, Fed(mixed[0], q[0], k[0], v[0], g[0], beta[0])

