"""`DeltaNetBlock`: one linear-attention layer of qwen35 (Qwen3.5 / Qwen3.6's gated DeltaNet) with
its feed-forward (qwen35moe's experts), over the conv and recurrent states of its sequences instead
of a KV cache.

One product gives the mixed q/k/v, the output gate z, beta and the decay input a; q/k/v pass a
causal depthwise convolution (SiLU) that carries the last kernel - 1 inputs of each sequence; q
and k are L2-normalised, and the delta rule (kernels.deltanet) updates each value head's state:
decay exp(g) with g = ssm_a * softplus(a + ssm_dt) (ssm_a = -exp(A_log)), write strength
sigmoid(b). The heads' outputs go through an RMSNorm gated by silu(z), then the output projection.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

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

    def __call__(self, x: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor, runs, keep: bool = False):
        """x [n, dim]; conv [seqs, conv_dim, kernel - 1] and ssm [seqs, heads, k_dim, v_dim] the
        states of this layer's sequences, updated in place; runs: (first row, end row, sequence) of
        the rows of each sequence, in position order (rows outside every run are padding, left
        alone). Returns the layer's output, and with `keep` (one run) also what it fed (`Fed`)."""
        cfg, n = self.cfg, x.shape[0]
        heads, v_dim = cfg.ssm_v_heads, cfg.ssm_v_dim
        h = kernels.rms_norm(x, self.attn_norm, cfg.norm_eps)
        mixed, z, b, a = kernels.linear(h, self.ssm_in).split([cfg.conv_dim, cfg.ssm_inner, heads, heads], dim=1)
        beta = b.float().sigmoid()
        g = self.a * F.softplus(a.float() + self.dt)
        core = torch.zeros(n, heads, v_dim, dtype=torch.float32, device=x.device)
        fed = None
        single = [r for r in runs if r[1] - r[0] == 1]  # decode rows of many sequences: one step for all
        groups = ([single] if single else []) + [[r] for r in runs if r[1] - r[0] > 1]
        for group in groups:
            rows = torch.cat([torch.arange(start, stop, device=x.device) for start, stop, _ in group])
            seqs = torch.tensor([seq for _, _, seq in group], device=x.device)
            t = group[0][1] - group[0][0]
            out, fed = self._rule(mixed[rows].view(len(group), t, -1), g[rows].view(len(group), t, -1),
                                  beta[rows].view(len(group), t, -1), conv, ssm, seqs)
            core[rows] = out.reshape(-1, heads, v_dim)
        gated = rule.gated_rms_norm(core.to(x.dtype), z.view(n, heads, v_dim), self.norm, cfg.norm_eps)
        x, h = kernels.add_rms_norm(x, kernels.linear(gated.reshape(n, cfg.ssm_inner), self.out), self.ffn_norm,
                                    cfg.norm_eps)
        x = x + self.feed_forward(h)
        return (x, fed) if keep else x

    def _rule(self, mixed, g, beta, conv, ssm, seqs) -> tuple[torch.Tensor, Fed]:
        """The convolution and the delta rule over [b, t, ...] rows of the sequences `seqs`."""
        cfg = self.cfg
        b, t = mixed.shape[:2]
        qkv, conv[seqs] = rule.causal_conv(mixed, conv[seqs], self.conv1d)
        key = cfg.ssm_k_heads * cfg.ssm_k_dim
        q, k, v = qkv.split([key, key, cfg.ssm_inner], dim=-1)
        q = rule.l2_normalise(q.reshape(b, t, cfg.ssm_k_heads, cfg.ssm_k_dim)) * cfg.ssm_k_dim ** -0.5
        k = rule.l2_normalise(k.reshape(b, t, cfg.ssm_k_heads, cfg.ssm_k_dim))
        v = v.float().reshape(b, t, cfg.ssm_v_heads, cfg.ssm_v_dim)
        delta = rule.recurrent if t <= rule.CHUNK else rule.chunked
        out, ssm[seqs] = delta(q, k, v, g, beta, ssm[seqs])
        return out, Fed(mixed[0], q[0], k[0], v[0], g[0], beta[0])
