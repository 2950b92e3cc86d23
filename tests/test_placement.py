"""Placement: device lists, layer-split weights, layer ranges, and which process pins what."""

from __future__ import annotations

import random

import pytest

from shardrt.errors import PlacementError
from shardrt.placement import (DeviceSpec, ProcessPlan, parse_device, parse_devices, parse_layer_split,
                               plan_processes, plan_shards, split_layers)

CUDA0, HIP0, HIP1, HIP2 = DeviceSpec("cuda", 0), DeviceSpec("hip", 0), DeviceSpec("hip", 1), DeviceSpec("hip", 2)
CPU0, CPU1, CPU2 = DeviceSpec("cpu", 0), DeviceSpec("cpu", 1), DeviceSpec("cpu", 2)


# -- --target-gpus -----------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("cuda:0,hip:0,hip:1", (CUDA0, HIP0, HIP1)),
    ("rocm:1", (HIP1,)),
    (" cuda:0 , hip:1 ", (CUDA0, HIP1)),
    ("CUDA:0,HIP:1,Rocm:2", (CUDA0, HIP1, HIP2)),
    ("cpu:0,cpu:1,cpu:2", (CPU0, CPU1, CPU2)),
    ("cuda:12", (DeviceSpec("cuda", 12),)),
])
def test_good_device_lists(text, expected):
    assert parse_devices(text) == expected


def test_device_list_from_yaml_is_a_list():
    assert parse_devices(["cuda:0", "rocm:0"], "target.devices") == (CUDA0, HIP0)


@pytest.mark.parametrize("text,needle", [
    ("cpu:0,cpu:0", "cpu:0 appears twice"),
    ("rocm:1,hip:1", "hip:1 appears twice"),  # the alias is the same device
    ("cuda", "'cuda'"),
    ("cuda:-1", "'cuda:-1'"),
    ("cuda:x", "'cuda:x'"),
    ("cuda:0:1", "'cuda:0:1'"),
    ("tpu:0", "'tpu'"),
    ("cuda:0,,hip:0", "entry ''"),
    ("", "entry ''"),
    (" , ", "entry ' '"),
])
def test_bad_device_lists_name_the_value(text, needle):
    with pytest.raises(PlacementError) as err:
        parse_devices(text)
    message = str(err.value)
    assert message.startswith("--target-gpus:") and needle in message, message


@pytest.mark.parametrize("items,needle", [([], "[]"), (5, "5"), (["cuda:0", 1], "entry 1"), ({"a": 1}, "{'a': 1}")])
def test_bad_device_values_from_yaml(items, needle):
    with pytest.raises(PlacementError) as err:
        parse_devices(items, "target.devices")
    assert str(err.value).startswith("target.devices:") and needle in str(err.value)


def test_unknown_backend_lists_the_accepted_ones():
    with pytest.raises(PlacementError, match="accepted: cpu, cuda, hip"):
        parse_device("xpu:0")


# -- --layer-split -----------------------------------------------------------------------

@pytest.mark.parametrize("items,n,expected", [
    ("0.08,0.46,0.46", 3, (0.08, 0.46, 0.46)),
    ("1,3", 2, (0.25, 0.75)),
    (" 2 , 2 ", 2, (0.5, 0.5)),
    ([1, 1, 2], 3, (0.25, 0.25, 0.5)),
    ("5", 1, (1.0,)),
    ("1e308,1e308", 2, (0.5, 0.5)),  # the sum overflows a float; the weights must not
    ("1e-300,3e-300", 2, (0.25, 0.75)),
])
def test_layer_split_is_normalised(items, n, expected):
    weights = parse_layer_split(items, n)
    assert weights == pytest.approx(expected)
    assert sum(weights) == pytest.approx(1.0)


@pytest.mark.parametrize("items,n,needle", [
    ("0.5,0.5", 3, "2 weights for 3 devices"),
    ("1,1,1,1", 3, "4 weights for 3 devices"),
    ("0,1", 2, "'0'"),
    ("-1,1", 2, "'-1'"),
    ("nan,1", 2, "'nan'"),
    ("inf,1", 2, "'inf'"),
    ("1,-inf", 2, "'-inf'"),
    ("abc,1", 2, "'abc'"),
    ("1,,1", 3, "''"),
    ([True, 1], 2, "True"),
    ([None, 1], 2, "None"),
    (0.5, 1, "0.5"),
])
def test_bad_layer_split_names_the_value(items, n, needle):
    with pytest.raises(PlacementError) as err:
        parse_layer_split(items, n)
    message = str(err.value)
    assert message.startswith("--layer-split:") and needle in message, message


# -- split_layers ------------------------------------------------------------------------

def test_design_example_split():
    assert split_layers(64, (0.08, 0.46, 0.46)) == [(0, 5), (5, 35), (35, 64)]


@pytest.mark.parametrize("n_layers,weights,expected", [
    (30, (0.5, 0.5), [(0, 15), (15, 30)]),
    (10, (1.0,), [(0, 10)]),
    (3, (1 / 3, 1 / 3, 1 / 3), [(0, 1), (1, 2), (2, 3)]),
    (3, (0.998, 0.001, 0.001), [(0, 1), (1, 2), (2, 3)]),  # the big shard gives up layers
    (10, (1e-9, 1 - 2e-9, 1e-9), [(0, 1), (1, 9), (9, 10)]),
    (10, (1 - 2e-9, 1e-9, 1e-9), [(0, 8), (8, 9), (9, 10)]),
    (10, (1e-9, 1e-9, 1 - 2e-9), [(0, 1), (1, 2), (2, 10)]),
])
def test_every_shard_gets_at_least_one_layer(n_layers, weights, expected):
    assert split_layers(n_layers, weights) == expected


