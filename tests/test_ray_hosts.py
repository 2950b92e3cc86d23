"""shardrt.cluster on a two-node Ray test cluster on this machine: host names to node ids, and
the DaemonHost actor that execs a child on its node, hands it its pipes and takes it down."""

import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import psutil
import pytest
import zmq

ray = pytest.importorskip("ray")

from shardrt.cluster import host_actor, ray_cluster  # noqa: E402
from shardrt.cluster.host_actor import actor_name, start_child, start_host_actor  # noqa: E402
from shardrt.errors import ConfigError, StageDied  # noqa: E402
from shardrt.lifecycle import exit_reason  # noqa: E402

pytestmark = pytest.mark.timeout(300)

NODE = dict(num_cpus=1, object_store_memory=80 << 20, include_dashboard=False)
GONE_WITHIN = 10.0  # seconds for a killed child to be gone

# Writes its pid and environment as the ready line, then serves until EOF on the death pipe.
READY_CHILD = r"""
import json, os, sys
print("child says hello", flush=True)
print("child warns on stderr", file=sys.stderr, flush=True)
with os.fdopen(int(os.environ["SHARDRT_READY_FD"]), "w") as ready:
    ready.write(json.dumps({"pid": os.getpid(), "env": dict(os.environ)}) + "\n")
death = int(os.environ["SHARDRT_DEATH_FD"])
while os.read(death, 1):
    pass
"""

# Ready, then deaf to EOF and SIGTERM alike: only SIGKILL ends it.
STUBBORN_CHILD = r"""
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with os.fdopen(int(os.environ["SHARDRT_READY_FD"]), "w") as ready:
    ready.write("{}\n")
while True:
    time.sleep(60)
"""

FAILING_CHILD = r"""
import sys
import threading
print("loading /data/m.gguf", flush=True)
print("ModelFormatError: /data/m.gguf: no such file", file=sys.stderr, flush=True)
sys.exit(3)
"""

# Never ready: waits on the death pipe from the start.
SILENT_CHILD = r"""
import os
death = int(os.environ["SHARDRT_DEATH_FD"])
while os.read(death, 1):
    pass
"""


