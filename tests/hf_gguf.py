"""Tiny random transformers models (from_config, seeded) written to GGUF as llama.cpp's converter
writes them (its tensor names and metadata keys), so shardrt and transformers run the very same
weights: the independent implementation the families are checked against. Float32 tensors; the
minimal byte-level tokenizer of tests/synthetic.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter

from .synthetic import add_tokenizer, tokenizer_vocab

VOCAB = len(tokenizer_vocab()[0])
PROMPT = torch.tensor([72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32, 84, 104, 101])
TOKENS = 32  # greedy tokens each family is checked over (with the prompt, 49 positions)
# the Qwen chat template's shape, in the byte-level vocabulary (no special tokens)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def written(model, write, path: Path) -> tuple[Path, object, torch.Tensor, list[int]]:
    """(the GGUF `write` made of `model` at `path`, the model, transformers' logits of PROMPT,
    its TOKENS greedy tokens after it): what a family's tests compare shardrt with."""
    write(model, path)
    with torch.no_grad():
        ref = model(PROMPT[None]).logits[0]
        greedy = model.generate(PROMPT[None], max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False,
                                pad_token_id=0)[0, len(PROMPT):].tolist()
    return path, model, ref, greedy


def greedy_of(pipeline) -> list[int]:
    """TOKENS greedy tokens after PROMPT, one token a step (the cached-attention path)."""
    pipeline.reset()
    tokens = [pipeline.greedy(PROMPT, 0)]
    while len(tokens) < TOKENS:
        tokens.append(pipeline.greedy(torch.tensor(tokens[-1:]), len(PROMPT) + len(tokens) - 1))
    return tokens


def rewrite(path, out, arch: str, drop_tensors=(), extra_keys=None, edit=None):
    """A copy of the GGUF at `path` with some tensors left out, some keys changed, some tensors
    edited (name -> a function of the array)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    writer = GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = (extra_keys or {}).get(key, field.contents())
        writer.add_key_value(key, value, field.types[0], field.types[1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        if tensor.name not in drop_tensors:
            array = tensor.data.reshape(tuple(reversed(tensor.shape.tolist())))
            writer.add_tensor(tensor.name, (edit or {}).get(tensor.name, lambda a: a)(array))
    return finish_gguf(writer, out)


def start_gguf(model, path: Path, arch: str) -> GGUFWriter:
    """A writer for `arch` with the keys every family's file has, from the model's config."""
    cfg = model.config
    w = GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    if getattr(cfg, "intermediate_size", None):  # (a mixture of experts may have no dense feed-forward)
        w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    return w


def finish_gguf(w: GGUFWriter, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_qwen3_moe(seed: int = 0, layers: int = 3):
    """Qwen3-30B-A3B's design at toy size: 8 experts, top 2 renormalized, q/k norms."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
                         rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2,
                         decoder_sparse_step=1, mlp_only_layers=[])
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg).eval()


