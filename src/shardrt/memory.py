"""The memory plan: what each shard needs on its device, what the device has, the split that
fits (`--layer-split auto`, `--max-ctx auto`), and the refusal, before any weight is read.

A shard needs its weights (as they will sit on the device: quantized blocks or dequantized to
the compute dtype), its KV cache (`max_ctx` tokens for each of `max_seqs` sequences), the
recurrent state of its DeltaNet layers (qwen35: a fixed size per sequence), working
memory for a prefill chunk (activations, the logits row, the scratch matrix of quantized
weights) and, on a GPU, the runtime's own (context, libraries, graph pools). A device offers its free memory less a reserve
(`--vram-reserve`, YAML `reserve`, `SHARDRT_VRAM_RESERVE`; by default 512 MiB per GPU, 2 GiB more
on a GPU that drives a display, 2 GiB of host memory). An integrated GPU shares host memory, so
it is planned against that.

A device on another host draws on that host's memory, which this machine cannot see: its pool
(`nodeb/hip:0`, or `nodeb:host` for its CPU) is not checked here, and the `auto` choices, which
need every device's free memory, are refused for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import runner
from .config import parse_bytes
from .errors import PlacementError
from .gguf_file import GGUFFile
from .gguf_loader import LayerSpan, device_weight_bytes, stage_tensor_names
from .kernels import quant
from .devices import gpu_arch
from .kernels._triton import kernels_choice
from .kernels.support import KernelPath, kernel_path
from .model import ModelConfig
from .placement import DeviceSpec
from .recurrent_state import state_bytes

GIB, MIB = 1 << 30, 1 << 20
RESERVE_ENV = "SHARDRT_VRAM_RESERVE"
GPU_RESERVE = 512 * MIB
DISPLAY_RESERVE = 2 * GIB  # a desktop's compositor and browser live there
HOST_RESERVE = 2 * GIB
GPU_RUNTIME = 768 * MIB  # the CUDA/HIP context, cuBLAS and Triton modules, graph pools (an H200 context is ~530 MiB)
PREFILL_CHUNK = 1024  # tokens a GPU stage prefills at once (stage.PREFILL_BUCKETS); a CPU stage's whole prompt
CPU_PROMPT = 2048  # the prompt a CPU stage is planned for (it prefills unchunked)
# the logits rows a GPU stage's graphs keep: every token bucket, and the batch buckets of the most slots
GRAPH_LOGIT_ROWS = sum(runner.BUCKETS) + sum(runner.batch_buckets(runner.MAX_BATCH_BUCKET))
MIN_AUTO_CTX, CTX_STEP = 256, 256


@dataclass(frozen=True)
class DeviceMemory:
    """What one device offers: free memory (host memory for an integrated GPU) and the reserve."""

    spec: DeviceSpec
    name: str
    free: int
    total: int
    reserve: int
    integrated: bool = False

    @property
    def usable(self) -> int:
        return max(0, self.free - self.reserve)


@dataclass(frozen=True)
class Need:
    """What one shard needs on its device, in bytes."""

    weights: int
    kv: int
    scratch: int
    runtime: int
    state: int = 0  # the DeltaNet layers' recurrent state

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.state + self.scratch + self.runtime


def dtype_bytes(dtype: str, gpu: bool) -> int:
    return {"float32": 4, "auto": 2 if gpu else 4}.get(dtype, 2)


def kv_bytes(cfg: ModelConfig, layers: int, tokens: int, element: int) -> int:
    return 2 * layers * cfg.n_kv_heads * cfg.head_dim * tokens * element


def recurrent_layers(cfg: ModelConfig, span: LayerSpan) -> int:
    return sum(cfg.recurrent(i) for i in range(span.start, span.stop))


def scratch_bytes(cfg: ModelConfig, gguf: GGUFFile, names: list[str], gpu: bool, element: int,
                  quantized: bool) -> int:
    """Working memory of a prefill: the widest activations of a chunk, float32 logits (on a GPU
    the rows every captured graph keeps), and the scratch matrix the biggest quantized weight is
    dequantized into."""
    rows = PREFILL_CHUNK if gpu else CPU_PROMPT
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    activations = rows * (4 * cfg.dim + q + 2 * kv + 3 * cfg.ffn_dim) * element
    logits = cfg.vocab_size * 4 * (GRAPH_LOGIT_ROWS if gpu else 16)
    widest = 0
    if gpu and quantized:
        for name in names:
            info = gguf.tensors[name]
            if len(info.shape) == 2 and quant.has_kernel(info.qtype):
                widest = max(widest, info.n_elements)
        # q/k/v and gate/up are stacked before they are multiplied
        widest = max(widest, 2 * cfg.ffn_dim * cfg.dim if widest else 0)
    return activations + logits + widest * element


def shard_need(gguf: GGUFFile, cfg: ModelConfig, span: LayerSpan, device: DeviceSpec, dtype: str, weights: str,
               kv_tokens: int, seqs: int = 1) -> Need:
    """kv_tokens: what the KV cache holds, max_ctx for each of the `seqs` sequence slots (config.kv_tokens)."""
    gpu = device.is_gpu
    element = dtype_bytes(dtype, gpu)
    quantized = holds_blocks(device, weights)
    names = stage_tensor_names(cfg, span)
    recurrent = recurrent_layers(cfg, span)
    return Need(weights=device_weight_bytes(gguf, cfg, names, element, quantized),
                kv=kv_bytes(cfg, span.stop - span.start - recurrent, kv_tokens, element),
                state=state_bytes(cfg, recurrent, seqs, element) if recurrent else 0,
                scratch=scratch_bytes(cfg, gguf, names, gpu, element, quantized),
                runtime=GPU_RUNTIME if gpu else 0)


def holds_blocks(spec: DeviceSpec, weights: str) -> bool:
    """Whether a stage on `spec` keeps quantized matrices in their GGUF blocks under `weights`."""
    return spec.is_gpu and (weights == "quantized" or (weights == "auto" and planned_kernels(spec).path == "triton"))


def planned_kernels(spec: DeviceSpec) -> KernelPath:
    """The kernel path a stage on `spec` will run (kernels.support), from the GPU's compute
    capability or architecture as NVML / amdsmi / KFD report it (no GPU context in this process);
    where they cannot tell (another host, no driver here), the Triton kernels: the stage's loader
    decides again, and one that then holds dense weights is planned for less than it needs."""
    if not spec.is_gpu:
        return kernel_path("cpu")
    arch = "" if spec.remote else gpu_arch(spec)
    capability = tuple(int(v) for v in arch.split(".")) if spec.backend == "cuda" and arch else None
    # Triton is assumed where the stage runs (a daemon's interpreter is not this one)
    return kernel_path(spec.backend, capability, arch if spec.backend == "hip" and arch else None,
                       choice=kernels_choice())


def reserve_for(spec: DeviceSpec, display: bool, override: int | None) -> int:
    env = os.environ.get(RESERVE_ENV)
    if env is not None:
        return parse_bytes(env, RESERVE_ENV) if spec.is_gpu else HOST_RESERVE
    if override is not None and spec.is_gpu:
        return override
    if not spec.is_gpu:
        return HOST_RESERVE
    return GPU_RESERVE + (DISPLAY_RESERVE if display else 0)


def pool_of(spec: DeviceSpec, integrated: bool) -> str:
    """Which memory a device draws on: host memory for the CPU and integrated GPUs, its own otherwise;
    another host's CPU draws on that host's memory (`nodeb:host`)."""
    if spec.remote and not spec.is_gpu:
        return f"{spec.host}:host"
    return "host" if not spec.is_gpu or integrated else str(spec)


def remote_pools(pool: dict[DeviceSpec, str]) -> dict[str, str]:
    """The memory pools on other hosts (pool -> host): not known here, so not checked."""
    return {name: d.host for d, name in pool.items() if d.remote}


def budgets(devices: tuple[DeviceSpec, ...], found: list, reserve: int | None) -> dict[str, DeviceMemory]:
    """What each memory pool the named devices draw on offers, from discovery (devices.discover).
    Devices this machine does not have, and devices on other hosts, are left out: their shards
    are not checked."""
    by_spec = {d.spec: d for d in found}
    host = by_spec.get(DeviceSpec("cpu", 0))
    out: dict[str, DeviceMemory] = {}
    for spec in devices:
        if spec.remote:
            continue
        info = by_spec.get(DeviceSpec("cpu", 0) if not spec.is_gpu else spec)
        if info is None:
            continue
        pool = pool_of(spec, info.integrated)
        if pool == "host":
            if host is not None and "host" not in out:
                out["host"] = DeviceMemory(DeviceSpec("cpu", 0), "host memory", host.free_bytes, host.total_bytes,
                                           reserve_for(DeviceSpec("cpu", 0), False, reserve), integrated=True)
            continue
        out[pool] = DeviceMemory(spec, info.name, info.free_bytes, info.total_bytes,
                                 reserve_for(spec, info.display, reserve))
    return out


def pools(devices: tuple[DeviceSpec, ...], found: list) -> dict[DeviceSpec, str]:
    integrated = {d.spec: d.integrated for d in found}  # discovery is of this machine: never a remote spec
    return {d: pool_of(d, integrated.get(d, False)) for d in devices}


def auto_split(n_layers: int, capacity: list[float], gpu: list[bool]) -> tuple[float, ...]:
    """Weights for `split_layers`: GPUs first, in proportion to how many layers each can hold,
    none given more than it holds (largest remainders, capped); CPU stages take only what the
    GPUs cannot (a CPU is the slow overflow, however much memory it has); each at least one."""
    n_cpu = sum(1 for g in gpu if not g)
    gpu_room = sum(int(c) for c, g in zip(capacity, gpu) if g)
    if n_cpu and gpu_room < n_layers - n_cpu:  # the GPUs full, the CPUs share the rest
        rest = [c if not g else 0.0 for c, g in zip(capacity, gpu)]
        split = _proportional(n_layers - gpu_room, rest, [not g for g in gpu])
        return tuple((int(c) if g else s * (n_layers - gpu_room)) / n_layers for c, g, s in zip(capacity, gpu, split))
    if n_cpu:
        split = _proportional(n_layers - n_cpu, capacity, gpu)
        return tuple((s * (n_layers - n_cpu) if g else 1) / n_layers for s, g in zip(split, gpu))
    return _proportional(n_layers, capacity, gpu)


def _proportional(n_layers: int, capacity: list[float], take: list[bool]) -> tuple[float, ...]:
    """Fractions of n_layers for the devices in `take` (0 for the rest), as auto_split says."""
    total = sum(c for c, t in zip(capacity, take) if t)
    share = [n_layers * c / total if t else 0.0 for c, t in zip(capacity, take)]
    counts = [max(1, min(int(s), int(c))) if t else 0 for s, c, t in zip(share, capacity, take)]
    order = [i for i in sorted(range(len(capacity)), key=lambda i: share[i] - int(share[i]), reverse=True) if take[i]]
    order = sorted(range(len(capacity)), key=lambda i: share[i] - int(share[i]), reverse=True)
    while sum(counts) < n_layers:
        room = [i for i in order if counts[i] + 1 <= capacity[i]] or order
        counts[room[0]] += 1
        order = order[1:] + order[:1]
    while sum(counts) > n_layers:  # the at-least-one rule overshot: take from the largest
        counts[counts.index(max(counts))] -= 1
    return tuple(c / n_layers for c in counts)


def layer_bytes(gguf: GGUFFile, cfg: ModelConfig, device: DeviceSpec, dtype: str, weights: str, kv_tokens: int,
                seqs: int = 1) -> int:
    """A middle layer's weights and KV cache on `device`; with DeltaNet layers beside attention
    ones, an average layer's weights, KV cache and state."""
    mid = cfg.n_layers // 2
    span = LayerSpan(0, cfg.n_layers, False, False) if cfg.hybrid else LayerSpan(mid, mid + 1, False, False)
    need = shard_need(gguf, cfg, span, device, dtype, weights, kv_tokens, seqs)
    return (need.weights + need.kv + need.state) // (span.stop - span.start)