def _gone(pid: int) -> bool:
    """No such process, or a zombie (PID 1 in this container does not reap)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, timeout: float = GONE_WITHIN) -> float:
    """Seconds until `pid` is gone; fails the test past `timeout`."""
    start = time.monotonic()
    while not _gone(pid):
        assert time.monotonic() - start < timeout, f"pid {pid} still running after {timeout}s"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    t0 = time.monotonic()
    test_cluster = Cluster(initialize_head=True,
                           head_node_args={**NODE, "labels": {ray_cluster.HOST_LABEL: "nodea"}})
    t_head = time.monotonic()
    try:
        nodeb = test_cluster.add_node(**NODE, labels={ray_cluster.HOST_LABEL: "nodeb"})
        test_cluster.wait_for_nodes()
        t_nodes = time.monotonic()
        ray_cluster.connect(test_cluster.address)
        t_up = time.monotonic()
        print(f"\nray test cluster: head {t_head - t0:.2f}s, second node {t_nodes - t_head:.2f}s, "
              f"connect {t_up - t_nodes:.2f}s, total {t_up - t0:.2f}s", file=sys.stderr)
        yield SimpleNamespace(address=test_cluster.address, head_id=test_cluster.head_node.node_id,
                              nodeb_id=nodeb.node_id, nodes=test_cluster)
    finally:
        t_down = time.monotonic()
        ray_cluster.disconnect()
        test_cluster.shutdown()
        print(f"ray test cluster: shutdown {time.monotonic() - t_down:.2f}s", file=sys.stderr)
    for child in psutil.Process().children(recursive=True):
        _wait_gone(child.pid)  # gcs_server, raylets, workers: nothing outlives the cluster


@pytest.fixture
def hosts(cluster):
    """Makes DaemonHost actors by node id; kills whatever the test left."""
    made = []

    def make(node_id: str, index: int):
        actor = start_host_actor(node_id, actor_name("test", index))
        made.append(actor)
        return actor

    yield make
    for actor in made:
        ray.kill(actor, no_restart=True)


def test_resolve_host_by_label(cluster):
    assert ray_cluster.resolve_host("nodea") == cluster.head_id
    assert ray_cluster.resolve_host("NodeB") == cluster.nodeb_id  # host names ignore case


def test_resolve_host_refuses_unknown_host_naming_the_nodes(cluster):
    with pytest.raises(ConfigError) as refused:
        ray_cluster.resolve_host("nodez")
    assert str(refused.value) == (f"--target-gpus: host 'nodez' is no node of the Ray cluster at {cluster.address} "
                                  "(nodes: nodea, nodeb [label shardrt-host])")


def test_resolve_host_refuses_a_hostname_two_nodes_share(cluster):
    hostname = {n["NodeManagerHostname"] for n in ray.nodes() if n["Alive"]}
    assert len(hostname) == 1  # both test nodes run on this machine
    with pytest.raises(ConfigError, match=r"^--target-gpus: host '.+' is 2 nodes of the Ray cluster at .+ by hostname "
                                          r"\(node ids \w{8}, \w{8}\); give each a label: "
                                          r"ray start --labels shardrt-host=NAME$"):
        ray_cluster.resolve_host(hostname.pop())


def test_connect_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigError, match=r"^--cluster: needs Ray; pip install 'shardrt\[cluster\]'$"):
        ray_cluster.connect("127.0.0.1:6379")


def test_one_box_use_never_imports_ray():
    code = ("import sys, shardrt.cluster.ray_cluster, shardrt.cluster.host_actor\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out == "[]\n"


def test_connect_to_nothing_fails_fast_naming_the_address():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening: refused
    code = ("from shardrt.cluster import ray_cluster\n"
            "try:\n    ray_cluster.connect(%r)\nexcept Exception as e:\n    print(type(e).__name__, e)\n" % address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out == f"ConfigError --cluster: cannot join the Ray cluster at '{address}': Connection refused\n"


def test_child_on_nodeb_is_ready_with_a_clean_environment_and_stops(cluster, hosts):
    actor = hosts(cluster.nodeb_id, 1)
    answer = start_child(actor, [sys.executable, "-c", READY_CHILD], {"SHARDRT_TEST_ADDED": "yes"},
                         label="daemon 1", ready_timeout=30)
    assert set(answer) == {"ready", "pid", "host", "ip", "node_id"}
    assert answer["node_id"] == cluster.nodeb_id
    assert answer["ready"]["pid"] == answer["pid"]
    assert answer["host"] == socket.gethostname()
    assert answer["ip"] == next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == cluster.nodeb_id)
    env = answer["ready"]["env"]
    assert env["SHARDRT_TEST_ADDED"] == "yes"
    assert "OMP_NUM_THREADS" not in env and "PYTHONBREAKPOINT" not in env
    assert not [k for k in env if k.startswith("RAY_")]
    # the actor was unpickled by value: its Ray worker never imported shardrt
    worker_modules = ray.get(actor.__ray_call__.remote(lambda self: sorted(sys.modules)), timeout=30)
    assert not [m for m in worker_modules if m.split(".")[0] == "shardrt"]
    assert ray.get_actor("shardrt-test-d1", namespace="shardrt") is not None

    exited = actor.wait.remote()
    assert not ray.wait([exited], timeout=0)[0]
    assert ray.get(actor.stop.remote(5.0), timeout=30) == 0  # EOF on the death pipe was enough
    assert ray.get(exited, timeout=30) == 0
    _wait_gone(answer["pid"])
    tail = ray.get(actor.log_tail.remote(), timeout=30)
    assert "child says hello" in tail and "child warns on stderr" in tail


def test_ray_kill_takes_the_child_down(cluster, hosts):
    actor = hosts(cluster.nodeb_id, 2)
    pid = start_child(actor, [sys.executable, "-c", READY_CHILD], {}, label="daemon 2", ready_timeout=30)["pid"]
    exited = actor.wait.remote()
    ray.kill(actor, no_restart=True)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(exited, timeout=30)
    seconds = _wait_gone(pid)
    print(f"\nchild of a killed actor gone in {seconds:.2f}s", file=sys.stderr)


def test_stop_escalates_to_sigkill(cluster, hosts):
    actor = hosts(cluster.nodeb_id, 3)
    pid = start_child(actor, [sys.executable, "-c", STUBBORN_CHILD], {}, label="daemon 3", ready_timeout=30)["pid"]
    start = time.monotonic()
    assert ray.get(actor.stop.remote(0.3), timeout=30) == -signal.SIGKILL
    assert time.monotonic() - start >= 0.6  # it waited after closing the pipe and after SIGTERM
    _wait_gone(pid)


def test_child_exiting_before_ready_gives_status_and_log_tail(cluster, hosts):
    actor = hosts(cluster.head_id, 4)
    argv = [sys.executable, "-c", FAILING_CHILD]
    answer = ray.get(actor.start.remote(argv, {}, (), 30.0), timeout=90)
    assert answer["error"] == "exited before it was ready"
    assert answer["status"] == 3
    assert "loading /data/m.gguf" in answer["log_tail"]
    assert answer["node_id"] == cluster.head_id

    with pytest.raises(StageDied) as died:
        start_child(hosts(cluster.head_id, 5), argv, {}, label="daemon 5", ready_timeout=30)
    assert str(died.value) == (f"daemon 5 on host {socket.gethostname()}: exited before it was ready "
                               "(exit status 3: ModelFormatError: /data/m.gguf: no such file)")


def test_child_silent_past_ready_timeout_is_stopped(cluster, hosts):
    actor = hosts(cluster.nodeb_id, 6)
    start = time.monotonic()
    answer = ray.get(actor.start.remote([sys.executable, "-c", SILENT_CHILD], {}, (), 0.5), timeout=90)
    assert answer["error"] == "not ready within 0.5s"
    assert answer["status"] == 0  # it exited on EOF of the death pipe, the first step of stop
    assert time.monotonic() - start < 30
    _wait_gone(answer["pid"])


def test_child_env_drops_given_prefixes_and_keeps_env_add():
    base = {"OMP_NUM_THREADS": "1", "RAY_JOB_ID": "01", "SPT_NOENV": "1", "PYTHONBREAKPOINT": "x",
            "HIP_VISIBLE_DEVICES": "0", "PATH": "/bin"}
    env = host_actor.child_env(base, {"OMP_NUM_THREADS": "8", "CUDA_VISIBLE_DEVICES": "1"}, ("HIP_",))
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "8", "CUDA_VISIBLE_DEVICES": "1"}


def test_exit_reason_is_one_line():
    assert exit_reason(-9, "loading\nRuntimeError: out of memory\nbye\n") == \
        "killed by SIGKILL: RuntimeError: out of memory"
    assert exit_reason(0, "") == "exit status 0"
    assert exit_reason(None, "x") == "still running: x"


# -- the whole path: shardrt.launch.Cluster with stages on "nodeb" through Ray, over TCP + Curve --

PROMPT_IDS = [1, 504, 3575, 282, 4649, 314]


def _greedy(pipeline, n: int = 10) -> list[int]:
    import torch

    pipeline.reset()
    tokens = [pipeline.greedy(torch.tensor(PROMPT_IDS), 0)]
    while len(tokens) < n:
        tokens.append(pipeline.greedy(torch.tensor([tokens[-1]]), len(PROMPT_IDS) + len(tokens) - 1))
    return tokens


def _three_stages(cluster, **extra):
    from shardrt.config import LaunchConfig
    from shardrt.placement import parse_devices

    return LaunchConfig(devices=parse_devices("cpu:0,nodeb/cpu:0,nodeb/cpu:1"), cluster=cluster.address,
                        max_ctx=64, prefix_cache_slots=0, **extra)


def test_stages_on_another_host_give_the_tokens_of_one_process(cluster, demo_model):
    import torch

    from shardrt.launch import Cluster
    from shardrt.pipeline import Pipeline
    from shardrt.stage import Stage

    want = _greedy(Pipeline([Stage(demo_model, 0, 30, max_ctx=64)]))
    with Cluster(_three_stages(cluster), demo_model) as launched:
        assert [d.host for d in launched.daemons] == ["nodeb", "nodeb"]
        assert all(d.endpoint.startswith("tcp://") for d in launched.daemons)
        assert [stage.hello["layers"] for stage in launched.remote] == [[10, 20], [20, 30]]
        assert all(stage.hello["cover"] for stage in launched.remote)  # each maps only its own span
        names = [actor_name(launched.launch_id, i) for i in (1, 2)]
        assert all(ray.get_actor(name, namespace="shardrt") for name in names)
        pids = [d.pid for d in launched.daemons]
        assert _greedy(launched.pipeline) == want
        with zmq.Context() as context:  # a peer without the launch's keys: refused at the handshake
            stranger = context.socket(zmq.DEALER)
            stranger.linger = 0
            stranger.connect(launched.daemons[0].endpoint)
            stranger.send(b"\x81\xa2op\xa4ping")
            assert not stranger.poll(1500)
            stranger.close()
        assert _greedy(launched.pipeline) == want  # and the stage goes on
        launched.pipeline.reset()
        got = launched.pipeline.forward(torch.tensor(PROMPT_IDS), 0, all_logits=True)
        whole = Pipeline([Stage(demo_model, 0, 30, max_ctx=64)]).forward(torch.tensor(PROMPT_IDS), 0, all_logits=True)
        assert (got - whole).abs().max().item() < 1e-4
    for pid in pids:
        _wait_gone(pid)
    for name in names:  # the actors went with the launch
        with pytest.raises(ValueError):
            ray.get_actor(name, namespace="shardrt")


def test_an_actor_killed_mid_request_names_the_host_and_the_stage(cluster, demo_model):
    import threading

    import torch

    from shardrt.launch import Cluster

    with Cluster(_three_stages(cluster), demo_model) as launched:
        launched.pipeline.reset()
        launched.pipeline.forward(torch.tensor(PROMPT_IDS), 0)
        victim = ray.get_actor(actor_name(launched.launch_id, 2), namespace="shardrt")
        killer = threading.Timer(0.5, ray.kill, args=(victim,))
        killer.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(StageDied, match=r"stage daemon 2 \(nodeb/cpu:1\), layers \[20,30\)\+head: .*host nodeb"):
                for pos in range(len(PROMPT_IDS), 64):  # decode until the kill lands
                    launched.pipeline.forward(torch.tensor([7]), pos)
        finally:
            killer.join(10)
        assert time.monotonic() - t0 < 0.5 + launched.timeouts.heartbeat + 5


def test_a_copy_of_the_model_that_differs_on_the_host_is_refused_in_one_line(cluster, demo_model, tmp_path):
    from shardrt.config import HostConfig
    from shardrt.launch import Cluster

    data = bytearray(demo_model.read_bytes())
    data[data.index(b"Smollm2 135M")] = ord("s")  # general.name: parses, but its header differs
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(bytes(data))
    config = _three_stages(cluster, hosts=(HostConfig("nodeb", model=copy),))
    with pytest.raises(ConfigError) as refused:
        with Cluster(config, demo_model):
            pass
    message = str(refused.value)
    assert "\n" not in message and f"model: {copy} on host nodeb is not the coordinator's {demo_model.name}" in message


def test_an_unknown_host_is_refused_before_anything_starts(cluster, demo_model):
    from shardrt.config import LaunchConfig
    from shardrt.launch import Cluster
    from shardrt.placement import parse_devices

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    config = LaunchConfig(devices=parse_devices("cpu:0,nodez/cpu:0"), cluster=cluster.address, max_ctx=64)
    with pytest.raises(ConfigError, match=r"^--target-gpus: host 'nodez' is no node of the Ray cluster"):
        with Cluster(config, demo_model):
            pass
    started = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not [pid for pid in started if not _gone(pid)]


def test_under_serve_a_killed_actor_fails_the_request_then_serving_resumes(cluster, demo_model, tmp_path):
    import openai

    from tests.test_server import daemon_pid, serving, wait_for, wait_recovered

    flags = ("--target-gpus", "cpu:0,nodeb/cpu:0", "--cluster", cluster.address, "--max-seqs", "2")
    with serving(demo_model, tmp_path / "stderr.txt", *flags) as server:
        status, health = server.health()
        assert [s["process"] for s in health["stages"]] == ["coordinator", "daemon 1 (nodeb/cpu:0)"]

        def complete(prompt: str, n: int):
            return server.client.completions.create(model=server.model, prompt=prompt, max_tokens=n, temperature=0,
                                                    extra_body={"ignore_eos": True}).choices[0].text

        before = complete("The capital of France is", 8)
        pid = daemon_pid(server)
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "shardrt" and a["name"].startswith(f"shardrt-{server.proc.pid}-")]
        assert len(actors) == 1
        outcome = []
        asker = threading.Thread(target=lambda: outcome.append(_try(lambda: complete("A long story:", 400))))
        asker.start()
        wait_for(lambda: server.health()[1]["running"] == 1, 30, "the request running")
        ray.kill(ray.get_actor(actors[0]["name"], namespace="shardrt"))
        asker.join(60)
        (failed,) = outcome
        assert isinstance(failed, openai.APIStatusError) and failed.status_code == 503
        assert failed.body["code"] == "stage_died" and "nodeb/cpu:0" in failed.body["message"]
        wait_recovered(server, pid)
        assert complete("The capital of France is", 8) == before


def _try(call):
    try:
        return call()
    except Exception as exc:  # the request's outcome, whatever it is
        return exc


def test_a_node_that_dies_fails_the_request_naming_its_host(cluster, demo_model):
    import torch

    from shardrt.config import LaunchConfig
    from shardrt.launch import Cluster
    from shardrt.placement import parse_devices

    nodec = cluster.nodes.add_node(**NODE, labels={ray_cluster.HOST_LABEL: "nodec"})
    cluster.nodes.wait_for_nodes()
    config = LaunchConfig(devices=parse_devices("cpu:0,nodec/cpu:0"), cluster=cluster.address, max_ctx=64)
    with Cluster(config, demo_model) as launched:
        launched.pipeline.reset()
        launched.pipeline.forward(torch.tensor(PROMPT_IDS), 0)
        cluster.nodes.remove_node(nodec, allow_graceful=False)  # the node's raylet and every process on it
        t0 = time.monotonic()
        with pytest.raises(StageDied, match=r"stage daemon 1 \(nodec/cpu:0\), layers \[15,30\)\+head: .*nodec"):
            for pos in range(len(PROMPT_IDS), 64):
                launched.pipeline.forward(torch.tensor([7]), pos)
        assert time.monotonic() - t0 < launched.timeouts.heartbeat + 5
