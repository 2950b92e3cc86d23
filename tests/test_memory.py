"""Memory-aware placement: device discovery with its sources faked at their boundary (the pynvml
and amdsmi modules, a KFD sysfs tree), the memory plan and `--layer-split auto` / `--max-ctx
auto` on the real demo GGUF against device lists, and the refusal before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import replace

import pytest

from shardrt import devices as discovery
from shardrt.config import LaunchConfig
from shardrt.devices import DeviceInfo
from shardrt.errors import PlacementError
from shardrt.gguf_file import GGUFFile
from shardrt.launch import plan_placement
from shardrt.memory import GIB, GPU_RESERVE, GPU_RUNTIME, HOST_RESERVE, MIB, kv_bytes
from shardrt.model import ModelConfig
from shardrt.placement import DeviceSpec, parse_devices

from .test_multiprocess import shm_segments

CUDA0, CUDA1, HIP0, CPU = DeviceSpec("cuda", 0), DeviceSpec("cuda", 1), DeviceSpec("hip", 0), DeviceSpec("cpu", 0)
HOST = DeviceInfo(CPU, "CPU", 64 * GIB, 48 * GIB, True)


def gpu(spec, free_gib, total_gib=80, integrated=False, display=False):
    return DeviceInfo(spec, f"GPU {spec}", int(total_gib * GIB), int(free_gib * GIB), integrated, display)


@pytest.fixture(scope="module")
def model(demo_model):
    with GGUFFile(demo_model) as gguf:
        yield gguf, ModelConfig.from_gguf(gguf)


def place(model, devices: str, found, **kw):
    gguf, cfg = model
    return plan_placement(LaunchConfig(devices=parse_devices(devices), **kw), gguf, cfg, found)


def layers(placement) -> list[int]:
    return [r.shard.stop - r.shard.start for r in placement.rows]


# -- discovery ---------------------------------------------------------------------------------

def fake_nvml(gpus: list[tuple[str, int, int, bool]]) -> types.ModuleType:
    """A pynvml that answers as a driver with these (name, total, free, display active) boards would."""
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetName = lambda h: gpus[h][0].encode()
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=gpus[h][1], free=gpus[h][2])
    nvml.nvmlDeviceGetDisplayActive = lambda h: int(gpus[h][3])
    return nvml


def test_nvml_devices_with_their_display(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([("RTX 4090", 24 * GIB, 20 * GIB, True),
                                                           ("H100", 80 * GIB, 79 * GIB, False)]))
    found = discovery.nvidia_devices()
    assert [(d.spec, d.name, d.total_bytes, d.free_bytes, d.integrated, d.display) for d in found] == [
        (CUDA0, "RTX 4090", 24 * GIB, 20 * GIB, False, True), (CUDA1, "H100", 80 * GIB, 79 * GIB, False, False)]


def fake_amdsmi_source(boards: list[tuple[str, int, int]]) -> str:
    return f"""
import enum
BOARDS = {boards!r}
class AmdSmiMemoryType(enum.Enum):
    VRAM = 0
