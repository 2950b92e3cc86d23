"""The split across real processes: same numbers as one process, pinned environments, and
failure handling with nothing left behind."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from shardrt.config import LaunchConfig
from shardrt.errors import ConfigError
from shardrt.launch import Cluster
from shardrt.pipeline import Pipeline
from shardrt.placement import parse_devices, plan_processes
from shardrt.stage import Stage

PROMPT = "Once upon a time, in a small village by the sea, there lived"
GREEDY = 16
MAX_CTX = 256
EXIT_WAIT = 5.0  # the bound for noticing a dead daemon or coordinator
START_WAIT = 120.0


def launch_config(devices: str, **kw) -> LaunchConfig:
    return LaunchConfig(devices=parse_devices(devices), max_ctx=MAX_CTX, **kw)


def greedy(pipeline: Pipeline, ids: list[int], n: int) -> list[int]:
    pipeline.reset()
    tokens = [pipeline.greedy(torch.tensor(ids), 0)]
    for _ in range(n - 1):
        tokens.append(pipeline.greedy(torch.tensor([tokens[-1]]), len(ids) + len(tokens) - 1))
    return tokens


@pytest.fixture(scope="module")
def reference(demo_model, demo_tokenizer):
    ids = demo_tokenizer.encode(PROMPT)
    one = Pipeline([Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX)])
    logits = one.forward(torch.tensor(ids), 0, all_logits=True)
    return ids, logits, greedy(one, ids, GREEDY)


def shm_segments(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"shardrt-{pid}-")]


def test_three_processes_equal_one(demo_model, reference):
    ids, logits, tokens = reference
    with Cluster(launch_config("cpu:0,cpu:1,cpu:2"), demo_model) as cluster:
        assert len(cluster.daemons) == 2 and all(d.alive() for d in cluster.daemons)
        pids = {d.pid for d in cluster.daemons}
        assert len(pids | {os.getpid()}) == 3
        segments = shm_segments(os.getpid())
        assert len(segments) == 2
        assert all(os.stat(f"/dev/shm/{s}").st_mode & 0o777 == 0o600 for s in segments)
        runtime_dir = cluster.runtime_dir
        assert runtime_dir.stat().st_mode & 0o777 == 0o700
        got = cluster.pipeline.forward(torch.tensor(ids), 0, all_logits=True)
        assert got.shape == logits.shape
        assert (got - logits).abs().max().item() < 1e-4
        assert greedy(cluster.pipeline, ids, GREEDY) == tokens
        hello = cluster.remote[-1].hello
        assert hello["layers"] == [20, 30] and hello["backend"] == "cpu" and hello["pid"] in pids
        stats = cluster.remote[0].stats()
        assert stats["forwards"] >= GREEDY and "span cover" in stats["cover"][0]
    assert shm_segments(os.getpid()) == []
    assert not runtime_dir.exists()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


@pytest.mark.parametrize("isolate,all_daemons,n_daemons,n_local", [
    (False, False, 0, 3),  # one backend group, the first device's: all in-process
    (False, True, 1, 0),  # one daemon holding all three cpu stages
    (True, True, 3, 0),  # the coordinator holds no device
])
def test_process_layouts_give_the_same_tokens(demo_model, reference, isolate, all_daemons, n_daemons, n_local):
    ids, logits, tokens = reference
    config = launch_config("cpu:0,cpu:1,cpu:2", isolate_gpus=isolate, all_daemons=all_daemons)
    with Cluster(config, demo_model) as cluster:
        assert len(cluster.daemons) == n_daemons
        assert sum(isinstance(s, Stage) for s in cluster.pipeline.stages) == n_local
        got = cluster.pipeline.forward(torch.tensor(ids), 0, all_logits=True)
        assert (got - logits).abs().max().item() < 1e-4
        assert greedy(cluster.pipeline, ids, GREEDY) == tokens


def test_grouped_gpu_daemon_is_pinned_and_remapped(demo_model):
    """hip:1,hip:2 in one daemon: both variables pinned to 1,2, local ids 0,1; this CPU-only
    torch is refused with a message that says what to set; the parent's environment is untouched."""
    before = dict(os.environ)
    config = launch_config("cpu:0,hip:1,hip:2", isolate_gpus=False)
    (coordinator, daemon) = plan_processes(config.devices, isolate_gpus=False)
    assert daemon.child_env() == {"HIP_VISIBLE_DEVICES": "1,2", "ROCR_VISIBLE_DEVICES": "1,2"}
    with pytest.raises(ConfigError) as refused:
        with Cluster(config, demo_model):
            pass
    message = str(refused.value)
    assert "daemon 1 (hip:1,hip:2)" in message and "not a ROCm build" in message and "backends.hip.python" in message
    reply = refused.value.reply
    assert reply["visible_env"] == {"HIP_VISIBLE_DEVICES": "1,2", "ROCR_VISIBLE_DEVICES": "1,2"}
    assert reply["devices"] == ["hip:1", "hip:2"] and reply["local_devices"] == [0, 1]
    assert dict(os.environ) == before
    assert shm_segments(os.getpid()) == []


