"""From a `LaunchConfig` to running stages: plan the shards, load the in-process ones, exec
and handshake the daemons, and hand back a `Pipeline`. `Cluster` is a context manager: on
exit (normal, error, Ctrl-C, SIGTERM) every daemon, socket and segment is gone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .config import LaunchConfig
from .errors import ConfigError, ShardrtError
from .gguf_file import GGUFFile
from .gguf_loader import LayerSpan, StageWeights
from .lifecycle import DaemonProcess, Timeouts, make_runtime_dir, remove_runtime_dir
from .model import ModelConfig
from .pipeline import Pipeline
from .placement import DeviceSpec, ProcessPlan, Shard, plan_shards
from .worker import ShardSpec

log = logging.getLogger(__name__)

DRAFT_PROCESS = 99  # the draft daemon's index: its socket and log names in the runtime directory
SHM_TOKENS = 512  # activations of up to this many tokens ride in shared memory; more go as frames
SHM_FLOOR = 256 * 1024


@dataclass(frozen=True)
class ShardRow:
    """One line of `shardrt plan`."""

    shard: Shard
    process: ProcessPlan
    span: LayerSpan
    weight_bytes: int
    cover: str


def check_same_vocabulary(target: Path, draft: Path) -> None:
    """A draft proposes token ids; they mean the same only with the very same vocabulary."""
    with GGUFFile(target) as t, GGUFFile(draft) as d:
        ours, theirs = t.get("tokenizer.ggml.tokens"), d.get("tokenizer.ggml.tokens")
    if ours is None or theirs is None or ours != theirs:
        size = len(theirs) if theirs is not None else "no"
        raise ConfigError(f"--draft-model: {draft.name!r} has a different vocabulary ({size} tokens) from the target "
                          f"{target.name!r} ({len(ours) if ours is not None else 'no'} tokens); a draft must share it")


def model_identity(path: Path, cfg: ModelConfig) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "arch": cfg.arch, "layers": cfg.n_layers}


def auto_shared_bytes(cfg: ModelConfig) -> int:
    activation = cfg.dim * 4 * SHM_TOKENS
    logits_row = cfg.vocab_size * 4
    return 2 * max(activation, logits_row, SHM_FLOOR) + 4096


def plan_rows(config: LaunchConfig, gguf: GGUFFile, cfg: ModelConfig) -> list[ShardRow]:
    shards, processes = plan_shards(config.devices, cfg.n_layers, config.layer_split,
                                    config.isolate_gpus, config.all_daemons)
    by_index = {p.index: p for p in processes}
    rows = []
    for shard in shards:
        span = LayerSpan.of(shard.start, shard.stop, cfg.n_layers)
        weights = StageWeights(gguf, cfg, span, prefetch=False)
        rows.append(ShardRow(shard, by_index[shard.process], span, weights.cover.covered_bytes, str(weights.cover)))
    return rows


def _runs(rows: list[ShardRow]) -> list[list[ShardRow]]:
    """Consecutive rows held by one process: one stage handle each."""
    runs: list[list[ShardRow]] = []
    for row in rows:
        if runs and runs[-1][-1].process.index == row.process.index:
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


class Cluster:
    """The coordinator's stages, in-process and in daemons, for one launch."""

    def __init__(self, config: LaunchConfig, model_path: Path, timeouts: Timeouts | None = None):
        self.config, self.model_path = config, Path(model_path)
        self.timeouts = timeouts or Timeouts.from_env()
        self.daemons: list[DaemonProcess] = []
        self.remote: list = []
        self.runtime_dir: Path | None = None
        self._context = None
        self.pipeline: Pipeline | None = None

    def __enter__(self) -> "Cluster":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        from .stage import Stage, compute_dtype

        with GGUFFile(self.model_path) as gguf:
            cfg = ModelConfig.from_gguf(gguf)
            self.rows = plan_rows(self.config, gguf, cfg)
        self.cfg = cfg
        identity = model_identity(self.model_path, cfg)
        shared = self.config.shared_bytes or auto_shared_bytes(cfg)

        handles: list = []
        pending = []  # daemons are started first, so they load while the coordinator does
        for run in _runs(self.rows):
            process = run[0].process
            if process.in_process:
                handles.append(("local", run))
                continue
            daemon = self._start_daemon(process, run, shared, identity)
            handles.append(("remote", run, daemon))
            pending.append(daemon)

        stages = []
        for entry in handles:
            if entry[0] == "local":
                for row in entry[1]:
                    device = row.shard.device.torch_device()
                    stages.append(Stage(self.model_path, row.shard.start, row.shard.stop, device,
                                        max_ctx=self.config.max_ctx, dtype=compute_dtype(self.config.dtype, device)))
            else:
                stages.append(self._connect(entry[1], entry[2], identity))
        self.pipeline = Pipeline(stages)
        self._start_spec(shared)

    def _start_spec(self, shared: int) -> None:
        """The prefix cache, and the drafter with what it needs (its daemon, the feature ring)."""
        from .spec.drafters import CaptureDrafter, ModelDrafter, NgramDrafter
        from .spec.feature_ring import FeatureRing
        from .spec.prefix_cache import PrefixCache

        self.prefix_cache = PrefixCache(self.pipeline, self.config.prefix_cache_slots)
        self.ring, self.drafter = None, None
        draft = self.config.draft
        if draft is None:
            return
        self.draft_tokens = draft.tokens
        if draft.kind == "ngram":
            self.drafter = NgramDrafter()
        elif draft.kind == "capture":
            layers = draft.capture_layers or (2 * self.cfg.n_layers // 3,)
            bad = [layer for layer in layers if not 0 <= layer < self.cfg.n_layers]
            if bad:
                raise ConfigError(f"--capture-layers: layer {bad[0]} is outside the model's {self.cfg.n_layers} layers")
            self.ring = FeatureRing(layers, self.cfg.dim, capacity=self.config.max_ctx)
            self.drafter = CaptureDrafter(self.pipeline, self.ring, layers[-1])
        else:
            self.drafter = ModelDrafter(self._start_draft_daemon(draft, shared))

    def generate(self, tokenizer, prompt_ids: list[int], params, on_text=None, cancelled=None):
        """One request through this cluster, with its drafter, feature ring and prefix cache."""
        from .generate import generate

        return generate(self.pipeline, tokenizer, prompt_ids, params, on_text, drafter=self.drafter,
                        draft_tokens=getattr(self, "draft_tokens", 4), prefix_cache=self.prefix_cache,
                        ring=self.ring, cancelled=cancelled)

    def _start_draft_daemon(self, draft, shared: int) -> Pipeline:
        check_same_vocabulary(self.model_path, draft.model)
        with GGUFFile(draft.model) as gguf:
            draft_cfg = ModelConfig.from_gguf(gguf)
        device = draft.device or DeviceSpec("cpu", 0)
        process = ProcessPlan(DRAFT_PROCESS, device.backend, (device,))
        if self.runtime_dir is None:
            self.runtime_dir = make_runtime_dir()
        identity = model_identity(draft.model, draft_cfg)
        daemon = DaemonProcess(
            label=f"draft daemon ({device})", backend=device.backend, python=self.config.pythons.get(device.backend),
            child_env=process.child_env(), runtime_dir=self.runtime_dir, index=DRAFT_PROCESS,
            shared_bytes=self.config.shared_bytes or auto_shared_bytes(draft_cfg), model=str(draft.model.resolve()),
            identity=identity, shards=(ShardSpec(str(device), process.local_index(device), 0, draft_cfg.n_layers),),
            max_ctx=self.config.max_ctx, dtype=self.config.dtype,
        )
        self.daemons.append(daemon)
        log.info("started %s as pid %d with %s", daemon.label, daemon.pid, process.child_env() or "no pinning")
        import zmq

        from .remote_stage import RemoteStage

        if self._context is None:
            self._context = zmq.Context()
        stage = RemoteStage(daemon, self._context, self.timeouts, identity, LayerSpan.of(0, draft_cfg.n_layers,
                            draft_cfg.n_layers), draft_cfg, self.config.max_ctx,
                            description=f"stage {daemon.label}, draft layers [0,{draft_cfg.n_layers})")
        self.remote.append(stage)
        return Pipeline([stage])

    def _start_daemon(self, process: ProcessPlan, run: list[ShardRow], shared: int, identity: dict) -> DaemonProcess:
        if self.runtime_dir is None:
            self.runtime_dir = make_runtime_dir()
        shards = tuple(ShardSpec(str(r.shard.device), process.local_index(r.shard.device), r.shard.start, r.shard.stop)
                       for r in run)
        daemon = DaemonProcess(
            label=f"{process.label} ({','.join(str(d) for d in process.devices)})", backend=process.backend,
            python=self.config.pythons.get(process.backend), child_env=process.child_env(),
            runtime_dir=self.runtime_dir, index=process.index, shared_bytes=shared,
            model=str(self.model_path.resolve()), identity=identity, shards=shards, max_ctx=self.config.max_ctx,
            dtype=self.config.dtype,
        )
        self.daemons.append(daemon)
        log.info("started %s as pid %d with %s", daemon.label, daemon.pid, process.child_env() or "no pinning")
        return daemon

    def _connect(self, run: list[ShardRow], daemon: DaemonProcess, identity: dict):
        import zmq

        from .remote_stage import RemoteStage

        if self._context is None:
            self._context = zmq.Context()
        span = LayerSpan(run[0].shard.start, run[-1].shard.stop, run[0].span.embed, run[-1].span.head)
        layers = f"layers {span}"
        stage = RemoteStage(daemon, self._context, self.timeouts, identity, span, self.cfg, self.config.max_ctx,
                            description=f"stage {daemon.label}, {layers}")
        self.remote.append(stage)
        return stage

    def close(self) -> None:
        for stage in self.remote:
            try:
                stage.request({"op": "shutdown"}, timeout=self.timeouts.stop, heartbeat=False) \
                    if stage.daemon.alive() else None
            except ShardrtError:
                pass
            stage.close()
        for daemon in self.daemons:
            daemon.stop(self.timeouts)
        self.remote, self.daemons = [], []
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None
        if self.runtime_dir is not None:
            remove_runtime_dir(self.runtime_dir)
            self.runtime_dir = None