def fixed_bytes(gguf: GGUFFile, cfg: ModelConfig, device: DeviceSpec, dtype: str, weights: str, kv_tokens: int,
                first: bool, last: bool, seqs: int = 1) -> int:
    """What a shard on `device` needs besides its layers: runtime, working memory, and the
    embedding if it comes first and the head if it comes last."""
    mid = cfg.n_layers // 2
    bare = shard_need(gguf, cfg, LayerSpan(mid, mid + 1, first, last), device, dtype, weights, kv_tokens, seqs)
    middle = shard_need(gguf, cfg, LayerSpan(mid, mid + 1, False, False), device, dtype, weights, kv_tokens, seqs)
    return bare.total - (middle.weights + middle.kv + middle.state)


def capacities(gguf: GGUFFile, cfg: ModelConfig, devices: tuple[DeviceSpec, ...], memory: dict[str, DeviceMemory],
               pool: dict[DeviceSpec, str], dtype: str, weights: str, kv_tokens: int, seqs: int = 1) -> list[float]:
    """How many layers each device can hold; devices drawing on one pool share it evenly."""
    sharing = {p: sum(1 for d in devices if pool[d] == p) for p in set(pool.values())}
    out = []
    for i, d in enumerate(devices):
        mem = memory.get(pool[d])
        if mem is None:
            raise PlacementError(f"--layer-split auto: {d} is not on this machine, so its memory is unknown; "
                                 f"give --layer-split weights instead")
        fixed = fixed_bytes(gguf, cfg, d, dtype, weights, kv_tokens, first=i == 0, last=i == len(devices) - 1,
                            seqs=seqs)
        out.append(max(0.0, (mem.usable / sharing[pool[d]] - fixed)
                       / layer_bytes(gguf, cfg, d, dtype, weights, kv_tokens, seqs)))
    return out