def test_cuda_daemon_pins_cuda_visible_devices(demo_model):
    """cuda:3 in a daemon: CUDA_VISIBLE_DEVICES=3, local id 0. Refused on a box without that GPU: a
    CPU-only torch says which interpreter to set, a CUDA torch that sees no device says so."""
    if torch.cuda.device_count() > 3:
        pytest.skip("this box has a cuda:3: the daemon would load")
    with pytest.raises(ConfigError) as refused:
        with Cluster(launch_config("cpu:0,cuda:3"), demo_model):
            pass
    message = str(refused.value)
    if torch.version.cuda is None:
        assert "not a CUDA build" in message and "backends.cuda.python" in message
    else:
        assert "torch sees 0 devices with CUDA_VISIBLE_DEVICES=3" in message and "shardrt devices" in message
    assert refused.value.reply["visible_env"] == {"CUDA_VISIBLE_DEVICES": "3"}
    assert refused.value.reply["local_devices"] == [0]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] != "3"


# -- the CLI as a process: failures, signals, leftovers ---------------------------------------


class Launch:
    """`shardrt launch` in a subprocess, with its output read by threads so waits can time out."""

    def __init__(self, demo_model: Path, tmp_path: Path, *args: str, env: dict | None = None):
        self.tmp = tmp_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardrt.cli", "launch", "-v", "--model", str(demo_model), "--target-gpus",
             "cpu:0,cpu:1,cpu:2", "-p", PROMPT, "-n", "3000", "--max-ctx", "4096", "--ignore-eos", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, "TMPDIR": str(tmp_path), "XDG_RUNTIME_DIR": "", **(env or {})},
            # Ctrl-C as at a terminal: a shell starts background jobs with SIGINT ignored, and a
            # process keeps an ignored SIGINT (Python then installs no KeyboardInterrupt)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.err_lines: queue.Queue = queue.Queue()
        self.out_chunks: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err_lines, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.out_chunks, False), daemon=True).start()

    def _pump(self, stream, into: queue.Queue, lines: bool) -> None:
        for chunk in (iter(stream.readline, "") if lines else iter(lambda: stream.read(1), "")):
            into.put(chunk)
        into.put(None)

    def daemon_pids(self) -> dict[int, int]:
        pids, deadline = {}, time.monotonic() + START_WAIT
        while len(pids) < 2:
            line = self.err_lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "launch ended before starting its daemons:\n" + "".join(self.stderr)
            self.stderr.append(line)
            m = re.search(r"started daemon (\d) \(cpu:\d\) as pid (\d+)", line)
            if m:
                pids[int(m.group(1))] = int(m.group(2))
        return pids

    def wait_generating(self, chars: int = 80) -> None:
        """Until the prompt and some generated text have been printed."""
        seen, deadline = 0, time.monotonic() + START_WAIT
        while seen < len(PROMPT) + chars:
            assert self.out_chunks.get(timeout=max(0.1, deadline - time.monotonic())) is not None
            seen += 1

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # say what it was doing: its log so far
            while not self.err_lines.empty() and (line := self.err_lines.get_nowait()) is not None:
                self.stderr.append(line)
            raise AssertionError(f"launch still running {timeout:.0f}s on; its stderr:\n" + "".join(self.stderr)) from None
        while (line := self.err_lines.get(timeout=timeout)) is not None:
            self.stderr.append(line)
        return code, "".join(self.stderr)

    def leftovers(self, daemon_pids) -> list[str]:
        left = [f"pid {p}" for p in daemon_pids if _running(p)]
        left += [f"/dev/shm/{s}" for s in shm_segments(self.proc.pid)]
        left += [str(p) for p in self.tmp.glob("shardrt-*")]
        return left

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=EXIT_WAIT)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids, timeout: float) -> list[int]:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_daemon_killed_mid_generation_fails_fast_and_cleanly(demo_model, tmp_path):
    run = Launch(demo_model, tmp_path)
    try:
        pids = run.daemon_pids()
        run.wait_generating()
        os.kill(pids[2], signal.SIGKILL)
        killed_at = time.monotonic()
        code, stderr = run.finish(timeout=30)
        noticed = time.monotonic() - killed_at
        assert code == 2, stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("shardrt: error:") and "daemon 2 (cpu:2)" in last and "SIGKILL" in last, last
        assert "Traceback" not in stderr
        assert noticed < EXIT_WAIT  # the error, and the orderly stop of daemon 1, within the bound
        assert run.leftovers(pids.values()) == []
    finally:
        run.kill()


