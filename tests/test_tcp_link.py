"""A daemon over TCP with CurveZMQ (the link to a host of its own), run on this box: real daemon
processes bound to 127.0.0.1, the real protocol and request loop. The same layers give the same
tokens as in one process; a peer without the keys is refused while the stage goes on; no shared
memory is made or accepted; a stalled daemon is caught by its published heartbeat; a local copy
of the model that differs from the coordinator's is refused before loading."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import zmq

from shardrt import launch
from shardrt.errors import ConfigError, IpcError, StageDied
from shardrt.gguf_file import GGUFFile
from shardrt.gguf_loader import LayerSpan
from shardrt.ipc.curve import ClientKeys, KeyPair, secure_client
from shardrt.lifecycle import DaemonProcess, Timeouts, make_runtime_dir, remove_runtime_dir
from shardrt.model import ModelConfig
from shardrt.pipeline import Pipeline
from shardrt.remote_stage import RemoteStage
from shardrt.stage import Stage
from shardrt.worker import ShardSpec
from tests.test_wire import stop_all

TIMEOUTS = Timeouts(ready=120, request=60, heartbeat=5, stop=5)
CTX = 64
REFUSED_MS = 1_500


def shm_segments(pid: int) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"shardrt-{pid}-")]


@pytest.fixture
def runtime():
    runtime_dir, context = make_runtime_dir(), zmq.Context()
    daemons, stages = [], []

    def start(model=None, identity=None, shards=(), label="tcp daemon", timeouts=TIMEOUTS, span=None, cfg=None):
        daemon = DaemonProcess(label=label, backend="cpu", python=None, child_env={}, runtime_dir=runtime_dir,
                               index=len(daemons) + 1, shared_bytes=0, model=model and str(model),
                               identity=identity or {"file": "echo"}, shards=shards, max_ctx=CTX, transport="tcp")
        daemons.append(daemon)
        stage = RemoteStage(daemon, context, timeouts, identity or {"file": "echo"}, span, cfg, CTX)
        stages.append(stage)
        return daemon, stage

    try:
        yield start, context
    finally:
        stop_all(stages, daemons, context, runtime_dir)
        assert all(d.process.poll() is not None for d in daemons)


@pytest.fixture(scope="module")
def demo(demo_model):
    with GGUFFile(demo_model) as gguf:
        cfg = ModelConfig.from_gguf(gguf)
    return demo_model, cfg, launch.model_identity(demo_model, cfg)


def test_an_echo_daemon_over_tcp_returns_what_it_got_and_shares_no_memory(runtime):
    start, _ = runtime
    daemon, stage = start()
    assert daemon.endpoint.startswith("tcp://127.0.0.1:") and stage.timeouts.spin == 0
    for rows in (1, 7, 300):  # 1 KiB to 300 KiB of float32, every one as a frame
        x = torch.randn(rows, 256)
        assert torch.equal(stage.forward(x, 0), x)
    assert shm_segments(os.getpid()) == [] and stage.request({"op": "ping"})[0]["pid"] == daemon.pid


def test_layers_over_tcp_give_the_tokens_of_one_process(runtime, demo):
    path, cfg, identity = demo
    start, _ = runtime
    _, remote = start(path, identity, (ShardSpec("cpu:0", 0, 15, 30),), span=LayerSpan.of(15, 30, cfg.n_layers), cfg=cfg)
    assert remote.hello["layers"] == [15, 30]
    split = Pipeline([Stage(path, 0, 15, max_ctx=CTX), remote])
    whole = Pipeline([Stage(path, 0, 30, max_ctx=CTX)])
    ids = torch.tensor([1, 504, 3575, 282, 4649, 314])

    def greedy(pipeline, n=12):
        pipeline.reset()
        tokens = [pipeline.greedy(ids, 0)]
        while len(tokens) < n:
            tokens.append(pipeline.greedy(torch.tensor([tokens[-1]]), len(ids) + len(tokens) - 1))
        return tokens

    assert greedy(split) == greedy(whole)
    split.reset()
    whole.reset()
    got, want = split.forward(ids, 0, all_logits=True), whole.forward(ids, 0, all_logits=True)
    assert (got - want).abs().max().item() < 1e-4


def test_a_peer_without_the_keys_is_refused_and_the_stage_goes_on(runtime):
    start, context = runtime
    daemon, stage = start()

    def ask_as(keys: ClientKeys | None) -> bytes | None:
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        if keys is not None:
            secure_client(sock, keys)
        sock.connect(daemon.endpoint)
        try:
            sock.send(b"\x81\xa2op\xa4ping")  # {"op": "ping"}: refused or not, never answered without keys
            return sock.recv() if sock.poll(REFUSED_MS) else None
        finally:
            sock.close()

    assert ask_as(None) is None
    server_public = daemon._keys.server_public
    assert ask_as(ClientKeys(KeyPair.generate(), server_public)) is None  # keys of its own: not admitted
    x = torch.randn(3, 256)
    assert torch.equal(stage.forward(x, 0), x) and daemon.alive()


def test_a_shared_memory_reference_over_tcp_is_refused(runtime):
    start, _ = runtime
    _, stage = start()
    message = {"op": "forward", "base_pos": 0, "n": 1, "want": "activation",
               "input": {"shm": 1, "dtype": "float32", "shape": [1, 4]}}
    with pytest.raises(IpcError, match="shared-memory reference came over a TCP link"):
        stage.request(message)
    assert torch.equal(stage.forward(torch.ones(2, 4), 0), torch.ones(2, 4))


def test_a_stalled_daemon_over_tcp_is_caught_by_its_heartbeat(runtime):
    start, _ = runtime
    daemon, stage = start(timeouts=Timeouts(ready=120, request=60, heartbeat=1.5, stop=5))
    assert stage.request({"op": "ping"})[0]["ok"]
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StageDied, match="stopped answering"):
            stage.request({"op": "ping"})
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


def test_a_local_copy_that_is_not_the_coordinators_model_is_refused(runtime, demo, tmp_path):
    path, cfg, identity = demo
    data = bytearray(Path(path).read_bytes())
    at = data.index(b"Smollm2 135M")  # general.name: the copy still parses, its header differs
    data[at] = ord("s")
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(bytes(data))
    start, _ = runtime
    with pytest.raises(ConfigError, match=rf"model: {copy} is not the coordinator's {Path(path).name} .*"
                                          r"copy the same file there"):
        start(copy, identity, (ShardSpec("cpu:0", 0, 15, 30),), span=LayerSpan.of(15, 30, cfg.n_layers), cfg=cfg)
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ConfigError, match=rf"model: cannot open '{missing}'"):
        start(missing, identity, (ShardSpec("cpu:0", 0, 15, 30),), span=LayerSpan.of(15, 30, cfg.n_layers), cfg=cfg)


def test_the_daemon_reads_its_keys_from_nothing_but_its_spec():
    # the spec travels in the daemon's arguments: only the coordinator's public key may be there
    runtime_dir = make_runtime_dir()
    daemon = DaemonProcess(label="spec", backend="cpu", python=None, child_env={}, runtime_dir=runtime_dir, index=1,
                           shared_bytes=0, model=None, identity={"file": "echo"}, shards=(), max_ctx=CTX, transport="tcp")
    try:
        daemon.ready(60)
        with open(f"/proc/{daemon.pid}/cmdline", "rb") as f:
            argv = f.read()
        assert daemon._client.public in argv and daemon._client.secret not in argv
        assert daemon._keys.server_public not in argv  # the daemon made its pair itself
    finally:
        daemon.stop(TIMEOUTS)
        remove_runtime_dir(runtime_dir)