def rope_theta(cfg) -> float:
    """transformers 5 keeps it in rope_parameters; earlier versions as an attribute."""
    parameters = getattr(cfg, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def write_qwen3_moe(model, path: Path) -> Path:
    cfg = model.config
    w = start_gguf(model, path, "qwen3moe")
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_vocab_size(add_tokenizer(w))
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    ff = cfg.moe_intermediate_size

    def add(name: str, array: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    add("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        add(blk + "attn_norm.weight", state[hf + "input_layernorm.weight"])
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj"),
                             ("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")):
            add(f"{blk}{ours}.weight", state[f"{hf}self_attn.{theirs}.weight"])
        add(blk + "ffn_norm.weight", state[hf + "post_attention_layernorm.weight"])
        add(blk + "ffn_gate_inp.weight", state[hf + "mlp.gate.weight"])
        gate_up = state[hf + "mlp.experts.gate_up_proj"]  # [E, 2 ff, dim]: gate rows first
        add(blk + "ffn_gate_exps.weight", gate_up[:, :ff])
        add(blk + "ffn_up_exps.weight", gate_up[:, ff:])
        add(blk + "ffn_down_exps.weight", state[hf + "mlp.experts.down_proj"])
    add("output_norm.weight", state["model.norm.weight"])
    add("output.weight", state["lm_head.weight"])
    return finish_gguf(w, path)


def tiny_gemma3(seed: int = 0, layers: int = 7, window: int = 8):
    """Gemma 3's design at toy size: five local layers (a window of `window`, rope base 10000) to
    one global (base 1e6), GeGLU, the extra norms, tied and scaled embeddings."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=window, max_position_embeddings=512, rms_norm_eps=1e-6,
                           tie_word_embeddings=True, initializer_range=0.2, pad_token_id=0, bos_token_id=VOCAB - 1,
                           eos_token_id=VOCAB - 1, rope_parameters={
                               "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    # re-drawn so that greedy text varies: the tied head reads the embedding that the input row
    # carries 8x scaled, so large embeddings make the model repeat its input; norms initialize to
    # zero (Gemma applies 1 + w), which would leave them nothing to do
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name:
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)
    return model


def write_gemma3(model, path: Path) -> Path:
    cfg = model.config
    w = start_gguf(model, path, "gemma3")
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(cfg.sliding_window)
    w.add_vocab_size(add_tokenizer(w))
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def add(name: str, array: np.ndarray, norm: bool = False) -> None:
        # llama.cpp's converter stores Gemma's norm weights as 1 + w, the factor they apply
        w.add_tensor(name, np.ascontiguousarray(array + 1 if norm else array, dtype=np.float32))

    add("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            add(f"{blk}{ours}.weight", state[f"{hf}self_attn.{theirs}.weight"])
        add(blk + "attn_q_norm.weight", state[hf + "self_attn.q_norm.weight"], norm=True)
        add(blk + "attn_k_norm.weight", state[hf + "self_attn.k_norm.weight"], norm=True)
        for ours, theirs in (("attn_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                             ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm")):
            add(f"{blk}{ours}.weight", state[f"{hf}{theirs}.weight"], norm=True)
        for ours, theirs in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
            add(f"{blk}{ours}.weight", state[f"{hf}mlp.{theirs}.weight"])
    add("output_norm.weight", state["model.norm.weight"], norm=True)
    return finish_gguf(w, path)


def tiny_gpt_oss(seed: int = 0, layers: int = 4, window: int = 8):
    """gpt-oss's design at toy size: 8 experts, top 2 (softmax over the chosen logits), every other
    layer a sliding window of `window`, sinks, biases everywhere, YaRN rope over a short original
    context (so the blend of interpolated and extrapolated frequencies matters), the clamped SwiGLU."""
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                       num_experts_per_tok=2, sliding_window=window, max_position_embeddings=512, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, initializer_range=0.2, attention_bias=True, pad_token_id=0,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0,
                                        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})
    cfg._attn_implementation = "eager"  # the one that applies the sinks
    torch.manual_seed(seed)
    model = GptOssForCausalLM(cfg).eval()
    # biases start at zero and norms at one: drawn at random, so that each is exercised; the
    # expert matrices large enough that the SwiGLU's clamp at 7 bites
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif "sinks" in name:
                p.normal_(0.0, 1.0)
            elif "bias" in name:
                p.normal_(0.0, 0.5)
            elif "experts" in name:
                p.normal_(0.0, 6.0 / p.shape[-2] ** 0.5)
            else:
                p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)
    return model


def write_gpt_oss(model, path: Path) -> Path:
    from gguf import RopeScalingType

    cfg = model.config
    rope = cfg.rope_parameters
    w = start_gguf(model, path, "gpt-oss")
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_sliding_window(cfg.sliding_window)
    w.add_vocab_size(add_tokenizer(w))
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def add(name: str, array: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    add("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        add(blk + "attn_norm.weight", state[hf + "input_layernorm.weight"])
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            add(f"{blk}{ours}.weight", state[f"{hf}self_attn.{theirs}.weight"])
            add(f"{blk}{ours}.bias", state[f"{hf}self_attn.{theirs}.bias"])
        add(blk + "attn_sinks.weight", state[hf + "self_attn.sinks"])
        add(blk + "post_attention_norm.weight", state[hf + "post_attention_layernorm.weight"])
        add(blk + "ffn_gate_inp.weight", state[hf + "mlp.router.weight"])
        add(blk + "ffn_gate_inp.bias", state[hf + "mlp.router.bias"])
        gate_up = state[hf + "mlp.experts.gate_up_proj"]  # [E, dim, 2 ff], gate and up interleaved
        gate_up_bias = state[hf + "mlp.experts.gate_up_proj_bias"]  # [E, 2 ff]
        add(blk + "ffn_gate_exps.weight", gate_up[:, :, ::2].transpose(0, 2, 1))
        add(blk + "ffn_up_exps.weight", gate_up[:, :, 1::2].transpose(0, 2, 1))
        add(blk + "ffn_gate_exps.bias", gate_up_bias[:, ::2])
        add(blk + "ffn_up_exps.bias", gate_up_bias[:, 1::2])
        add(blk + "ffn_down_exps.weight", state[hf + "mlp.experts.down_proj"].transpose(0, 2, 1))  # [E, ff, dim]
        add(blk + "ffn_down_exps.bias", state[hf + "mlp.experts.down_proj_bias"])
    add("output_norm.weight", state["model.norm.weight"])
    add("output.weight", state["lm_head.weight"])
    return finish_gguf(w, path)


def tiny_qwen35(seed: int = 0, layers: int = 6, every: int = 3, moe: bool = False):
    """Qwen3.5's design at toy size: gated DeltaNet layers with every `every`-th layer full
    attention (output gate, q/k norms, rope over a quarter of each head), 2 key heads shared by 4
    value heads in the linear layers (so their order matters), a width-4 convolution. With `moe`,
    Qwen3.5-MoE's: 8 experts, top 2 renormalized, and a shared expert behind a sigmoid gate."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    shape = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                 linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=512,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0,
                 layer_types=["linear_attention" if (i + 1) % every else "full_attention" for i in range(layers)],
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    if moe:
        cfg = Qwen3_5MoeTextConfig(**shape, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                                   num_experts_per_tok=2)
    else:
        cfg = Qwen3_5TextConfig(**shape, intermediate_size=128)
    torch.manual_seed(seed)
    model = (Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM)(cfg).eval()
    # norms start at their identity (Qwen3.5 applies 1 + w, its gated norm w): drawn at random so
    # that each is exercised; A_log and dt_bias keep their initialisation (decays of every speed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                p.normal_(1.0, 0.2)
            elif "norm" in name:
                p.normal_(0.0, 0.3)
            elif not name.endswith(("A_log", "dt_bias")):
                p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)
    return model


def write_qwen35(model, path: Path) -> Path:
    """As llama.cpp's converter writes Qwen3.5: norm weights as 1 + w (not the gated norm's),
    A_log as -exp(A_log), the convolution squeezed, and the linear layers' value heads from
    grouped-by-key-head order into tiled order (value head j then reads key head j % key_heads);
    qwen35moe's experts' gate and up apart, as for qwen3moe."""
    cfg = model.config
    moe = hasattr(cfg, "num_experts")
    w = start_gguf(model, path, "qwen35moe" if moe else "qwen35")
    if moe:
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_rope_dimension_count(int(cfg.head_dim * cfg.rope_parameters["partial_rotary_factor"]))
    w.add_rope_dimension_sections([11, 11, 10, 0])
    w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
    w.add_ssm_state_size(cfg.linear_key_head_dim)
    w.add_ssm_group_count(cfg.linear_num_key_heads)
    w.add_ssm_time_step_rank(cfg.linear_num_value_heads)
    w.add_ssm_inner_size(cfg.linear_value_head_dim * cfg.linear_num_value_heads)
    every = cfg.layer_types.index("full_attention") + 1
    assert cfg.layer_types == ["linear_attention" if (i + 1) % every else "full_attention"
                               for i in range(cfg.num_hidden_layers)]
    w.add_full_attention_interval(every)
    w.add_vocab_size(add_tokenizer(w))
    w.add_chat_template(CHATML)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    key_heads, per_key = cfg.linear_num_key_heads, cfg.linear_num_value_heads // cfg.linear_num_key_heads
    key_dim = cfg.linear_key_head_dim * key_heads

    def tiled(a: np.ndarray, axis: int, head_dim: int) -> np.ndarray:
        """Value heads along `axis` (each head_dim wide) from grouped to tiled order."""
        shape = a.shape
        grouped = a.reshape(*shape[:axis], key_heads, per_key, head_dim, *shape[axis + 1:])
        return np.swapaxes(grouped, axis, axis + 1).reshape(shape)

    def add(name: str, array: np.ndarray, norm: bool = False) -> None:
        w.add_tensor(name, np.ascontiguousarray(array + 1 if norm else array, dtype=np.float32))

    add("token_embd.weight", state["model.embed_tokens.weight"])
    for i, kind in enumerate(cfg.layer_types):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        add(blk + "attn_norm.weight", state[hf + "input_layernorm.weight"], norm=True)
        add(blk + "post_attention_norm.weight", state[hf + "post_attention_layernorm.weight"], norm=True)
        mlp, shexp = (hf + "mlp.shared_expert.", "_shexp") if moe else (hf + "mlp.", "")
        for ours, theirs in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
            add(f"{blk}{ours}{shexp}.weight", state[f"{mlp}{theirs}.weight"])
        if moe:
            add(blk + "ffn_gate_inp_shexp.weight", state[hf + "mlp.shared_expert_gate.weight"])  # [1, dim]
            add(blk + "ffn_gate_inp.weight", state[hf + "mlp.gate.weight"])
            gate_up, ff = state[hf + "mlp.experts.gate_up_proj"], cfg.moe_intermediate_size  # [E, 2 ff, dim]
            add(blk + "ffn_gate_exps.weight", gate_up[:, :ff])
            add(blk + "ffn_up_exps.weight", gate_up[:, ff:])
            add(blk + "ffn_down_exps.weight", state[hf + "mlp.experts.down_proj"])
        if kind == "full_attention":
            for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"),
                                 ("attn_output", "o_proj")):
                add(f"{blk}{ours}.weight", state[f"{hf}self_attn.{theirs}.weight"])
            add(blk + "attn_q_norm.weight", state[hf + "self_attn.q_norm.weight"], norm=True)
            add(blk + "attn_k_norm.weight", state[hf + "self_attn.k_norm.weight"], norm=True)
            continue
        la, v_dim = hf + "linear_attn.", cfg.linear_value_head_dim
        qkv = state[la + "in_proj_qkv.weight"]
        add(blk + "attn_qkv.weight", np.concatenate([qkv[: 2 * key_dim], tiled(qkv[2 * key_dim:], 0, v_dim)]))
        add(blk + "attn_gate.weight", tiled(state[la + "in_proj_z.weight"], 0, v_dim))
        add(blk + "ssm_beta.weight", tiled(state[la + "in_proj_b.weight"], 0, 1))
        add(blk + "ssm_alpha.weight", tiled(state[la + "in_proj_a.weight"], 0, 1))
        add(blk + "ssm_a", tiled(-np.exp(state[la + "A_log"]), 0, 1))
        add(blk + "ssm_dt.bias", tiled(state[la + "dt_bias"], 0, 1))
        conv = state[la + "conv1d.weight"][:, 0]  # [channels, kernel]
        add(blk + "ssm_conv1d.weight", np.concatenate([conv[: 2 * key_dim], tiled(conv[2 * key_dim:], 0, v_dim)]))
        add(blk + "ssm_norm.weight", state[la + "norm.weight"])
        add(blk + "ssm_out.weight", tiled(state[la + "out_proj.weight"], 1, v_dim))
    add("output_norm.weight", state["model.norm.weight"], norm=True)
    add("output.weight", state["lm_head.weight"])
    return finish_gguf(w, path)
