"""Loading one stage's weights from a GGUF file: which tensors, which bytes, dequantized how.

A stage names a layer range and whether it holds the embedding and/or the head; the loader
touches only those tensors' bytes in the memory map (the *span cover*) and dequantizes them
with the `gguf` package's quant support (F32/F16/BF16 are read as they are) into the compute
dtype on the target device, stacking q/k/v and gate/up into one matrix each. Where a GPU keeps
quantized weights, matrices (and stacks of expert matrices) of a type the kernels read keep their
GGUF blocks instead (kernels.quant, kernels.experts).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from .errors import ModelFormatError
from .gguf_file import GGUFFile, TensorInfo
from .kernels import quant
from .kernels.experts import QuantizedExperts
from .model import MOE_WEIGHTS, ModelConfig, block_tensor_names, block_weights

log = logging.getLogger(__name__)

MIB = 1 << 20
# Types the gguf package can dequantize and shardrt has checked; anything else is refused by name.
# The ternary TQ1_0/TQ2_0 have no kernel: they load dequantized, on GPUs too.
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                 "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "MXFP4",
                 "TQ1_0", "TQ2_0")
)


@dataclass(frozen=True)
class LayerSpan:
    """Layers [start, stop) of a model, plus the embedding if `embed` and norm + head if `head`."""

    start: int
    stop: int
    embed: bool
    head: bool

    @classmethod
    def of(cls, start: int, stop: int, n_layers: int) -> "LayerSpan":
        if not 0 <= start < stop <= n_layers:
            raise ModelFormatError(f"layers: [{start}, {stop}) is not a non-empty range inside [0, {n_layers})")
        return cls(start, stop, embed=start == 0, head=stop == n_layers)

    def __str__(self) -> str:
        extras = "+".join(x for x, on in (("embed", self.embed), ("head", self.head)) if on)
        return f"[{self.start},{self.stop})" + (f"+{extras}" if extras else "")


@dataclass(frozen=True)
class SpanCover:
    """How much of the file a stage maps: bytes of its tensors in contiguous runs `spans`."""

    covered_bytes: int
    file_bytes: int
    spans: tuple[tuple[int, int], ...]  # [start, end) byte offsets

    @property
    def n_spans(self) -> int:
        return len(self.spans)

    def __str__(self) -> str:
        return f"span cover {self.covered_bytes / MIB:.1f} MiB of {self.file_bytes / MIB:.1f} MiB ({self.n_spans} spans)"


def stage_tensor_names(cfg: ModelConfig, span: LayerSpan) -> list[str]:
    names = [f"blk.{i}.{t}" for i in range(span.start, span.stop) for t in block_tensor_names(cfg, i)]
    if cfg.has_rope_freqs:
        names.append("rope_freqs.weight")
    if span.embed:
        names.append("token_embd.weight")
    if span.head:
        names.append("output_norm.weight")
        names.append("token_embd.weight" if cfg.tied_embeddings else "output.weight")
    return list(dict.fromkeys(names))


def span_cover(gguf: GGUFFile, names: list[str]) -> SpanCover:
    infos = sorted((require_tensor(gguf, n) for n in names), key=lambda t: t.offset)
    spans: list[list[int]] = []
    for info in infos:
        if spans and info.offset <= spans[-1][1] + gguf.alignment:  # adjacent but for padding
            spans[-1][1] = max(spans[-1][1], info.offset + info.n_bytes)
        else:
            spans.append([info.offset, info.offset + info.n_bytes])
    covered = sum(info.n_bytes for info in infos)
    return SpanCover(covered, gguf.file_size, tuple((a, b) for a, b in spans))


def require_tensor(gguf: GGUFFile, name: str) -> TensorInfo:
    info = gguf.tensors.get(name)
    if info is None:
        raise ModelFormatError(f"model: {gguf.path.name!r} lacks tensor {name!r}")
    return info


FLOAT32_WEIGHTS = ("ssm_a", "ssm_dt")  # a DeltaNet's decay: -exp(A_log) and its bias, exp'd over every token

# float types torch reads as they are stored, without a trip through numpy float32
PLAIN_TYPES = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
               GGMLQuantizationType.BF16: torch.bfloat16}


def dequantize_tensor(gguf: GGUFFile, info: TensorInfo) -> np.ndarray:
    """float32 array in torch order (GGUF shape reversed)."""
    check_type(info)
    block_elems, block_bytes = GGML_QUANT_SIZES[info.qtype]
    row_bytes = info.shape[0] // block_elems * block_bytes
    raw = np.frombuffer(gguf.tensor_bytes(info), dtype=np.uint8).reshape(-1, row_bytes)
    return dequantize(raw, info.qtype).reshape(tuple(reversed(info.shape)))


def check_type(info: TensorInfo) -> None:
    if info.qtype not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ModelFormatError(f"model: tensor {info.name!r} has type {info.qtype.name}; supported: {supported}")


def host_tensor(gguf: GGUFFile, info: TensorInfo) -> torch.Tensor:
    """The tensor on the CPU in torch order: a read-only view of the map for float types (copy
    it before writing), a dequantized float32 copy otherwise."""
    check_type(info)
    shape = tuple(reversed(info.shape))
    if info.qtype in PLAIN_TYPES:
        raw = np.frombuffer(gguf.tensor_bytes(info), dtype=np.uint8)
        with warnings.catch_warnings():  # read-only, and only ever copied from
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(raw).view(PLAIN_TYPES[info.qtype]).reshape(shape)
    return torch.from_numpy(dequantize_tensor(gguf, info))


def expected_shape(cfg: ModelConfig, name: str) -> tuple[int, ...] | None:
    """The torch-order shape the model computes with for tensor `name`, as llama.cpp checks it."""
    short = name.split(".", 2)[2] if name.startswith("blk.") else name
    dim, ffn, q, kv = cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    heads, inner = cfg.ssm_v_heads, cfg.ssm_inner  # a DeltaNet layer's (qwen35)
    return {
        "attn_norm.weight": (dim,), "ffn_norm.weight": (dim,), "output_norm.weight": (dim,),
        "attn_q.weight": (2 * q if cfg.attention_gate else q, dim), "attn_k.weight": (kv, dim), "attn_v.weight": (kv, dim),
        "attn_output.weight": (dim, q), "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
        "attn_q_norm.weight": (cfg.head_dim,), "attn_k_norm.weight": (cfg.head_dim,),
        "post_attention_norm.weight": (dim,), "post_ffw_norm.weight": (dim,),
        "ffn_gate.weight": (ffn, dim), "ffn_up.weight": (ffn, dim), "ffn_down.weight": (dim, ffn),
        "ffn_gate_inp.weight": (cfg.n_experts, dim), "ffn_gate_exps.weight": (cfg.n_experts, cfg.expert_ffn_dim, dim),
        "ffn_up_exps.weight": (cfg.n_experts, cfg.expert_ffn_dim, dim),
        "ffn_down_exps.weight": (cfg.n_experts, dim, cfg.expert_ffn_dim),
        "token_embd.weight": (cfg.vocab_size, dim), "output.weight": (cfg.vocab_size, dim),
        "rope_freqs.weight": (cfg.rope_dim // 2,),
        "attn_sinks.weight": (cfg.n_heads,), "attn_output.bias": (dim,), "ffn_gate_inp.bias": (cfg.n_experts,),
        "ffn_gate_exps.bias": (cfg.n_experts, cfg.expert_ffn_dim), "ffn_up_exps.bias": (cfg.n_experts, cfg.expert_ffn_dim),
        "ffn_down_exps.bias": (cfg.n_experts, dim),
        "ffn_gate_shexp.weight": (cfg.shared_expert_ffn_dim, dim), "ffn_up_shexp.weight": (cfg.shared_expert_ffn_dim, dim),
        "ffn_down_shexp.weight": (dim, cfg.shared_expert_ffn_dim), "ffn_gate_inp_shexp.weight": (dim,),
        "attn_qkv.weight": (cfg.conv_dim, dim), "attn_gate.weight": (inner, dim), "ssm_beta.weight": (heads, dim),
        "ssm_alpha.weight": (heads, dim), "ssm_a": (heads,), "ssm_dt.bias": (heads,),
        "ssm_conv1d.weight": (cfg.conv_dim, cfg.ssm_conv_kernel), "ssm_norm.weight": (inner // max(heads, 1),),
        "ssm_out.weight": (dim, inner),
    }.get(short)


def check_shape(gguf: GGUFFile, cfg: ModelConfig, name: str) -> None:
    """A tensor whose shape disagrees with the metadata fails here, not as a torch error mid-forward."""
    shape = tuple(reversed(require_tensor(gguf, name).shape))
    shape = shape[1:] if len(shape) == 2 and shape[0] == 1 else shape  # [1, n] is a vector too, as llama.cpp has it
    want = expected_shape(cfg, name)
    if want is not None and shape != want:
        raise ModelFormatError(
            f"model: {gguf.path.name!r} tensor {name!r} has shape {list(shape)}, but the {cfg.arch}.* metadata "
            f"implies {list(want)}"
        )


def device_weight_bytes(gguf: GGUFFile, cfg: ModelConfig, names: list[str], dtype_bytes: int, quantized: bool) -> int:
    """Bytes the tensors `names` take on a device: as stored for what stays in blocks (with
    `quantized`, `in_blocks`), else dequantized to a dtype of `dtype_bytes` per element."""
    total = 0
    for name in names:
        info = require_tensor(gguf, name)
        if quantized and in_blocks(gguf, cfg, info):
            total += quant.device_bytes(info.qtype, info.n_elements // info.shape[0], info.shape[0])
        else:
            total += info.n_elements * dtype_bytes
    return total


def in_blocks(gguf: GGUFFile, cfg: ModelConfig, info: TensorInfo) -> bool:
    """Whether a tensor keeps its GGUF blocks on a device that holds quantized weights: a matrix of
    a type the kernels read, or a stack of expert matrices that `experts_in_blocks` keeps."""
    if len(info.shape) == 2:
        return quant.has_kernel(info.qtype)
    loaded_with = expert_group(info.name)
    return loaded_with is not None and experts_in_blocks([require_tensor(gguf, n) for n in loaded_with])


def expert_group(name: str) -> tuple[str, ...] | None:
    """The stacked expert matrices loaded together with tensor `name` (gate with up, down alone),
    or None for a tensor that is none of them."""
    if not name.startswith("blk."):
        return None
    _, layer, short = name.split(".", 2)
    group = next((parts for key, parts in MOE_WEIGHTS.items() if key.endswith("_exps") and short in parts), None)
    return tuple(f"blk.{layer}.{part}" for part in group) if group else None


def experts_in_blocks(infos: list[TensorInfo]) -> bool:
    """Whether stacked expert matrices loaded together keep their blocks where quantized weights do:
    each of a type the kernels read. A plain SwiGLU's then run through the grouped integer kernels;
    gpt-oss's (biases and a clamped unit, MXFP4 in its files) through the chosen experts' rows
    dequantized at each step (kernels.moe), at the blocks' memory instead of bf16's."""
    return all(quant.has_kernel(i.qtype) for i in infos)


class StageWeights:
    """Reads a stage's tensors into torch, counting the file bytes it touched. With `quantized`,
    matrices of a type the kernels read stay in their GGUF blocks on a GPU (kernels.quant), and so
    do stacked experts where `experts_in_blocks` says (kernels.experts)."""

    def __init__(self, gguf: GGUFFile, cfg: ModelConfig, span: LayerSpan, prefetch: bool = True,
                 quantized: bool = False):
        self.gguf, self.cfg, self.span, self.quantized = gguf, cfg, span, quantized
        self.names = stage_tensor_names(cfg, span)
        self.cover = span_cover(gguf, self.names)
        for name in self.names:
            check_shape(gguf, cfg, name)
        self.bytes_read = 0
        self.without_kernel: dict[str, int] = {}  # type -> matrices held dense only for want of a kernel
        for start, end in self.cover.spans if prefetch else ():
            gguf.prefetch(start, end)

    def load(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self.load_stacked((name,), device, dtype)

    def load_stacked(self, names: tuple[str, ...], device: torch.device, dtype: torch.dtype):
        """The tensors `names` stacked along their first (torch) dimension, in one new tensor
        on `device`: one allocation there, no intermediate copy of the whole. Quantized matrices
        stay quantized where `quantized` allows: one QuantizedWeight, or a tuple of parts when
        their types differ."""
        infos = [require_tensor(self.gguf, name) for name in names]
        self.bytes_read += sum(info.n_bytes for info in infos)
        if self.quantized and device.type != "cpu" and len(infos[0].shape) == 2:
            for info in infos:
                if not quant.has_kernel(info.qtype) and info.qtype not in PLAIN_TYPES:
                    self.without_kernel[info.qtype.name] = self.without_kernel.get(info.qtype.name, 0) + 1
            if any(quant.has_kernel(info.qtype) for info in infos):
                return self._quantized(infos, device, dtype)
        parts = [host_tensor(self.gguf, info) for info in infos]
        out = torch.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=dtype, device=device)
        row = 0
        for part in parts:
            out[row : row + part.shape[0]].copy_(part)
            row += part.shape[0]
        return out

    def _quantized(self, infos: list[TensorInfo], device: torch.device, dtype: torch.dtype):
        parts = []
        for info in infos:
            check_type(info)
            if quant.has_kernel(info.qtype):
                cols, rows = info.shape
                raw = np.frombuffer(self.gguf.tensor_bytes(info), dtype=np.uint8).reshape(rows, -1)
                parts.append(quant.quantized_weight(raw, info.qtype, cols, device))
            else:
                parts.append(host_tensor(self.gguf, info).to(device=device, dtype=dtype))
        # consecutive matrices of one type stack into one (Q4_K_M's Q4_K q and k: one product, its
        # Q6_K v another)
        runs: list[list] = []
        for part in parts:
            last = runs[-1][-1] if runs else None
            if isinstance(part, quant.QuantizedWeight) and isinstance(last, quant.QuantizedWeight) \
                    and last.qtype == part.qtype:
                runs[-1].append(part)
            else:
                runs.append([part])
        merged = [quant.stack(run) if len(run) > 1 else run[0] for run in runs]
        return merged[0] if len(merged) == 1 else tuple(merged)

    def load_block(self, layer: int, device, dtype) -> dict[str, torch.Tensor]:
        """A Block's weights, q/k/v and gate/up stacked (see model.block_weights); experts' gate and
        up stacked per expert; a DeltaNet layer's decay parameters in float32."""
        return {key: (self.load_experts if key.endswith(("_exps", "_exps_bias")) else self.load_stacked)(
                    tuple(f"blk.{layer}.{t}" for t in parts), device, torch.float32 if key in FLOAT32_WEIGHTS else dtype)
                for key, parts in block_weights(self.cfg, layer).items()}

    def load_experts(self, names: tuple[str, ...], device: torch.device, dtype: torch.dtype):
        """Stacked expert tensors [E, rows, cols] (or their biases [E, rows]). Where quantized weights
        stay in blocks and `experts_in_blocks` allows: QuantizedExperts, one per tensor (gate and up:
        the pair). Else dequantized side by side along each expert's rows, in one new tensor on
        `device`."""
        infos = [require_tensor(self.gguf, name) for name in names]
        self.bytes_read += sum(info.n_bytes for info in infos)
        if self.quantized and device.type != "cpu" and len(infos[0].shape) == 3:
            if experts_in_blocks(infos):
                parts = tuple(self._experts_in_blocks(info, device) for info in infos)
                return parts if len(parts) > 1 else parts[0]
            for info in infos:
                if info.qtype not in PLAIN_TYPES:
                    self.without_kernel[info.qtype.name] = self.without_kernel.get(info.qtype.name, 0) + 1
        parts = [host_tensor(self.gguf, info) for info in infos]
        out = torch.empty((parts[0].shape[0], sum(p.shape[1] for p in parts), *parts[0].shape[2:]), dtype=dtype,
                          device=device)
        row = 0
        for part in parts:
            out[:, row : row + part.shape[1]].copy_(part)
            row += part.shape[1]
        return out

    def _experts_in_blocks(self, info: TensorInfo, device: torch.device) -> QuantizedExperts:
        check_type(info)
        cols, rows, count = info.shape
        raw = np.frombuffer(self.gguf.tensor_bytes(info), dtype=np.uint8).reshape(count * rows, -1)
        return QuantizedExperts.from_blocks(raw, info.qtype, count, cols, device)