def amdsmi_init(): pass
def amdsmi_shut_down(): pass
def amdsmi_get_processor_handles(): return list(range(len(BOARDS)))
def amdsmi_get_gpu_asic_info(h): return {{"market_name": BOARDS[h][0]}}
def amdsmi_get_gpu_memory_total(h, kind): return BOARDS[h][1]
def amdsmi_get_gpu_memory_usage(h, kind): return BOARDS[h][1] - BOARDS[h][2]
"""


def test_amdsmi_devices(monkeypatch):
    module = types.ModuleType("amdsmi")
    exec(fake_amdsmi_source([("Radeon Pro VII", 16 * GIB, 15 * GIB)]), module.__dict__)
    monkeypatch.setitem(sys.modules, "amdsmi", module)
    (found,) = discovery.amd_devices()
    assert (found.spec, found.name, found.total_bytes, found.free_bytes) == (HIP0, "Radeon Pro VII", 16 * GIB, 15 * GIB)


def test_kfd_topology_when_amdsmi_is_absent(monkeypatch, tmp_path):
    """A CPU node, an APU (integrated: CPU cores and SIMDs on one node) and a discrete card."""
    nodes = {"0": ({"cpu_cores_count": 16, "simd_count": 0}, []),
             "1": ({"cpu_cores_count": 8, "simd_count": 48, "gfx_target_version": 110003}, [512 * MIB]),
             "2": ({"cpu_cores_count": 0, "simd_count": 240, "gfx_target_version": 90006}, [16 * GIB])}
    for name, (props, banks) in nodes.items():
        node = tmp_path / name
        node.mkdir()
        (node / "properties").write_text("".join(f"{k} {v}\n" for k, v in props.items()))
        for i, size in enumerate(banks):
            (node / "mem_banks" / str(i)).mkdir(parents=True)
            (node / "mem_banks" / str(i) / "properties").write_text(f"heap_type 1\nsize_in_bytes {size}\n")
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # `import amdsmi` raises ImportError
    monkeypatch.setattr(discovery, "KFD_NODES", tmp_path)
    found = discovery.amd_devices()
    assert [(d.spec, d.integrated, d.total_bytes) for d in found] == [
        (HIP0, True, 512 * MIB), (DeviceSpec("hip", 1), False, 16 * GIB)]


def test_a_backend_this_interpreter_cannot_see_is_probed_with_its_own(tmp_path):
    """The ROCm interpreter has amdsmi, this one does not: a real probe process asks it."""
    (tmp_path / "amdsmi.py").write_text(fake_amdsmi_source([("Radeon RX 7900 XTX", 24 * GIB, 22 * GIB)]))
    python = tmp_path / "python-rocm"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{tmp_path}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    found = discovery.discover({"hip": str(python)})
    hip = [d for d in found if d.spec.backend == "hip"]
    assert [(d.spec, d.name, d.free_bytes) for d in hip] == [(HIP0, "Radeon RX 7900 XTX", 22 * GIB)]
    assert found[-1].spec == CPU
    missing = discovery.discover({"hip": str(tmp_path / "no-such-python")})  # a probe that cannot run: no devices
    assert not any(d.spec.backend == "hip" for d in missing)


def test_devices_json_command():
    done = subprocess.run([sys.executable, "-m", "shardrt.cli", "devices", "--json"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    entries = json.loads(done.stdout)
    assert entries[-1]["device"] == "cpu:0" and entries[-1]["kind"] == "host" and entries[-1]["free_bytes"] > 0


# -- the memory plan ---------------------------------------------------------------------------

def test_each_shard_needs_its_weights_kv_and_working_memory(model):
    gguf, cfg = model
    p = place(model, "cuda:0,cuda:1", [gpu(CUDA0, 40), gpu(CUDA1, 40), HOST], max_ctx=2048, weights="dequantized")
    first, last = p.rows
    assert first.need.kv == kv_bytes(cfg, 15, 2048, 2) and first.need.runtime == GPU_RUNTIME
    assert first.need.weights > 0 and first.need.scratch > 0 and p.refusal() is None
    assert p.memory["cuda:0"].usable == 40 * GIB - GPU_RESERVE
    quantized = place(model, "cuda:0,cuda:1", [gpu(CUDA0, 40), gpu(CUDA1, 40), HOST], max_ctx=2048, weights="quantized")
    assert quantized.rows[0].need.weights < first.need.weights / 2  # Q4_1 blocks, not bf16


def test_auto_gives_a_partly_filled_gpu_fewer_layers(model):
    tight = 1.2 * GIB / GIB + (GPU_RESERVE + GPU_RUNTIME) / GIB  # room for about a third of the model
    p = place(model, "cuda:0,cuda:1", [gpu(CUDA0, 40), gpu(CUDA1, tight), HOST], layer_split="auto", max_ctx=8192)
    assert p.refusal() is None and sum(layers(p)) == 30
    assert layers(p)[1] < layers(p)[0]
    even = place(model, "cuda:0,cuda:1", [gpu(CUDA0, 40), gpu(CUDA1, 40), HOST], layer_split="auto", max_ctx=8192)
    assert abs(layers(even)[0] - layers(even)[1]) <= 2  # the embedding and head tip it, not much


def test_a_placement_that_does_not_fit_is_refused_per_device(model):
    small = [gpu(CUDA0, 1.0), gpu(CUDA1, 40), HOST]  # 1 GiB free: the runtime and reserve alone use 1.25
    p = place(model, "cuda:0,cuda:1", small)
    refused = p.refusal()
    assert refused.startswith("the placement does not fit")
    (line,) = [ln for ln in refused.splitlines()[1:]]
    assert line.strip().startswith("cuda:0 (GPU cuda:0): needs") and "but has 0.50 GiB (1.00 free less a 0.50 reserve)" in line
    with pytest.raises(PlacementError, match="hold 0 of the model's 30 layers"):
        place(model, "cuda:0", small, layer_split="auto")


def test_max_ctx_auto_is_the_largest_that_fits(model):
    gguf, cfg = model
    per_token = kv_bytes(cfg, 30, 1, 2)
    (row,) = place(model, "cuda:0", [gpu(CUDA0, 40), HOST], max_ctx=256).rows
    free = GPU_RESERVE + row.need.total - row.need.kv + 3000 * per_token  # room for about 3000 tokens of KV
    p = place(model, "cuda:0", [gpu(CUDA0, free / GIB), HOST], max_ctx_auto=True)
    assert p.refusal() is None and 1024 <= p.config.max_ctx < 4096 and p.config.max_ctx % 256 == 0
    bigger = place(model, "cuda:0", [gpu(CUDA0, free / GIB), HOST], max_ctx=p.config.max_ctx + 256)
    assert bigger.refusal() is not None
    roomy = place(model, "cuda:0", [gpu(CUDA0, 40), HOST], max_ctx_auto=True)
    assert roomy.config.max_ctx == cfg.context_length  # capped by what the model was trained for


def test_integrated_gpu_is_planned_against_host_memory(model):
    apu = gpu(HIP0, 0.5, total_gib=0.5, integrated=True)  # a 512 MiB carve-out that could never hold it
    p = place(model, "hip:0", [apu, HOST])
    assert p.pools[HIP0] == "host" and p.memory["host"].free == HOST.free_bytes and p.refusal() is None


def test_cpu_overflow_takes_what_no_gpu_holds(model):
    tight = (GPU_RESERVE + GPU_RUNTIME) / GIB + 0.2  # holds about half of the layers
    found = [gpu(CUDA0, tight), HOST]
    with pytest.raises(PlacementError, match="--allow-cpu-overflow"):
        place(model, "cuda:0", found, layer_split="auto")
    p = place(model, "cuda:0", found, layer_split="auto", allow_cpu_overflow=True)
    assert [r.shard.device for r in p.rows] == [CUDA0, CPU] and p.refusal() is None
    assert sum(layers(p)) == 30 and 5 <= layers(p)[0] <= 25  # the GPU filled first: the CPU takes the rest


def test_reserve_flag_and_environment(model, monkeypatch):
    found = [gpu(CUDA0, 40, display=True), HOST]
    assert place(model, "cuda:0", found).memory["cuda:0"].reserve == GPU_RESERVE + 2 * GIB  # a desktop lives there
    assert place(model, "cuda:0", found, reserve=3 * GIB).memory["cuda:0"].reserve == 3 * GIB
    monkeypatch.setenv("SHARDRT_VRAM_RESERVE", "5G")
    p = place(model, "cuda:0,cpu:0", found + [], reserve=3 * GIB)
    assert p.memory["cuda:0"].reserve == 5 * GIB and p.memory["host"].reserve == HOST_RESERVE
    monkeypatch.setenv("SHARDRT_VRAM_RESERVE", "lots")
    with pytest.raises(Exception, match="SHARDRT_VRAM_RESERVE: 'lots'"):
        place(model, "cuda:0", found)


def test_devices_this_machine_lacks_are_not_checked(model):
    p = place(model, "cuda:0,hip:0", [gpu(CUDA0, 40), HOST], max_ctx=1 << 23)
    assert "hip:0" not in p.memory and "cuda:0" in (p.refusal() or "")
    with pytest.raises(PlacementError, match="hip:0 is not on this machine"):
        place(model, "cuda:0,hip:0", [gpu(CUDA0, 40), HOST], layer_split="auto")


# -- refusal from the command line, before anything loads ------------------------------------

@pytest.mark.parametrize("command", ["plan", "launch"])
def test_cli_refuses_what_does_not_fit_before_loading(demo_model, tmp_path, command):
    argv = [sys.executable, "-m", "shardrt.cli", command, "--model", str(demo_model), "--target-gpus", "cpu:0,cpu:1",
            "--max-ctx", str(1 << 26)] + (["-p", "hi", "-n", "1"] if command == "launch" else [])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**os.environ, "TMPDIR": str(tmp_path), "XDG_RUNTIME_DIR": ""})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("shardrt: error: the placement does not fit")
    assert len(lines) == 2 and "cpu:0,cpu:1 (host memory): needs" in lines[1] and "KV cache" in lines[1]
    assert list(tmp_path.glob("shardrt-*")) == [] and shm_segments(done.returncode) == []


def test_yaml_auto_values(tmp_path):
    from shardrt.config import load_yaml

    path = tmp_path / "p.yaml"
    path.write_text("max_ctx: auto\nreserve: 2G\ntarget:\n  devices: [cuda:0, cuda:1]\n  layer_split: auto\n"
                    "  allow_cpu_overflow: true\n")
    cfg = load_yaml(path)
    assert (cfg.max_ctx_auto, cfg.reserve, cfg.layer_split, cfg.allow_cpu_overflow) == (True, 2 * GIB, "auto", True)
    assert replace(cfg, max_ctx_auto=False).max_ctx == 4096


def test_experts_in_blocks_are_planned_and_held_at_about_their_file_bytes(tmp_path):
    """A qwen3moe layer with Q4_K_M's experts (Q4_K gate and up, Q6_K down): the plan counts them as
    blocks, the loader holds exactly that (planes as a GPU would hold them: on the meta device, and
    for one tensor on the CPU), and both stay within 1.1x of the GGUF's bytes."""
    import numpy as np
    import torch

    from shardrt import kernels
    from shardrt.gguf_loader import LayerSpan, StageWeights, device_weight_bytes
    from shardrt.kernels.experts import QuantizedExperts
    from shardrt.kernels.quant import dequantize_reference
    from shardrt.memory import shard_need

    from .synthetic import write_model
    from .test_quant import gguf_dequantized

    path = write_model(tmp_path / "moe.gguf", "qwen3moe", n_layers=2, dim=256, qtype="Q8_0", experts=(8, 2, 256),
                       expert_qtypes=("Q4_K", "Q4_K", "Q6_K"))
    with GGUFFile(path) as gguf:
        cfg = ModelConfig.from_gguf(gguf)
        experts = [f"blk.1.{t}.weight" for t in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")]
        layer = [n for n in gguf.tensors if n.startswith("blk.1.")]
        file_bytes = {n: gguf.tensors[n].n_bytes for n in layer}
        planned = device_weight_bytes(gguf, cfg, experts, 2, quantized=True)
        loader = StageWeights(gguf, cfg, LayerSpan.of(0, 2, 2), quantized=True)
        block = loader.load_block(1, torch.device("meta"), torch.bfloat16)
        info = gguf.tensors[experts[2]]
        raw = np.frombuffer(gguf.tensor_bytes(info), dtype=np.uint8).reshape(8 * 256, -1)
        down = QuantizedExperts.from_blocks(raw, info.qtype, 8, 256, torch.device("cpu"))
        want = gguf_dequantized(raw, info.qtype, 8 * 256, 256)[3 * 256 : 4 * 256]  # expert 3's rows
        assert torch.equal(dequantize_reference(down.expert(3)).double(), want)
        need = shard_need(gguf, cfg, LayerSpan.of(0, 2, 2), CUDA0, "auto", "quantized", 64)
        dense = device_weight_bytes(gguf, cfg, experts, 2, quantized=False)
    gate_up = block["ffn_gate_up_exps"]
    assert isinstance(gate_up, tuple) and all(isinstance(p, QuantizedExperts)
                                              for p in gate_up + (block["ffn_down_exps"],))
    held = kernels.weight_bytes(gate_up) + kernels.weight_bytes(block["ffn_down_exps"])
    expert_file_bytes = sum(file_bytes[n] for n in experts)
    assert planned == held and down.nbytes == file_bytes[experts[2]]  # Q6_K's planes are its bytes
    assert expert_file_bytes < held <= 1.1 * expert_file_bytes  # Q4_K's scales unpacked: +2.8%
    assert dense > 2.4 * expert_file_bytes  # what they took dequantized to bf16
    whole = sum(kernels.weight_bytes(w) for w in block.values())  # with Q8_0 attention, F32 norms held in bf16
    assert whole <= 1.1 * sum(file_bytes.values())
    assert need.weights <= 1.1 * loader.cover.covered_bytes
