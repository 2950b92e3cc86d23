"""The inside of a target-shard daemon: its spec, its backend check, and the request loop.

A daemon is exec'd by the coordinator (`python -m shardrt.daemons.target_shard SPEC`), binds
a ZeroMQ ROUTER, checks that its torch build fits its backend and that its copy of the model is
the coordinator's, loads its stages, and serves the protocol until told to shut down or until
its coordinator dies (EOF on the death pipe).

On one box it shares a memory segment with the coordinator and binds an ipc:// socket. With
`transport: tcp` (a daemon on another host) it binds TCP with CurveZMQ instead, admitting only
the coordinator's public key, and reports where it listens, with its own public key, as one JSON
line on its ready pipe.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__
from .errors import ConfigError, ShardrtError
from .gguf_loader import LayerSpan
from .ipc.codec import decode, encode, ref_tensor, tensor_ref
from .ipc.curve import CurveServer, public_key
from .ipc.doorbell import DaemonDoorbell, spin_seconds
from .ipc.protocol import PROTOCOL_VERSION, ProtocolError, check_request, error_reply
from .ipc.link import TcpLink
from .ipc.shm import SharedSegment
from .placement import parse_device

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 0.2
RECENT_REQUESTS = 4096  # per-forward handling times kept for the `stats` reply
EXIT_BACKEND_MISMATCH = 3
PINNED_ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
DEATH_FD_ENV, READY_FD_ENV = "SHARDRT_DEATH_FD", "SHARDRT_READY_FD"


@dataclass(frozen=True)
class ShardSpec:
    device: str  # as the user named it, e.g. "hip:1"
    local_index: int  # the device's id in this daemon's pinned view
    start: int
    stop: int


@dataclass(frozen=True)
class DaemonSpec:
    label: str
    backend: str
    endpoint: str
    shm_name: str
    model: str | None  # None: echo mode, no model (IPC benchmarks)
    identity: dict
    shards: tuple[ShardSpec, ...]
    max_ctx: int
    death_fd: int  # -1: in SHARDRT_DEATH_FD (a daemon started by a cluster actor, which makes the pipes)
    dtype: str = "auto"
    graphs: bool = True
    weights: str = "auto"
    max_seqs: int = 1
    max_prefill: int = 1024  # tokens a GPU stage prefills at once (stage.prefill_buckets)
    threads: int | None = None  # torch's CPU threads (launch.cpu_threads); None: its default
    transport: str = "ipc"  # or "tcp": endpoint, shm_name unused; bind_host, client_key, ready_fd used
    bind_host: str = "127.0.0.1"
    client_key: str = ""  # the coordinator's CurveZMQ public key (Z85)
    ready_fd: int = -1  # where a tcp daemon writes {"endpoint", "beat_endpoint", "server_key"}; -1: SHARDRT_READY_FD
    host: str = ""  # the host it runs on, as the placement names it ("" for the coordinator's)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "DaemonSpec":
        raw = json.loads(text)
        raw["shards"] = tuple(ShardSpec(**s) for s in raw["shards"])
        return cls(**raw)


def check_backend(spec: DaemonSpec) -> None:
    """Refuse to load anything when this interpreter's torch cannot drive the backend."""
    if spec.backend == "cpu":
        return
    devices = ",".join(s.device for s in spec.shards)
    build = f"torch {torch.__version__} (torch.version.cuda={torch.version.cuda}, torch.version.hip={torch.version.hip})"
    wanted = {"cuda": ("a CUDA", torch.version.cuda), "hip": ("a ROCm", torch.version.hip)}[spec.backend]
    if wanted[1] is None:
        raise ConfigError(
            f"backend {spec.backend} for {devices}: this interpreter ({sys.executable}) has {build}, not {wanted[0]} "
            f"build; set backends.{spec.backend}.python in the placement file to an interpreter that has one"
        )
    visible = torch.cuda.device_count()
    if visible < len(spec.shards):
        pinned = ", ".join(f"{k}={os.environ[k]}" for k in PINNED_ENV_KEYS if k in os.environ)
        raise ConfigError(f"backend {spec.backend} for {devices}: torch sees {visible} devices with {pinned or 'no pinning'}; "
                          f"{len(spec.shards)} needed; check the device indices with `shardrt devices`")


