"""Which kernels a device runs (shardrt.kernels.support): Triton where it builds for the GPU,
the torch references on GPUs it cannot target, and what `weights: auto` and the memory plan make
of that. A pure function of what torch reports, so every case runs without the GPU."""

from __future__ import annotations

import pytest

from shardrt.devices import gfx_name
from shardrt.kernels.support import kernel_path
from shardrt.memory import planned_kernels
from shardrt.placement import DeviceSpec


@pytest.mark.parametrize("backend, capability, arch, path, reason", [
    ("cuda", (9, 0), None, "triton", ""),
    ("cuda", (7, 0), None, "triton", ""),
    ("cuda", (6, 1), None, "torch", "compute capability 6.1 is below 7.0"),
    ("cuda", (5, 2), None, "torch", "compute capability 5.2 is below 7.0"),
    ("hip", (9, 0), "gfx90a:sramecc+:xnack-", "triton", ""),
    ("hip", (9, 4), "gfx942", "triton", ""),
    ("hip", (11, 0), "gfx1100", "triton", ""),
    ("hip", (9, 0), "gfx906:sramecc+:xnack-", "torch", "gfx906 is not an architecture Triton builds for"),
    ("hip", (9, 0), "gfx803", "torch", "gfx803 is not an architecture Triton builds for"),
    ("cpu", None, None, "torch", ""),
])
def test_the_path_follows_what_triton_builds_for(backend, capability, arch, path, reason):
    got = kernel_path(backend, capability, arch)
    assert got.path == path and got.reason.startswith(reason)
    assert got.describe() == (f"torch ({reason}" + got.reason[len(reason):] + ")" if reason else path)


def test_no_triton_or_the_torch_choice_takes_the_references():
    assert kernel_path("cuda", (9, 0), have_triton=False).reason == "Triton is not installed beside this torch"
    assert kernel_path("cuda", (9, 0), choice="torch").reason == "SHARDRT_KERNELS=torch"


@pytest.mark.parametrize("version, name", [(90010, "gfx90a"), (90006, "gfx906"), (90402, "gfx942"), (110000, "gfx1100"),
                                           (0, "")])
def test_kfd_target_versions_name_the_architecture(version, name):
    assert gfx_name(version) == name


def test_the_plan_assumes_the_kernels_where_it_cannot_look():
    # a device of another backend than this torch's, or on another host: its loader decides again
    assert planned_kernels(DeviceSpec("hip", 0)).path == "triton"
    assert planned_kernels(DeviceSpec("cuda", 0, "nodeb")).path == "triton"
    assert planned_kernels(DeviceSpec("cpu", 0)).path == "torch"