def test_random_splits_cover_every_layer_once():
    rng = random.Random(0)
    for _ in range(500):
        n_shards = rng.randint(1, 8)
        n_layers = rng.randint(n_shards, 100)
        raw = [rng.choice((1e-6, 1.0, 100.0)) * rng.random() + 1e-12 for _ in range(n_shards)]
        ranges = split_layers(n_layers, tuple(w / sum(raw) for w in raw))
        assert len(ranges) == n_shards
        assert ranges[0][0] == 0 and ranges[-1][1] == n_layers
        assert all(a < b for a, b in ranges), ranges
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(n_shards - 1)), ranges


def test_more_shards_than_layers_is_refused():
    with pytest.raises(PlacementError, match="4 shards for a model of 3 layers"):
        split_layers(3, (0.25,) * 4)


# -- processes and pinning ---------------------------------------------------------------

def test_isolated_every_device_but_the_first_gets_a_daemon():
    processes = plan_processes((CUDA0, HIP0, HIP1), isolate_gpus=True)
    assert [(p.index, p.backend, p.devices) for p in processes] == [
        (0, "cuda", (CUDA0,)), (1, "hip", (HIP0,)), (2, "hip", (HIP1,))]
    coordinator, d1, d2 = processes
    assert coordinator.in_process and coordinator.label == "coordinator"
    assert coordinator.child_env() == {} and coordinator.local_index(CUDA0) == 0
    assert d1.label == "daemon 1" and not d1.in_process
    assert d1.child_env() == {"HIP_VISIBLE_DEVICES": "0", "ROCR_VISIBLE_DEVICES": "0"}
    assert d2.child_env() == {"HIP_VISIBLE_DEVICES": "1", "ROCR_VISIBLE_DEVICES": "1"}
    assert d2.local_index(HIP1) == 0  # hip:1 is device 0 in its pinned view


def test_grouped_backend_shares_one_daemon_with_remapped_ids():
    processes = plan_processes((CUDA0, HIP1, HIP2), isolate_gpus=False)
    assert [(p.index, p.backend, p.devices) for p in processes] == [(0, "cuda", (CUDA0,)), (1, "hip", (HIP1, HIP2))]
    hip = processes[1]
    assert hip.child_env() == {"HIP_VISIBLE_DEVICES": "1,2", "ROCR_VISIBLE_DEVICES": "1,2"}
    assert (hip.local_index(HIP1), hip.local_index(HIP2)) == (0, 1)


def test_in_process_group_keeps_real_ids_and_no_env():
    coordinator = plan_processes((DeviceSpec("cuda", 1), DeviceSpec("cuda", 3)), isolate_gpus=False)[0]
    assert coordinator.in_process and coordinator.child_env() == {}
    assert coordinator.local_index(DeviceSpec("cuda", 3)) == 3


def test_all_daemons_leaves_the_coordinator_without_a_device():
    processes = plan_processes((CUDA0, DeviceSpec("cuda", 2), HIP1), isolate_gpus=False, all_daemons=True)
    assert [p.index for p in processes] == [1, 2]
    cuda, hip = processes
    assert not cuda.in_process and cuda.label == "daemon 1"
    assert cuda.child_env() == {"CUDA_VISIBLE_DEVICES": "0,2"}
    assert (cuda.local_index(CUDA0), cuda.local_index(DeviceSpec("cuda", 2))) == (0, 1)
    assert hip.child_env() == {"HIP_VISIBLE_DEVICES": "1", "ROCR_VISIBLE_DEVICES": "1"}

    isolated = plan_processes((CUDA0, HIP0), isolate_gpus=True, all_daemons=True)
    assert [(p.index, p.child_env()) for p in isolated] == [
        (1, {"CUDA_VISIBLE_DEVICES": "0"}), (2, {"HIP_VISIBLE_DEVICES": "0", "ROCR_VISIBLE_DEVICES": "0"})]


def test_cpu_daemons_pin_nothing():
    processes = plan_processes((CPU0, CPU1, CPU2), isolate_gpus=True)
    assert [p.index for p in processes] == [0, 1, 2]
    assert all(p.child_env() == {} for p in processes)
    assert processes[2].local_index(CPU2) == 2  # cpu ids are never remapped
    assert ProcessPlan(1, "cpu", (CPU0, CPU1)).child_env() == {}


def test_plan_shards_assigns_layers_and_owners():
    shards, processes = plan_shards((CUDA0, HIP0, HIP1), 64, (0.08, 0.46, 0.46), isolate_gpus=False)
    assert [(str(s.device), s.start, s.stop, s.process) for s in shards] == [
        ("cuda:0", 0, 5, 0), ("hip:0", 5, 35, 1), ("hip:1", 35, 64, 1)]
    assert len(processes) == 2

    even, _ = plan_shards((CPU0, CPU1, CPU2), 30)
    assert [(s.start, s.stop, s.process) for s in even] == [(0, 10, 0), (10, 20, 1), (20, 30, 2)]


def test_interleaved_backend_groups_get_one_daemon_per_consecutive_run():
    from shardrt.placement import plan_shards

    shards, processes = plan_shards(parse_devices("cuda:0,hip:0,cuda:1,hip:1"), 30, isolate_gpus=False)
    assert [s.process for s in shards] == [0, 1, 0, 2]  # cuda:1 joins the coordinator's group
    assert len({p.index for p in processes}) == len(processes)
    shards, _ = plan_shards(parse_devices("cpu:0,hip:1,hip:2,cuda:0,hip:3"), 30, isolate_gpus=False)
    assert [s.process for s in shards] == [0, 1, 1, 2, 3]
