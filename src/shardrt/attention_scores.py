"""How much a prompt's last queries attend to each of its tokens: the PFlash drafter's scores,
computed inside the drafter's daemon (op `score_prompt`) from its own KV cache.

The stage prefills the prompt in chunks, the last `window` tokens last of all, keeping the
hidden states that enter each scored layer for that window. For each scored layer the window's
queries are computed again from those states, as the layer computed them (its norm, the q rows of
its fused projection, qwen3's per-head norm, rope at the same positions), and set against the
layer's cached keys of the candidate tokens, positions [skip, n - window). Each (head, query) row
is a softmax over the candidates alone, so attention to the first tokens (the sinks) and to the
window itself (the neighbours) does not crowd them out; a token's score is the sum over layers,
heads and queries of its probability squared, so that a head that looks at a few tokens counts
for more than one spread thinly over all. docs/PFLASH.md says why these choices.
"""

from __future__ import annotations

import torch

from . import kernels
from .errors import ConfigError
from .kernels.norm import rms_norm_reference


@torch.inference_mode()
def score_prompt(stage, ids: torch.Tensor, *, window: int, skip: int, chunk: int, layers: list[int]) -> torch.Tensor:
    """Prefill token ids [n] into sequence 0 of `stage` (one holding the embedding and every
    scored layer), `chunk` tokens at a time, through the highest scored layer only (an early exit:
    the layers above it do not run), and score each token: float32 [n] on the CPU, zero outside the
    candidates [skip, n - window). The stage's cache is left holding the prompt's keys and values
    in those layers, its length unset (as after any early exit)."""
    n, cfg, span = ids.shape[0], stage.cfg, stage.span
    if cfg.hybrid:  # its gated queries and linear layers are not what the scores below recompute
        raise ConfigError(f"score_prompt: a {cfg.arch} model cannot be the PFlash drafter; give one of the "
                          "attention-only families")
    if not span.embed:
        raise ConfigError(f"score_prompt: stage {span} does not hold the embedding")
    if not (window >= 1 and skip >= 0 and skip + window < n):
        raise ConfigError(f"score_prompt: a window of {window} and {skip} skipped tokens leave no candidates "
                          f"in {n} tokens")
    if n > stage.max_ctx:
        raise ConfigError(f"score_prompt: {n} tokens do not fit the drafter's max_ctx {stage.max_ctx}")
    if not layers:
        raise ConfigError("score_prompt.layers: no layer to score with")
    for layer in layers:
        if not span.start <= layer < span.stop:
            raise ConfigError(f"score_prompt.layers: layer {layer} is outside this stage's layers {span}")
        if cfg.local(layer):
            raise ConfigError(f"score_prompt.layers: layer {layer} attends through a sliding window; it cannot see "
                              "the whole prompt")
    stage.reset(0)
    split, top = n - window, max(layers)
    for start in range(0, split, chunk):
        stage.run(ids[start : min(start + chunk, split)], start, stop_after=top)
    before = sorted({layer - 1 for layer in layers if layer > span.start})  # the hidden states entering them
    _, captured = stage.run(ids[split:], split, capture=tuple(before), stop_after=top)
    entering = {c.layer + 1: c.data for c in captured}
    if span.start in layers:
        entering[span.start] = stage._embed(ids[split:])  # the stage's own embedding (Gemma scales it)
    positions = torch.arange(split, n, device=stage.device)
    scores = torch.zeros(n, dtype=torch.float32, device=stage.device)
    for layer in layers:
        block = stage.blocks[layer - span.start]
        q = _queries(block, entering[layer], stage.ropes[block.local], positions)  # [window, heads, head_dim]
        keys = stage.k_cache[layer - span.start, 0, :, skip:split].float()  # [kv_heads, candidates, head_dim]
        group = cfg.n_heads // cfg.n_kv_heads
        q = q.float().transpose(0, 1).unflatten(0, (cfg.n_kv_heads, group))  # [kv_heads, group, window, head_dim]
        logits = torch.einsum("kgwd,kcd->kgwc", q, keys) * block.scale
        scores[skip:split] += logits.softmax(-1).square().sum((0, 1, 2))
    return scores.cpu()


def _queries(block, x: torch.Tensor, rope: tuple, positions: torch.Tensor) -> torch.Tensor:
    """The layer's rotated queries [n, heads, head_dim] for its input x [n, dim], as Block
    computes them before rope_kv_write writes k and v (which are cached already)."""
    cfg, n = block.cfg, x.shape[0]
    qkv = kernels.linear(kernels.rms_norm(x, block.attn_norm, cfg.norm_eps), block.attn_qkv, block.attn_qkv_bias)
    q = qkv[:, : cfg.n_heads * cfg.head_dim].reshape(n, cfg.n_heads, cfg.head_dim)
    if block.q_norm is not None:
        q = rms_norm_reference(q, block.q_norm, cfg.norm_eps)
    cos, sin = rope
    return kernels.apply_rope(q, cos[positions], sin[positions], cfg.rope_style)
