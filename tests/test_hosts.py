"""Devices on other hosts: the `[HOST/]BACKEND:INDEX` grammar, processes grouped per host, the
`--cluster` address and the YAML `cluster:` / `hosts:` sections, memory that cannot be checked
from here, and `shardrt plan` showing the host of every shard. No Ray is needed for any of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardrt.cli import build_parser
from shardrt.config import SHARED_BYTES_ENV, HostConfig, LaunchConfig, from_args, load_yaml, parse_cluster
from shardrt.devices import DeviceInfo
from shardrt.errors import ConfigError, PlacementError
from shardrt.gguf_file import GGUFFile
from shardrt.launch import plan_placement
from shardrt.memory import GIB, budgets, pools, remote_pools
from shardrt.model import ModelConfig
from shardrt.placement import DeviceSpec, ProcessPlan, parse_device, parse_devices, plan_processes, plan_shards

CUDA0, HIP0, CPU0 = DeviceSpec("cuda", 0), DeviceSpec("hip", 0), DeviceSpec("cpu", 0)
B_HIP0, B_HIP1, B_CPU0 = DeviceSpec("hip", 0, "nodeb"), DeviceSpec("hip", 1, "nodeb"), DeviceSpec("cpu", 0, "nodeb")
C_HIP0 = DeviceSpec("hip", 0, "nodec")
HOST_MEMORY = DeviceInfo(CPU0, "CPU", 64 * GIB, 48 * GIB, True)
CLI_TIMEOUT = 120


@pytest.fixture(autouse=True)
def no_shared_bytes_env(monkeypatch):
    monkeypatch.delenv(SHARED_BYTES_ENV, raising=False)


def parse(*argv: str) -> LaunchConfig:
    return from_args(build_parser().parse_args(["plan", *argv]))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "place.yaml"
    path.write_text(text)
    return path


# -- the grammar -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("cuda:0", CUDA0),
    ("nodeb/hip:1", B_HIP1),
    ("NodeB/ROCM:1", B_HIP1),  # host and backend both lowercased, the alias resolved
    (" nodeb/cpu:0 ", B_CPU0),
    ("gpu-box.lab_2/cuda:3", DeviceSpec("cuda", 3, "gpu-box.lab_2")),
    ("10.0.0.7/hip:0", DeviceSpec("hip", 0, "10.0.0.7")),
    ("b/cpu:0", DeviceSpec("cpu", 0, "b")),
    ("a" * 63 + "/cpu:0", DeviceSpec("cpu", 0, "a" * 63)),
])
def test_a_device_may_name_its_host(text, expected):
    assert parse_device(text) == expected


def test_a_device_prints_as_it_is_written_and_knows_whether_it_is_remote():
    assert (str(B_HIP0), str(CUDA0)) == ("nodeb/hip:0", "cuda:0")
    assert B_HIP0.remote and not CUDA0.remote
    assert all(parse_device(str(d)) == d for d in (CUDA0, B_HIP0, C_HIP0, B_CPU0))
    # ordering still works across local and remote devices ("" sorts first within a backend)
    assert sorted([B_HIP1, C_HIP0, HIP0, B_HIP0, CUDA0]) == [CUDA0, HIP0, B_HIP0, C_HIP0, B_HIP1]


def test_the_same_index_on_another_host_is_another_device():
    assert parse_devices("hip:0,nodeb/hip:0,nodec/hip:0") == (HIP0, B_HIP0, C_HIP0)


@pytest.mark.parametrize("text,message", [
    ("nodeb/", "--target-gpus: 'nodeb/' is not [HOST/]BACKEND:INDEX (e.g. cuda:0, nodeb/hip:1)"),
    ("/hip:0", "--target-gpus: '/hip:0' is not [HOST/]BACKEND:INDEX (e.g. cuda:0, nodeb/hip:1)"),
    ("nodeb/hip", "--target-gpus: 'nodeb/hip' is not [HOST/]BACKEND:INDEX (e.g. cuda:0, nodeb/hip:1)"),
    ("nodeb:hip:0", "--target-gpus: 'nodeb:hip:0' is not [HOST/]BACKEND:INDEX (e.g. cuda:0, nodeb/hip:1)"),
    ("nodeb/tpu:0", "--target-gpus: 'nodeb/tpu:0' names unknown backend 'tpu'; accepted: cpu, cuda, hip (or rocm)"),
    ("-nodeb/hip:0", "--target-gpus: '-nodeb/hip:0': '-nodeb' is not a host name (letters, digits, '.', '_', '-'; "
                     "at most 63, starting and ending with a letter or digit)"),
    ("a/b/hip:0", "--target-gpus: 'a/b/hip:0': 'a/b' is not a host name (letters, digits, '.', '_', '-'; "
                  "at most 63, starting and ending with a letter or digit)"),
    ("local/hip:0", "--target-gpus: 'local/hip:0': host 'local' is reserved for the coordinator's host; "
                    "leave the host out for a device there"),
])
def test_a_bad_device_is_refused_in_one_line(text, message):
    with pytest.raises(PlacementError) as err:
        parse_devices(text)
    assert str(err.value) == message


@pytest.mark.parametrize("text", ["node b/hip:0", "nodé/hip:0", "a" * 64 + "/hip:0", "node./hip:0"])
def test_host_names_outside_the_grammar_are_refused(text):
    with pytest.raises(PlacementError, match="is not a host name"):
        parse_device(text)


def test_duplicates_compare_the_whole_device():
    with pytest.raises(PlacementError) as err:
        parse_devices("cuda:0,nodeb/hip:0,NodeB/rocm:0")
    assert str(err.value) == "--target-gpus: nodeb/hip:0 appears twice"


# -- processes per host ------------------------------------------------------------------------

def test_isolated_every_remote_device_gets_its_own_daemon_on_its_host():
    processes = plan_processes((CUDA0, B_HIP0, B_HIP1), isolate_gpus=True)
    assert [(p.index, p.backend, p.devices, p.host) for p in processes] == [
        (0, "cuda", (CUDA0,), ""), (1, "hip", (B_HIP0,), "nodeb"), (2, "hip", (B_HIP1,), "nodeb")]
    coordinator, d1, d2 = processes
    assert (coordinator.label, coordinator.where, coordinator.remote) == ("coordinator", "", False)
    assert (d1.label, d1.where, d1.remote) == ("daemon 1", "@nodeb", True)
    # indices are the host's own: pinning and the local view work as they do on this machine
    assert d2.child_env() == {"HIP_VISIBLE_DEVICES": "1", "ROCR_VISIBLE_DEVICES": "1"} and d2.local_index(B_HIP1) == 0


def test_grouped_one_daemon_per_host_and_backend_run():
    devices = parse_devices("cuda:0,nodeb/hip:0,nodeb/hip:1,hip:0,hip:1,nodec/hip:0,nodeb/cpu:0,nodeb/cpu:1")
    processes = plan_processes(devices, isolate_gpus=False)
    assert [(p.index, p.host, [str(d) for d in p.devices]) for p in processes] == [
        (0, "", ["cuda:0"]),
        (1, "nodeb", ["nodeb/hip:0", "nodeb/hip:1"]),
        (2, "", ["hip:0", "hip:1"]),  # the same backend and indices as nodeb's, but another host
        (3, "nodec", ["nodec/hip:0"]),
        (4, "nodeb", ["nodeb/cpu:0", "nodeb/cpu:1"]),
    ]
    assert processes[1].child_env() == {"HIP_VISIBLE_DEVICES": "0,1", "ROCR_VISIBLE_DEVICES": "0,1"}
    assert [processes[1].local_index(d) for d in (B_HIP0, B_HIP1)] == [0, 1]
    assert processes[2].child_env() == {"HIP_VISIBLE_DEVICES": "0,1", "ROCR_VISIBLE_DEVICES": "0,1"}


def test_a_remote_device_never_joins_the_coordinator():
    # nodeb/cuda:1 has the coordinator's backend, but it is on another host
    processes = plan_processes(parse_devices("cuda:0,nodeb/cuda:1,cuda:2"), isolate_gpus=False)
    assert [(p.index, p.host, [str(d) for d in p.devices]) for p in processes] == [
        (0, "", ["cuda:0", "cuda:2"]), (1, "nodeb", ["nodeb/cuda:1"])]


@pytest.mark.parametrize("isolate", [True, False])
def test_a_placement_starting_on_another_host_leaves_the_coordinator_without_a_device(isolate):
    processes = plan_processes(parse_devices("nodeb/cpu:0,cpu:0,cpu:1"), isolate_gpus=isolate)
    assert not any(p.in_process for p in processes)
    assert processes[0].index == 1 and processes[0].host == "nodeb"
    assert all(p.host == "" for p in processes[1:])


def test_shards_are_owned_per_host():
    shards, processes = plan_shards(parse_devices("cpu:0,nodeb/cpu:0,nodeb/cpu:1"), 30, isolate_gpus=False)
    assert [(str(s.device), s.start, s.stop, s.process) for s in shards] == [
        ("cpu:0", 0, 10, 0), ("nodeb/cpu:0", 10, 20, 1), ("nodeb/cpu:1", 20, 30, 1)]
    assert [(p.index, p.host) for p in processes] == [(0, ""), (1, "nodeb")]
    assert ProcessPlan(7, "cpu", (CPU0,)).host == ""  # the coordinator's host unless told


# -- --cluster and the YAML sections -----------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("ray://head:10001", "ray://head:10001"),
    (" 10.0.0.1:6379 ", "10.0.0.1:6379"),
    ("AUTO", "auto"),
    ("ray://[::1]:10001", "ray://[::1]:10001"),
    ("head.cluster.internal:6379", "head.cluster.internal:6379"),
])
def test_good_cluster_addresses(text, expected):
    assert parse_cluster(text, "--cluster") == expected


@pytest.mark.parametrize("value", ["ray:/head:1", "head", "head:", "head:0", "head:65536", "http://head:80",
                                   "ray://head", "", 6379, None])
def test_bad_cluster_addresses_are_refused_in_one_line(value):
    with pytest.raises(ConfigError) as err:
        parse_cluster(value, "--cluster")
    assert str(err.value) == f"--cluster: {value!r} is not a Ray address (ray://HOST:PORT, HOST:PORT or auto)"


def test_cluster_flag_lets_devices_name_hosts():
    config = parse("--target-gpus", "cuda:0,nodeb/hip:0,nodeb/hip:1", "--cluster", "ray://head:10001")
    assert config.devices == (CUDA0, B_HIP0, B_HIP1) and config.cluster == "ray://head:10001"
    assert config.remote_hosts == ("nodeb",) and config.hosts == ()
    assert config.host("nodeb") == HostConfig("nodeb")  # the defaults: the coordinator's model path
    assert parse("--target-gpus", "cpu:0").cluster is None


@pytest.mark.parametrize("command", ["launch", "serve", "plan"])
def test_every_placement_command_takes_cluster(command):
    args = build_parser().parse_args([command, "--cluster", "auto"])
    assert args.cluster == "auto"


def test_a_host_without_a_cluster_is_refused_in_one_line(tmp_path):
    with pytest.raises(PlacementError) as err:
        parse("--target-gpus", "cuda:0,nodeb/hip:0")
    assert str(err.value) == ("--target-gpus: nodeb/hip:0 is on host nodeb; devices on other hosts need "
                              "--cluster ADDRESS (cluster: {ray: ADDRESS} in YAML)")
    path = write(tmp_path, "target:\n  devices: [cpu:0, nodeb/cpu:0]\n")
    with pytest.raises(PlacementError, match=r"^target.devices: nodeb/cpu:0 is on host nodeb; devices on other"):
        parse("--config", str(path))
    assert parse("--config", str(path), "--cluster", "auto").devices == (CPU0, B_CPU0)


HOSTS_EXAMPLE = """\
cluster: {ray: "ray://head:10001"}
target: {devices: [cuda:0, nodeb/hip:0, nodeb/hip:1, nodec/cpu:0], isolate_gpus: false}
hosts:
  NodeB:
    model: /data/models/m.gguf
    backends: {rocm: {python: /opt/rocm-venv/bin/python}, cpu: {python: /opt/cpu/bin/python}}
  nodec:
"""


def test_yaml_cluster_and_hosts(tmp_path):
    config = load_yaml(write(tmp_path, HOSTS_EXAMPLE))
    assert config.cluster == "ray://head:10001"
    assert config.devices == (CUDA0, B_HIP0, B_HIP1, DeviceSpec("cpu", 0, "nodec"))
    assert config.hosts == (
        HostConfig("nodeb", Path("/data/models/m.gguf"),
                   (("cpu", "/opt/cpu/bin/python"), ("hip", "/opt/rocm-venv/bin/python"))),
        HostConfig("nodec"))
    nodeb = config.host("nodeb")
    assert (nodeb.python("hip"), nodeb.python("cuda")) == ("/opt/rocm-venv/bin/python", None)
    assert config.host("nodec").model is None and config.pythons == {}  # this host's interpreters are separate
    assert hash(nodeb) == hash(HostConfig("nodeb", Path("/data/models/m.gguf"), nodeb.pythons))  # frozen values
    assert parse("--config", str(write(tmp_path, HOSTS_EXAMPLE))).hosts == config.hosts
    # the flag wins over the file's address
    assert parse("--config", str(write(tmp_path, HOSTS_EXAMPLE)), "--cluster", "head:6379").cluster == "head:6379"


@pytest.mark.parametrize("text,message", [
    ("cluster: {address: x}\n", "cluster: unknown key 'address'; accepted: ray"),
    ("cluster: ray://head:10001\n", "cluster: expected a mapping, got str 'ray://head:10001'"),
    ("cluster: {}\n", "cluster.ray: missing; give the Ray cluster's address (ray://HOST:PORT, HOST:PORT or auto)"),
    ("cluster: {ray: 'ray:/x'}\n", "cluster.ray: 'ray:/x' is not a Ray address (ray://HOST:PORT, HOST:PORT or auto)"),
    ("hosts: [nodeb]\n", "hosts: expected a mapping of host names, got list ['nodeb']"),
    ("hosts:\n  -bad: {}\n", "hosts: '-bad' is not a host name (letters, digits, '.', '_', '-'; at most 63, "
                             "starting and ending with a letter or digit)"),
    ("hosts:\n  12: {}\n", "hosts: 12 is not a host name"),
    ("hosts:\n  nodeb: {}\n  NodeB: {}\n", "hosts: host 'nodeb' appears twice"),
    ("hosts:\n  nodeb: {python: /x}\n", "hosts.nodeb: unknown key 'python'; accepted: backends, model"),
    ("hosts:\n  nodeb: /data/m.gguf\n", "hosts.nodeb: expected a mapping, got str '/data/m.gguf'"),
    ("hosts:\n  nodeb: {model: m.gguf}\n",
     "hosts.nodeb.model: 'm.gguf' is not an absolute path to a GGUF file on host nodeb"),
    ("hosts:\n  nodeb: {model: 3}\n", "hosts.nodeb.model: 3 is not an absolute path to a GGUF file on host nodeb"),
    ("hosts:\n  nodeb: {backends: {tpu: {python: /x}}}\n",
     "hosts.nodeb.backends: unknown key 'tpu'; accepted: cpu, cuda, hip, rocm"),
    ("hosts:\n  nodeb: {backends: {hip: {python: ''}}}\n",
     "hosts.nodeb.backends.hip.python: '' is not a path to an interpreter"),
    ("hosts:\n  nodeb: {backends: {hip: {interpreter: /x}}}\n",
     "hosts.nodeb.backends.hip: unknown key 'interpreter'; accepted: python"),
    ("draft:\n  kind: model\n  model: d.gguf\n  device: nodeb/cpu:0\n",
     "draft.device: nodeb/cpu:0 is on host nodeb; the draft daemon runs on the coordinator's host "
     "(drafts on other hosts: not yet)"),
])
def test_bad_cluster_and_hosts_sections_are_refused_in_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_yaml(write(tmp_path, text))
    assert str(err.value) == message


def test_a_hosts_entry_that_no_device_uses_is_refused(tmp_path):
    path = write(tmp_path, HOSTS_EXAMPLE.replace("  nodec:\n", "  noded:\n"))
    with pytest.raises(PlacementError) as err:
        parse("--config", str(path))
    assert str(err.value) == ("hosts.noded: no device is on host noded "
                              "(devices: cuda:0, nodeb/hip:0, nodeb/hip:1, nodec/cpu:0)")
    # the flags' devices replace the file's, so the file's hosts must still be used by them
    with pytest.raises(PlacementError, match="^hosts.nodeb: no device is on host nodeb"):
        parse("--config", str(write(tmp_path, HOSTS_EXAMPLE)), "--target-gpus", "cpu:0,nodec/cpu:0")


@pytest.mark.parametrize("argv,message", [
    (("--layer-split", "auto"), "--layer-split: auto needs the free memory of every device; nodeb/hip:0 is on "
                                "another host; give the split by hand"),
    (("--max-ctx", "auto"), "--max-ctx: auto needs the free memory of every device; nodeb/hip:0 is on another host; "
                            "give a number of tokens"),
])
def test_what_needs_a_remote_host_seen_from_here_is_refused(argv, message):
    with pytest.raises(PlacementError) as err:
        parse("--target-gpus", "cuda:0,nodeb/hip:0", "--cluster", "auto", *argv)
    assert str(err.value) == message


def test_the_draft_daemon_stays_on_the_coordinators_host():
    args = build_parser().parse_args(["launch", "--target-gpus", "cuda:0,nodeb/hip:0", "--cluster", "auto",
                                      "--draft-model", "d.gguf", "--draft-gpu", "nodeb/hip:1"])
    with pytest.raises(PlacementError) as err:
        from_args(args)
    assert str(err.value) == ("--draft-gpu: nodeb/hip:1 is on host nodeb; the draft daemon runs on the coordinator's "
                              "host (drafts on other hosts: not yet)")


def test_yaml_auto_with_a_remote_device_names_the_yaml_keys(tmp_path):
    text = "cluster: {ray: auto}\ntarget:\n  devices: [cpu:0, nodeb/cpu:0]\n  layer_split: auto\n"
    with pytest.raises(PlacementError, match="^target.layer_split: auto needs the free memory of every device"):
        parse("--config", str(write(tmp_path, text)))
    text = "cluster: {ray: auto}\nmax_ctx: auto\ntarget:\n  devices: [cpu:0, nodeb/cpu:0]\n"
    with pytest.raises(PlacementError, match="^max_ctx: auto needs the free memory of every device"):
        parse("--config", str(write(tmp_path, text)))
    assert parse("--config", str(write(tmp_path, text)), "--max-ctx", "2048").max_ctx == 2048


# -- memory that lives on another host ---------------------------------------------------------

@pytest.fixture(scope="module")
def model(demo_model):
    with GGUFFile(demo_model) as gguf:
        yield gguf, ModelConfig.from_gguf(gguf)


def test_remote_pools_are_keyed_per_host_and_left_unchecked():
    devices = parse_devices("cpu:0,nodeb/cpu:0,nodeb/cpu:1,nodeb/hip:0,hip:0")
    found = [HOST_MEMORY, DeviceInfo(HIP0, "local hip", 16 * GIB, 16 * GIB, False)]
    pool = pools(devices, found)
    assert [pool[d] for d in devices] == ["host", "nodeb:host", "nodeb:host", "nodeb/hip:0", "hip:0"]
    assert remote_pools(pool) == {"nodeb:host": "nodeb", "nodeb/hip:0": "nodeb"}
    assert set(budgets(devices, found, None)) == {"host", "hip:0"}  # nothing for the other host's memory


def test_a_remote_shard_is_not_checked_against_this_machine(model):
    gguf, cfg = model
    # this machine's 48 GiB of host memory would refuse 1<<22 tokens of KV cache; nodeb's memory is not known
    config = LaunchConfig(devices=parse_devices("nodeb/cpu:0,nodeb/cpu:1"), max_ctx=1 << 22, cluster="auto")
    placement = plan_placement(config, gguf, cfg, [HOST_MEMORY])
    assert placement.memory == {} and placement.refusal() is None
    local = plan_placement(LaunchConfig(devices=parse_devices("cpu:0,nodeb/cpu:0"), max_ctx=1 << 22, cluster="auto"),
                           gguf, cfg, [HOST_MEMORY])
    assert local.refusal().splitlines()[1].strip().startswith("cpu:0 (host memory): needs")


def test_auto_split_with_a_remote_device_is_refused_by_the_memory_plan(model):
    gguf, cfg = model
    config = LaunchConfig(devices=parse_devices("cpu:0,nodeb/hip:0"), layer_split="auto", cluster="auto")
    with pytest.raises(PlacementError) as err:
        plan_placement(config, gguf, cfg, [HOST_MEMORY])
    assert str(err.value) == ("--layer-split: auto needs the free memory of every device; nodeb/hip:0 is on another "
                              "host; give the split by hand")


# -- shardrt plan ------------------------------------------------------------------------------

def shardrt(*args: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != SHARED_BYTES_ENV}
    return subprocess.run([sys.executable, "-m", "shardrt.cli", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, env=environ, stdin=subprocess.DEVNULL)


PLACEMENT = ("--target-gpus", "cpu:0,nodeb/cpu:0,nodeb/cpu:1,nodeb/hip:0", "--cluster", "ray://head:10001",
             "--no-isolate-gpus", "--layer-split", "1,1,1,1")


def test_plan_shows_the_host_of_every_shard(demo_model):
    run = shardrt("plan", str(demo_model), *PLACEMENT)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    header = lines[1].split()
    assert header[:4] == ["host", "backend", "device", "process"]
    rows = [line.split() for line in lines[2:6]]
    assert [row[:3] for row in rows] == [["local", "cpu", "cpu:0"], ["nodeb", "cpu", "nodeb/cpu:0"],
                                         ["nodeb", "cpu", "nodeb/cpu:1"], ["nodeb", "hip", "nodeb/hip:0"]]
    assert "coordinator" in lines[2] and "daemon 1 @nodeb" in lines[3] and "daemon 1 @nodeb" in lines[4]
    assert "daemon 2 @nodeb" in lines[5] and "HIP_VISIBLE_DEVICES=0" in lines[5]
    assert lines[6].startswith("memory host (host memory): needs")
    assert lines[7:] == ["memory nodeb:host: not checked here (on host nodeb)",
                         "memory nodeb/hip:0: not checked here (on host nodeb)"]  # and nothing reported missing


def test_plan_json_rows_carry_the_host(demo_model, tmp_path):
    path = tmp_path / "place.yaml"
    path.write_text("cluster: {ray: 'head:6379'}\nhosts:\n  nodeb: {backends: {hip: {python: /opt/rocm/bin/python}}}\n")
    run = shardrt("plan", str(demo_model), "--config", str(path), *PLACEMENT[:2], *PLACEMENT[4:], "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    rows = [(s["host"], s["device"], s["process"], s["where"], s["memory_pool"], s["python"]) for s in out["shards"]]
    assert rows == [
        ("local", "cpu:0", "coordinator", "", "host", "coordinator"),
        ("nodeb", "nodeb/cpu:0", "daemon 1", "@nodeb", "nodeb:host", f"{sys.executable} on nodeb"),  # the same path there
        ("nodeb", "nodeb/cpu:1", "daemon 1", "@nodeb", "nodeb:host", f"{sys.executable} on nodeb"),
        ("nodeb", "nodeb/hip:0", "daemon 2", "@nodeb", "nodeb/hip:0", "/opt/rocm/bin/python"),
    ]
    assert list(out["memory"]) == ["host"] and out["fits"] is True and out["missing"] == []
    assert out["unchecked_memory"] == {"nodeb:host": "nodeb", "nodeb/hip:0": "nodeb"}


@pytest.mark.parametrize("argv,message", [
    (("--target-gpus", "cpu:0,nodeb/hip:0"),
     "--target-gpus: nodeb/hip:0 is on host nodeb; devices on other hosts need --cluster ADDRESS "
     "(cluster: {ray: ADDRESS} in YAML)"),
    (("--target-gpus", "nodeb/"), "--target-gpus: 'nodeb/' is not [HOST/]BACKEND:INDEX (e.g. cuda:0, nodeb/hip:1)"),
])
def test_plan_refuses_in_one_line_with_exit_2(demo_model, argv, message):
    run = shardrt("plan", str(demo_model), *argv)
    assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [f"shardrt: error: {message}"]