class EchoStage:
    """Stands in for a model in echo mode: returns its input, for measuring the hop alone."""

    length = 0
    span = LayerSpan(0, 0, embed=False, head=False)  # no layers: no early exit, no head, any input
    cfg = None

    def __init__(self):
        self.snapshots: set[int] = set()

    def run(self, x, base_pos, **_):
        return x, []

    def run_batch(self, x, seqs, positions, **_):
        return x

    def truncate(self, n, seq=0):
        pass

    def reset(self, seq=None):
        pass

    # KV snapshots of an empty cache, so echo mode answers these ops as a stage would
    def kv_snapshot(self, slot, seq=0):
        self.snapshots.add(slot)
        return 0

    def kv_restore(self, slot, seq=0):
        if slot not in self.snapshots:
            raise ConfigError(f"kv_restore: slot {slot} holds no snapshot")
        return 0

    def kv_free(self, slot):
        if slot not in self.snapshots:
            raise ConfigError(f"kv_free: slot {slot} holds no snapshot")
        self.snapshots.remove(slot)


class ShardServer:
    """Answers protocol requests for this daemon's consecutive stages."""

    def __init__(self, spec: DaemonSpec, segment: SharedSegment, stages: list):
        self.spec, self.segment, self.stages = spec, segment, stages
        self.forwards, self.forward_seconds = 0, 0.0
        self.request_seconds = 0.0  # forwards from taking the request to sending the reply
        self.recent_requests = collections.deque(maxlen=RECENT_REQUESTS)  # the same, per forward, in µs
        self.started = time.time()

    def hello_reply(self) -> dict:
        shards = self.spec.shards
        return {
            "version": PROTOCOL_VERSION,
            "model": self.spec.identity,
            "layers": [shards[0].start, shards[-1].stop] if shards else [0, 0],
            "backend": self.spec.backend,
            "devices": [s.device for s in shards],
            "local_devices": [s.local_index for s in shards],
            "visible_env": {k: os.environ[k] for k in PINNED_ENV_KEYS if k in os.environ},
            "pid": os.getpid(),
            "python": sys.executable,
            "shardrt": __version__,
            "torch": torch.__version__,
            "cover": [str(s.cover) for s in self.stages if hasattr(s, "cover")],
            "kernels": [s.kernels_line() for s in self.stages if hasattr(s, "kernels_line")],
            "max_prefill": self.spec.max_prefill,
            "rss_bytes": _rss(),
        }

    def handle(self, message: dict, frames: list) -> tuple[dict, list, bool]:
        """Reply, payload frames, and whether to stop after sending."""
        op = check_request(message)
        rid = message["id"]
        if op == "hello":
            if message["version"] != PROTOCOL_VERSION:
                raise ProtocolError("version_mismatch",
                                    f"hello.version: {message['version']} but this daemon speaks {PROTOCOL_VERSION}")
            if message["model"] != self.spec.identity:
                raise ProtocolError("model_mismatch", f"hello.model: {message['model']} but this daemon holds {self.spec.identity}")
            return {"id": rid, "ok": True, **self.hello_reply()}, [], False
        if op == "forward":
            return self._forward(message, frames)
        if op == "forward_batch":
            return self._forward_batch(message, frames)
        if op == "project":
            return self._project(message, frames)
        if op == "score_prompt":
            return self._score_prompt(message, frames)
        seq = message.get("seq")
        if op == "kv_truncate":
            for stage in self.stages:
                stage.truncate(message["n"], seq or 0)
            return {"id": rid, "ok": True}, [], False
        if op == "kv_copy":
            counts = [stage.kv_copy(message["src_seq"], seq or 0, message["n"]) for stage in self.stages]
            return {"id": rid, "ok": True, "length": counts[-1]}, [], False
        if op in ("kv_snapshot", "kv_restore"):
            counts = [getattr(stage, op)(message["slot"], seq or 0) for stage in self.stages]
            return {"id": rid, "ok": True, "length": counts[-1]}, [], False
        if op == "kv_free":
            for stage in self.stages:
                stage.kv_free(message["slot"])
            return {"id": rid, "ok": True, "length": None}, [], False
        if op == "reset":
            for stage in self.stages:
                stage.reset(seq)
            return {"id": rid, "ok": True}, [], False
        if op == "stats":
            return {"id": rid, "ok": True, "forwards": self.forwards, "forward_seconds": self.forward_seconds,
                    "request_seconds": self.request_seconds, "recent_request_us": list(self.recent_requests),
                    "length": self.stages[-1].length if self.stages else 0, "rss_bytes": _rss(),
                    "cover": [str(s.cover) for s in self.stages if hasattr(s, "cover")],
                    "stages": [s.stats() for s in self.stages if hasattr(s, "stats")]}, [], False
        if op == "ping":
            return {"id": rid, "ok": True, "pid": os.getpid()}, [], False
        return {"id": rid, "ok": True}, [], True  # shutdown

    def _input(self, message: dict, frames: list) -> torch.Tensor:
        # a view of the IN slot: the coordinator writes it again only after this request's reply
        return ref_tensor(message["input"], frames, f"{message['op']}.input", self.segment, SharedSegment.IN, copy=False)

    def _reply_tensors(self, rid: int, out: torch.Tensor | None, captured: list) -> tuple[dict, list]:
        """The output (if any) and capture slices, in the OUT slot when they all fit, else as frames."""
        if out is not None and not captured and self.segment.fits(out):  # the decode step's case
            ref = tensor_ref(out, shm=rid, offset=0)
            self.segment.write(SharedSegment.OUT, rid, out)
            return {"id": rid, "ok": True, "output": ref}, []
        tensors = ([out] if out is not None else []) + [c.data for c in captured]
        refs = []
        if self.segment.fits(*tensors):  # straight from the device into the slot
            offset = 0
            for t in tensors:
                refs.append(tensor_ref(t, shm=rid, offset=offset))
                offset = self.segment.write(SharedSegment.OUT, rid, t, offset)
            payloads = []
        else:
            payloads = [t.cpu() for t in tensors]
            refs = [tensor_ref(t, frame=i + 1) for i, t in enumerate(payloads)]
        reply = {"id": rid, "ok": True}
        if out is not None:
            reply["output"], refs = refs[0], refs[1:]
        if captured:
            reply["captures"] = [{"layer": c.layer, "start": c.start, **ref} for c, ref in zip(captured, refs)]
        return reply, payloads

    def _project(self, message: dict, frames: list) -> tuple[dict, list, bool]:
        last = self.stages[-1]
        if not last.span.head:
            raise ProtocolError("bad_request", "project: this daemon does not hold the head")
        x = self._input(message, frames)
        if x.dim() != 2 or x.shape[0] != message["n"] or x.shape[1] != last.cfg.dim:
            raise ProtocolError("bad_request", f"project.input: expected [{message['n']}, {last.cfg.dim}], got {list(x.shape)}")
        logits = last.project(x)
        if message["want"] == "argmax":
            return {"id": message["id"], "ok": True, "tokens": logits.argmax(-1).tolist()}, [], False
        reply, payloads = self._reply_tensors(message["id"], logits, [])
        return reply, payloads, False

    def _score_prompt(self, message: dict, frames: list) -> tuple[dict, list, bool]:
        """PFlash: prefill a prompt into the drafter's one stage and score its tokens (attention_scores.py)."""
        from .attention_scores import score_prompt

        if len(self.stages) != 1 or not self.stages[0].span.embed:
            raise ProtocolError("bad_request", "score_prompt: this daemon does not hold a whole model in one stage")
        stage = self.stages[0]
        x = self._input(message, frames)
        if x.dtype != torch.int64 or x.dim() != 1 or x.shape[0] != message["n"]:
            raise ProtocolError("bad_request", f"score_prompt.input: expected int64 token ids [{message['n']}], got "
                                               f"{x.dtype} {list(x.shape)}")
        if stage.cfg is not None and (int(x.min()) < 0 or int(x.max()) >= stage.cfg.vocab_size):
            raise ProtocolError("bad_request", f"score_prompt.input: token ids outside 0..{stage.cfg.vocab_size - 1}")
        t0 = time.perf_counter()
        scores = score_prompt(stage, x, window=message["window"], skip=message["skip"], chunk=message["chunk"],
                              layers=message["layers"])
        reply, payloads = self._reply_tensors(message["id"], scores, [])
        reply["seconds"] = time.perf_counter() - t0
        return reply, payloads, False

    def _checked_input(self, message: dict, frames: list) -> torch.Tensor:
        """The input of a forward or forward_batch, checked against n and what the first stage takes."""
        op, n = message["op"], message["n"]
        if message["want"] == "argmax" and not self.stages[-1].span.head:  # refuse before the KV cache is written
            raise ProtocolError("bad_request", f"{op}.want: argmax needs the stage with the head")
        x = self._input(message, frames)
        shape = tuple(x.shape)
        if not shape or shape[0] != n:
            raise ProtocolError("bad_request", f"{op}.input: shape {list(shape)} does not have {op}.n={n} rows")
        first = self.stages[0]
        if first.span.embed:
            if x.dtype != torch.int64 or len(shape) != 1:
                raise ProtocolError("bad_request", f"{op}.input: the first stage takes int64 token ids [n], got {x.dtype} {list(shape)}")
        elif first.cfg is not None and (len(shape) != 2 or shape[1] != first.cfg.dim):
            raise ProtocolError("bad_request", f"{op}.input: expected an activation [n, {first.cfg.dim}], got {list(shape)}")
        return x

    def _forward_batch(self, message: dict, frames: list) -> tuple[dict, list, bool]:
        """Rows of several sequences (decode tokens, prompt chunks) through every stage of this
        daemon; the last returns the rows `outputs` (default all)."""
        x = self._checked_input(message, frames)
        seqs, positions, want, outputs = message["seqs"], message["positions"], message["want"], message.get("outputs")
        t0 = time.perf_counter()
        for i, stage in enumerate(self.stages):
            last = i == len(self.stages) - 1
            x = stage.run_batch(x, seqs, positions, tokens=last and want == "argmax", outputs=outputs if last else None)
        self.forwards += 1
        self.forward_seconds += time.perf_counter() - t0
        if want == "argmax":
            return {"id": message["id"], "ok": True, "tokens": x}, [], False
        reply, payloads = self._reply_tensors(message["id"], x, [])
        return reply, payloads, False

    def _forward(self, message: dict, frames: list) -> tuple[dict, list, bool]:
        rid, want, seq = message["id"], message["want"], message.get("seq", 0)
        x = self._checked_input(message, frames)
        capture, stop_after = tuple(message.get("capture", ())), message.get("stop_after")
        if stop_after is not None:
            if not any(stage.span.start <= stop_after < stage.span.stop for stage in self.stages):
                raise ProtocolError("bad_request", f"forward.stop_after: layer {stop_after} is not held by this daemon")
            if want == "argmax":
                raise ProtocolError("bad_request", "forward.want: argmax cannot go with stop_after")
        t0 = time.perf_counter()
        captured, tokens = [], None
        for i, stage in enumerate(self.stages):
            stops_here = stop_after is not None and stage.span.start <= stop_after < stage.span.stop
            last = i == len(self.stages) - 1
            all_logits = last and message.get("all_logits", False)
            if last and want == "argmax":
                tokens, caps = stage.run_argmax(x, message["base_pos"], all_logits=all_logits, capture=capture, seq=seq)
            else:
                x, caps = stage.run(x, message["base_pos"], all_logits=all_logits, capture=capture,
                                    stop_after=stop_after if stops_here else None, seq=seq)
            captured += caps
            if stops_here:
                break
        self.forwards += 1
        self.forward_seconds += time.perf_counter() - t0
        reply, payloads = self._reply_tensors(rid, None if want == "argmax" else x, captured)
        if tokens is not None:
            reply["tokens"] = tokens
        return reply, payloads, False


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _watch_parent(fd: int, on_gone) -> None:
    """Block on the death pipe; EOF (or any error) means the coordinator is gone."""
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    on_gone()


