"""Logit parity between shardrt's `Stage` and transformers on tiny synthetic GGUF models.

Both sides read the same file: transformers dequantizes it (and, for llama, un-permutes q/k and
uses half-split rope), shardrt keeps the file's layout and applies the rope it was written for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from shardrt.stage import Stage

from .synthetic import ARCHS, VOCAB_SIZE, rope_freqs_llama3, write_model

ATOL = 1e-3
QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def shape_for(qtype: str) -> dict:
    # K-quant rows hold 256-element super-blocks
    return dict(dim=256, ffn_dim=512) if qtype.endswith("_K") else dict(dim=64, ffn_dim=128)


def token_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (n,), generator=torch.Generator().manual_seed(seed))


def hf_model(path, config=None):
    kwargs = {} if config is None else {"config": config}
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs)
    return model.eval()


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids[None]).logits[0].float()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff < ATOL, f"max |logit diff| {diff:.3g} (logits up to {ref.abs().max().item():.3g})"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_match_transformers(tmp_path, arch, qtype, tied):
    path = write_model(tmp_path / f"{arch}-{qtype}.gguf", arch, qtype=qtype, tied=tied, **shape_for(qtype))
    stage = Stage(path, 0, 2, max_ctx=32)
    assert stage.cfg.tied_embeddings is tied
    assert stage.cfg.qkv_bias is (arch == "qwen2") and stage.cfg.qk_norm is (arch == "qwen3")
    ids = token_ids(7)
    ref = hf_logits(hf_model(path), ids)
    assert ref.shape == (7, VOCAB_SIZE)
    assert ref.abs().max() > 0.5  # not a degenerate all-but-zero model

    # prefill, every position
    assert_close(stage.forward(ids, 0, all_logits=True), ref)
    # prefill of all but the last 3, then one token at a time against the full-sequence logits
    stage.reset()
    assert_close(stage.forward(ids[:4], 0), ref[3:4])
    for pos in range(4, 7):
        assert_close(stage.forward(ids[pos : pos + 1], pos), ref[pos : pos + 1])
    assert stage.length == 7
    # rewinding the cache and decoding again gives the same logits
    stage.truncate(5)
    assert_close(stage.forward(ids[5:6], 5), ref[5:6])


@pytest.mark.parametrize("qtype", ["F32", "Q4_K"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", ARCHS)
def test_chained_stages_match_one_stage(tmp_path, arch, tied, qtype):
    n_layers = 3
    path = write_model(tmp_path / "m.gguf", arch, n_layers=n_layers, qtype=qtype, tied=tied, **shape_for(qtype))
    ids = token_ids(7, seed=1)
    whole = Stage(path, 0, n_layers, max_ctx=16)
    expected = whole.forward(ids, 0, all_logits=True)
    assert_close(expected, hf_logits(hf_model(path), ids))
    for k in range(1, n_layers):
        first, second = Stage(path, 0, k, max_ctx=16), Stage(path, k, n_layers, max_ctx=16)
        assert first.span.embed and not first.has_head and second.has_head and not second.span.embed
        hidden = first.forward(ids[:5], 0)
        assert hidden.shape == (5, whole.cfg.dim)
        assert_close(second.forward(hidden, 0, all_logits=True), expected[:5])
        for pos in (5, 6):  # decode through both stages' caches
            assert_close(second.forward(first.forward(ids[pos : pos + 1], pos), pos), expected[pos : pos + 1])


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    dim, n_heads, base = 64, 4, 10000.0
    head_dim = dim // n_heads
    rope = dict(LLAMA3_SCALING, rope_theta=base)
    config = LlamaConfig(hidden_size=dim, num_attention_heads=n_heads, num_key_value_heads=2,
                         max_position_embeddings=256, rope_parameters=rope)
    scaled, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config)
    default, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    assert attention_factor == 1.0
    # llama.cpp stores the per-frequency divisor: default inv_freq / llama3 inv_freq
    rope_freqs = (default.double() / scaled.double()).numpy().astype(np.float32)
    np.testing.assert_allclose(rope_freqs, rope_freqs_llama3(head_dim, base, 8.0, 1.0, 4.0, 64), rtol=1e-5)
    # unscaled, smoothed and fully scaled frequencies all occur
    assert rope_freqs.min() == 1.0 and rope_freqs.max() == 8.0 and ((rope_freqs > 1) & (rope_freqs < 8)).any()

    path = write_model(tmp_path / "llama3.gguf", "llama", dim=dim, n_heads=n_heads, rope_base=base,
                       context_length=256, rope_freqs=rope_freqs)
    hf_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    hf_config.rope_parameters = rope
    reference = hf_model(path, hf_config)
    assert reference.model.rotary_emb.rope_type == "llama3"
    torch.testing.assert_close(reference.model.rotary_emb.inv_freq, scaled)

    ids = token_ids(104, seed=2)
    ref = hf_logits(reference, ids)
    stage = Stage(path, 0, 2, max_ctx=256)
    assert stage.cfg.has_rope_freqs
    assert_close(stage.forward(ids[:100], 0, all_logits=True), ref[:100])
    for pos in range(100, 104):
        assert_close(stage.forward(ids[pos : pos + 1], pos), ref[pos : pos + 1])

    # the scaling matters here: transformers' unscaled rope gives other logits
    unscaled = hf_logits(hf_model(path), ids)
    assert (unscaled[64:] - ref[64:]).abs().max() > 0.05
