"""Broken GGUF files: each is refused with a `ModelFormatError` that names what is wrong,
and the CLI turns that into one `shardrt: error:` line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from shardrt.errors import ModelFormatError
from shardrt.gguf_file import GGUFFile
from shardrt.model import ModelConfig
from shardrt.stage import Stage

from .synthetic import tensor_info_offset, write_model

N_LAYERS = 2


def _good(dir: Path) -> Path:
    return write_model(dir / "good.gguf", "llama", n_layers=N_LAYERS)


def _patched(dir: Path, name: str, edit) -> Path:
    raw = _good(dir).read_bytes()
    path = dir / name
    path.write_bytes(edit(raw))
    return path


def random_bytes(dir):
    path = dir / "random.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path, ["random.gguf", "not a GGUF file"]


def too_small(dir):
    path = dir / "tiny.gguf"
    path.write_bytes(b"GGUF\x03\x00")
    return path, ["tiny.gguf", "6 bytes"]


def wrong_magic(dir):
    return _patched(dir, "magic.gguf", lambda raw: b"GGML" + raw[4:]), ["magic.gguf", "not a GGUF file", "GGML"]


def unsupported_version(dir):
    return _patched(dir, "v4.gguf", lambda raw: raw[:4] + (4).to_bytes(4, "little") + raw[8:]), ["v4.gguf", "version 4"]


def gguf_v1(dir):
    return _patched(dir, "v1.gguf", lambda raw: raw[:4] + (1).to_bytes(4, "little") + raw[8:]), ["v1.gguf", "version 1"]


def truncated_in_tensor_data(dir):
    good = _good(dir)
    with GGUFFile(good) as gguf:
        last = max(gguf.tensors.values(), key=lambda t: t.offset)
    cut = last.offset + last.n_bytes // 2
    return _patched(dir, "cut_data.gguf", lambda raw: raw[:cut]), ["cut_data.gguf", "truncated", repr(last.name)]


def truncated_in_metadata(dir):
    field = GGUFReader(_good(dir)).fields["tokenizer.ggml.tokens"]
    cut = field.offset + sum(part.nbytes for part in field.parts) // 2
    return _patched(dir, "cut_meta.gguf", lambda raw: raw[:cut]), ["cut_meta.gguf", "truncated", "'tokenizer.ggml.tokens'"]


def truncated_in_tensor_directory(dir):
    cut = tensor_info_offset(_good(dir), "output.weight") - 4  # inside output.weight's dimensions
    return _patched(dir, "cut_dir.gguf", lambda raw: raw[:cut]), ["cut_dir.gguf", "truncated", "'output.weight'"]


def truncated_header_counts(dir):
    # so little is left that the tensor and key counts cannot fit
    return _patched(dir, "cut_head.gguf", lambda raw: raw[:100]), ["cut_head.gguf", "corrupt header"]


def arch_mamba(dir):
    return write_model(dir / "mamba.gguf", "mamba"), ["'mamba'", "general.architecture", "llama"]


def arch_gpt2(dir):
    return write_model(dir / "gpt2.gguf", "gpt2"), ["'gpt2'", "general.architecture"]


def missing_tensor(dir):
    return write_model(dir / "no_up.gguf", "llama", drop_tensors=["blk.1.ffn_up.weight"]), ["no_up.gguf", "'blk.1.ffn_up.weight'"]


def missing_embedding(dir):
    return write_model(dir / "no_embd.gguf", "llama", drop_tensors=["token_embd.weight"]), ["'token_embd.weight'"]


def missing_bias(dir):
    return write_model(dir / "no_bias.gguf", "qwen2", drop_tensors=["blk.0.attn_v.bias"]), ["'blk.0.attn_v.bias'"]


def unsupported_tensor_type(dir):
    path = write_model(dir / "q8_1.gguf", "llama", tensor_types={"blk.1.attn_q.weight": 9})  # Q8_1: llama.cpp's own scratch type
    return path, ["'blk.1.attn_q.weight'", "Q8_1", "Q4_K"]


def unsupported_nvfp4_type(dir):
    path = write_model(dir / "nvfp4.gguf", "qwen3", dim=256, ffn_dim=512, tensor_types={"blk.0.ffn_down.weight": 40})
    return path, ["'blk.0.ffn_down.weight'", "NVFP4"]


def unknown_tensor_type_id(dir):
    path = write_model(dir / "type99.gguf", "llama", tensor_types={"blk.0.attn_k.weight": 99})
    return path, ["'blk.0.attn_k.weight'", "type id 99"]


def missing_block_count(dir):
    path = write_model(dir / "no_layers.gguf", "llama", drop_keys=["llama.block_count"])
    return path, ["no_layers.gguf", "'llama.block_count'"]


def missing_norm_eps(dir):
    path = write_model(dir / "no_eps.gguf", "qwen3", drop_keys=["qwen3.attention.layer_norm_rms_epsilon"])
    return path, ["'qwen3.attention.layer_norm_rms_epsilon'"]


def missing_architecture(dir):
    path = write_model(dir / "no_arch.gguf", "llama", drop_keys=["general.architecture"])
    return path, ["no_arch.gguf", "'general.architecture'"]


def unsupported_rope_scaling(dir):
    path = write_model(dir / "longrope.gguf", "llama", extra_keys={"llama.rope.scaling.type": "longrope"})
    return path, ["llama.rope.scaling.type", "'longrope'", "supported: none, linear, yarn"]


def yarn_without_its_factor(dir):
    path = write_model(dir / "yarn.gguf", "llama", extra_keys={"llama.rope.scaling.type": "yarn"})
    return path, ["yarn.gguf", "'llama.rope.scaling.factor'"]


def heads_not_multiple(dir):
    path = write_model(dir / "heads.gguf", "llama", extra_keys={"llama.attention.head_count_kv": 3})
    return path, ["head_count 4", "head_count_kv 3"]


def tensor_shape_disagrees_with_metadata(dir):
    path = write_model(dir / "ffn.gguf", "llama", extra_keys={"llama.feed_forward_length": 96})
    return path, ["ffn.gguf", "'blk.0.ffn_gate.weight'", "[128, 64]", "[96, 64]"]


def layer_count_beyond_tensors(dir):
    path = write_model(dir / "layers.gguf", "llama", extra_keys={"llama.block_count": 3})
    return path, ["'blk.2.attn_norm.weight'"]


def bad_alignment(dir):
    path = write_model(dir / "align.gguf", "llama", extra_keys={"general.alignment": 48})
    return path, ["general.alignment", "48"]


CASES = [
    random_bytes, too_small, wrong_magic, unsupported_version, gguf_v1, truncated_in_tensor_data,
    truncated_in_metadata, truncated_in_tensor_directory, truncated_header_counts, arch_mamba, arch_gpt2,
    missing_tensor, missing_embedding, missing_bias, unsupported_tensor_type, unsupported_nvfp4_type,
    unknown_tensor_type_id, missing_block_count, missing_norm_eps, missing_architecture, unsupported_rope_scaling,
    yarn_without_its_factor, heads_not_multiple, tensor_shape_disagrees_with_metadata, layer_count_beyond_tensors,
    bad_alignment,
]


def open_stage(path: Path) -> Stage:
    """What the CLI does: read the layer count, then load every layer."""
    with GGUFFile(path) as gguf:
        n_layers = ModelConfig.from_gguf(gguf).n_layers
    return Stage(path, 0, n_layers, max_ctx=16)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_file_is_refused_by_name(tmp_path, case):
    path, needles = case(tmp_path)
    with pytest.raises(ModelFormatError) as info:
        open_stage(path)
    message = str(info.value)
    assert message.startswith("model: ") and "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_the_good_file_loads(tmp_path):
    # the unbroken base of the table above does load, so every failure there is the damage's
    stage = open_stage(_good(tmp_path))
    assert stage.cfg.n_layers == N_LAYERS and stage.has_head


def test_missing_file(tmp_path):
    with pytest.raises(ModelFormatError, match="cannot open .*nothing.gguf"):
        GGUFFile(tmp_path / "nothing.gguf")


def test_damage_outside_a_stage_does_not_stop_it(tmp_path):
    # a stage reads only its own tensors: a bad type in layer 1 fails [1, 2) but not [0, 1)
    path = write_model(tmp_path / "m.gguf", "llama", tensor_types={"blk.1.attn_q.weight": 9})
    assert not Stage(path, 0, 1, max_ctx=16).has_head
    with pytest.raises(ModelFormatError, match="'blk.1.attn_q.weight' has type Q8_1"):
        Stage(path, 1, 2, max_ctx=16)


CLI_CASES = [wrong_magic, truncated_in_tensor_data, arch_mamba, missing_tensor, unsupported_tensor_type,
             tensor_shape_disagrees_with_metadata]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.__name__)
def test_cli_reports_bad_file_in_one_line(tmp_path, case):
    path, needles = case(tmp_path)
    env = dict(os.environ, SHARDRT_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "shardrt.cli", "launch", "--model", str(path), "--target-gpus", "cpu:0", "-p", "hi", "-n", "2"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardrt: error: model: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]
    assert proc.stdout == ""