def serve(spec: DaemonSpec) -> int:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 1000)
    curve = None
    if spec.transport == "tcp":
        curve = CurveServer(ctx, public_key(spec.client_key, "spec.client_key"))
        curve.secure(sock)
        try:
            sock.bind(f"tcp://{spec.bind_host}:0")
        except zmq.ZMQError as exc:
            raise ConfigError(f"bind_host: cannot listen on {spec.bind_host!r}: {exc}") from None
        segment, beat_endpoint = TcpLink.daemon_side(ctx, curve, spec.bind_host)
        _report_ready(_fd(spec.ready_fd, READY_FD_ENV), {"endpoint": sock.getsockopt_string(zmq.LAST_ENDPOINT),
                                      "beat_endpoint": beat_endpoint, "server_key": curve.public.decode()})
    else:
        segment = SharedSegment(spec.shm_name)
        sock.bind(spec.endpoint)
    socket_path = spec.endpoint.removeprefix("ipc://") if spec.endpoint.startswith("ipc://") else None

    def cleanup_and_exit():
        # the coordinator is gone: nobody else will remove what we share with it
        segment.unlink()
        if socket_path:
            runtime_dir = os.path.dirname(socket_path)
            if os.path.basename(runtime_dir).startswith("shardrt-"):  # our private dir: sockets and logs
                shutil.rmtree(runtime_dir, ignore_errors=True)
        os._exit(0)

    threading.Thread(target=_watch_parent, args=(_fd(spec.death_fd, DEATH_FD_ENV), cleanup_and_exit), daemon=True).start()

    stopping = threading.Event()

    def heartbeat():
        while not stopping.is_set():
            segment.beat()
            stopping.wait(HEARTBEAT_SECONDS)

    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()

    refusal: tuple[str, ShardrtError] | None = None
    stages: list = []
    try:
        check_backend(spec)
    except ShardrtError as exc:
        refusal = ("backend_mismatch", exc)
    if refusal is None:
        try:
            check_model(spec)
        except ShardrtError as exc:
            refusal = ("model_differs", exc)
    if refusal is None:
        try:
            stages = load_stages(spec)
        except ShardrtError as exc:
            refusal = ("load_failed", exc)
    if refusal is not None:
        print(f"shardrt daemon {spec.label}: error: {refusal[1]}", file=sys.stderr, flush=True)
    if any(getattr(stage, "device", None) is not None and stage.device.type == "cuda" for stage in stages):
        segment.pin()  # activations go device <-> segment by DMA
    server = ShardServer(spec, segment, stages)

    spin_s = 0.0 if spec.transport == "tcp" else spin_seconds()  # over TCP there is no mailbox to spin on
    doorbell = DaemonDoorbell(segment, sock, spin_s)
    while True:
        body, peer = doorbell.next()
        if not body:
            continue
        taken = time.perf_counter()
        rid, stop, payloads, message = -1, False, [], {}
        try:
            message = decode(body)
            rid = message.get("id", -1)
            if message.get("op") == "nudge":  # the mailbox was rung while this daemon slept: look again
                continue
            if refusal is not None:
                # answer with what this daemon sees, so the coordinator can say why, then leave
                reply = error_reply(rid, refusal[0], str(refusal[1]))
                reply.update(server.hello_reply())
                reply["ok"], stop = False, True
            else:
                reply, payloads, stop = server.handle(message, body)
        except ProtocolError as exc:
            reply = error_reply(rid, exc.code, str(exc))
            if message.get("op") == "hello":  # what it runs, so the coordinator can say why they disagree
                reply.update({k: v for k, v in server.hello_reply().items() if k not in ("version", "model")})
        except ShardrtError as exc:
            reply = error_reply(rid, "stage_error", str(exc))
        except Exception as exc:  # a bug must not take the daemon down with the request
            log.exception("request %s failed", rid)
            reply = error_reply(rid, "internal", f"{type(exc).__name__}: {exc}")
        frames = encode(reply, payloads)
        # up to the send: the reader may run first
        if reply.get("ok") and message.get("op") in ("forward", "forward_batch"):
            elapsed = time.perf_counter() - taken
            server.request_seconds += elapsed
            server.recent_requests.append(round(elapsed * 1e6, 1))
        doorbell.reply(peer, reply["id"], frames)
        if stop:
            break
    stopping.set()
    beating.join(timeout=2 * HEARTBEAT_SECONDS + 1)  # its last beat done before the segment goes
    sock.close()
    segment.close()
    if curve is not None:
        curve.close()
    ctx.term()
    return EXIT_BACKEND_MISMATCH if refusal is not None else 0