def test_coordinator_killed_takes_its_daemons_along(demo_model, tmp_path):
    run = Launch(demo_model, tmp_path)
    try:
        pids = run.daemon_pids()
        run.wait_generating()
        run.proc.kill()
        run.proc.wait(timeout=EXIT_WAIT)
        assert _wait_gone(pids.values(), EXIT_WAIT) == []
        assert run.leftovers(pids.values()) == []
    finally:
        run.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_leave_nothing_behind(demo_model, tmp_path, sig):
    run = Launch(demo_model, tmp_path)
    try:
        pids = run.daemon_pids()
        run.wait_generating()
        run.proc.send_signal(sig)
        code, stderr = run.finish(timeout=30)
        assert code == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
        assert run.leftovers(pids.values()) == []
    finally:
        run.kill()


def test_stopped_daemon_is_noticed_within_the_heartbeat_timeout(demo_model, tmp_path):
    run = Launch(demo_model, tmp_path, env={"SHARDRT_HEARTBEAT_TIMEOUT": "2"})
    pids = {}
    try:
        pids = run.daemon_pids()
        run.wait_generating()
        os.kill(pids[1], signal.SIGSTOP)
        stopped_at = time.monotonic()
        code, stderr = run.finish(timeout=40)
        assert code == 2 and "daemon 1 (cpu:1)" in stderr and "stopped answering" in stderr, stderr
        assert run.leftovers(pids.values()) == []
        assert time.monotonic() - stopped_at < 30
    finally:
        for pid in pids.values():
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        run.kill()


def test_cli_refuses_a_backend_this_machine_lacks(demo_model, tmp_path):
    done = subprocess.run([sys.executable, "-m", "shardrt.cli", "launch", "--model", str(demo_model),
                           "--target-gpus", "cpu:0,hip:0", "-p", "hi", "-n", "2"], capture_output=True, text=True,
                          timeout=START_WAIT, env={**os.environ, "TMPDIR": str(tmp_path), "XDG_RUNTIME_DIR": ""},
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a ROCm build" in lines[0] and "Traceback" not in done.stderr
    assert list(tmp_path.glob("shardrt-*")) == []