def refusal(rows: list, memory: dict[str, DeviceMemory], pool: dict[DeviceSpec, str],
            weights: str = "auto") -> str | None:
    """One line per memory pool whose shards do not fit, with what they need and what is there;
    None when everything fits."""
    needs: dict[str, list] = {}
    for row in rows:
        needs.setdefault(pool[row.shard.device], []).append(row)
    lines = []
    for name, pool_rows in needs.items():
        mem = memory.get(name)
        if mem is None:
            continue
        need = sum(r.need.total for r in pool_rows)
        if need > mem.usable:
            w, kv = sum(r.need.weights for r in pool_rows), sum(r.need.kv for r in pool_rows)
            state = sum(r.need.state for r in pool_rows)
            where = ",".join(str(r.shard.device) for r in pool_rows)
            held = f", recurrent state {state / GIB:.2f}" if state else ""
            lines.append(f"{where} ({mem.name}): needs {need / GIB:.2f} GiB (weights {w / GIB:.2f}, KV cache "
                         f"{kv / GIB:.2f}{held}, working memory {(need - w - kv - state) / GIB:.2f}) but has "
                         f"{mem.usable / GIB:.2f} GiB "
                         f"({mem.free / GIB:.2f} free less a {mem.reserve / GIB:.2f} reserve)")
    if not lines:
        return None
    blocks = "--weights auto (quantized blocks on GPUs), " if weights == "dequantized" else ""
    return ("the placement does not fit; lower --max-ctx (or --max-ctx auto), use --layer-split auto, "
            f"{blocks}or more devices:\n  " + "\n  ".join(lines))