def _fd(given: int, env: str) -> int:
    """A pipe the spec names, or (given -1) the one its starter put in `env`."""
    if given >= 0:
        return given
    raw = os.environ.get(env, "")
    if not raw.isdigit():
        raise ConfigError(f"{env}: {raw!r} is not a file descriptor")
    return int(raw)


def _report_ready(fd: int, where: dict) -> None:
    with os.fdopen(fd, "w") as ready:
        ready.write(json.dumps(where) + "\n")


def check_model(spec: DaemonSpec) -> None:
    """Refuse to load a local copy of the model that is not the coordinator's file (a daemon on
    another host maps its own copy): same size, same header, metadata and tensor table."""
    if spec.model is None:
        return
    from .gguf_file import model_identity

    where = f" on host {spec.host}" if spec.host else ""
    try:
        ours = model_identity(Path(spec.model))
    except ShardrtError as exc:
        raise ConfigError(f"{exc}{where}") from None
    theirs = spec.identity
    if any(ours.get(key) != theirs.get(key) for key in ("bytes", "header_sha256")):
        raise ConfigError(f"model: {spec.model}{where} is not the coordinator's {theirs.get('file')} "
                          f"({ours['bytes']} bytes, header sha256 {ours['header_sha256'][:12]}... vs {theirs.get('bytes')} "
                          f"bytes, {str(theirs.get('header_sha256'))[:12]}...); copy the same file there")


def load_stages(spec: DaemonSpec) -> list:
    if spec.model is None:
        return [EchoStage()]
    from .stage import Stage, compute_dtype

    if spec.threads:
        torch.set_num_threads(spec.threads)
    stages = []
    for shard in spec.shards:
        device = parse_device(shard.device).torch_device(shard.local_index)
        stages.append(Stage(Path(spec.model), shard.start, shard.stop, device, max_ctx=spec.max_ctx,
                            dtype=compute_dtype(spec.dtype, device), graphs=spec.graphs,
                            weights=spec.weights, max_seqs=spec.max_seqs, max_prefill=spec.max_prefill))
    return stages


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="shardrt daemon: %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if len(argv) != 1:
        print("usage: python -m shardrt.daemons.target_shard SPEC_JSON", file=sys.stderr)
        return 2
    try:
        spec = DaemonSpec.from_json(argv[0])
    except (ValueError, TypeError, KeyError) as exc:
        print(f"shardrt daemon: error: spec is malformed: {exc}", file=sys.stderr)
        return 2
    return serve(spec)
