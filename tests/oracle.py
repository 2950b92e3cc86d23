"""The independent implementation every correctness test compares against: transformers
loading the same GGUF file in float32."""

from __future__ import annotations

from pathlib import Path

import torch


def load_hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].float()


@torch.inference_mode()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens with transformers' own KV cache, ignoring EOS (so lengths match)."""
    out = model(torch.tensor([ids]), use_cache=True)
    past, tokens = out.past_key_values, []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokens
