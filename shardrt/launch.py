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
from .gguf_loader import LayerSpan, StageWeights, device_weight_bytes
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
    weight_bytes: int  # in the file
    device_bytes: int  # on the device: quantized blocks as stored, or dequantized to the compute dtype
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
        gpu = shard.device.is_gpu
        dtype_bytes = {"float32": 4, "auto": 2 if gpu else 4}.get(config.dtype, 2)
        device_bytes = device_weight_bytes(gguf, weights.names, dtype_bytes, gpu and config.weights == "quantized")
        rows.append(ShardRow(shard, by_index[shard.process], span, weights.cover.covered_bytes, device_bytes,
                             str(weights.cover)))
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
        self.drafter, self.ring, self.prefix_cache = None, None, None
        self.draft_tokens = config.draft.tokens if config.draft is not None else 4

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

        runs = _runs(self.rows)
        # daemons first, so they load their weights while the coordinator loads its own
        daemons = {i: self._start_daemon(run[0].process, run, self.model_path, identity, shared)
                   for i, run in enumerate(runs) if not run[0].process.in_process}
        stages = []
        for i, run in enumerate(runs):
            if i in daemons:
                span = LayerSpan(run[0].shard.start, run[-1].shard.stop, run[0].span.embed, run[-1].span.head)
                stages.append(self._connect(daemons[i], identity, span, cfg, f"layers {span}"))
                continue
            for row in run:
                device = row.shard.device.torch_device()
                stages.append(Stage(self.model_path, row.shard.start, row.shard.stop, device,
                                    max_ctx=self.config.max_ctx, dtype=compute_dtype(self.config.dtype, device),
                                    graphs=self.config.graphs, quantized=self.config.weights == "quantized"))
        self.pipeline = Pipeline(stages)
        self._start_spec(shared)

    def _start_spec(self, shared: int) -> None:
        """The prefix cache, and the drafter with what it needs (its daemon, the feature ring)."""
        from .spec.drafters import CaptureDrafter, ModelDrafter, NgramDrafter
        from .spec.feature_ring import FeatureRing
        from .spec.prefix_cache import PrefixCache

        self.prefix_cache = PrefixCache(self.pipeline, self.config.prefix_cache_slots)
        draft = self.config.draft
        if draft is None:
            return
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
                        draft_tokens=self.draft_tokens, prefix_cache=self.prefix_cache,
                        ring=self.ring, cancelled=cancelled)

    def _start_draft_daemon(self, draft, shared: int) -> Pipeline:
        check_same_vocabulary(self.model_path, draft.model)
        with GGUFFile(draft.model) as gguf:
            draft_cfg = ModelConfig.from_gguf(gguf)
            (row,) = plan_rows(LaunchConfig(devices=(draft.device or DeviceSpec("cpu", 0),)), gguf, draft_cfg)
        device = row.shard.device
        process = ProcessPlan(DRAFT_PROCESS, device.backend, (device,))
        identity = model_identity(draft.model, draft_cfg)
        daemon = self._start_daemon(process, [row], draft.model, identity,
                                    self.config.shared_bytes or auto_shared_bytes(draft_cfg),
                                    label=f"draft daemon ({device})")
        stage = self._connect(daemon, identity, row.span, draft_cfg, f"draft layers {row.span}")
        return Pipeline([stage])

    def _start_daemon(self, process: ProcessPlan, run: list[ShardRow], model: Path, identity: dict,
                      shared: int, label: str | None = None) -> DaemonProcess:
        if self.runtime_dir is None:
            self.runtime_dir = make_runtime_dir()
        shards = tuple(ShardSpec(str(r.shard.device), process.local_index(r.shard.device), r.shard.start, r.shard.stop)
                       for r in run)
        daemon = DaemonProcess(
            label=label or f"{process.label} ({','.join(str(d) for d in process.devices)})", backend=process.backend,
            python=self.config.pythons.get(process.backend), child_env=process.child_env(),
            runtime_dir=self.runtime_dir, index=process.index, shared_bytes=shared, model=str(model.resolve()),
            identity=identity, shards=shards, max_ctx=self.config.max_ctx, dtype=self.config.dtype,
            graphs=self.config.graphs, weights=self.config.weights,
        )
        self.daemons.append(daemon)
        log.info("started %s as pid %d with %s", daemon.label, daemon.pid, process.child_env() or "no pinning")
        return daemon

    def _connect(self, daemon: DaemonProcess, identity: dict, span: LayerSpan, cfg: ModelConfig, layers: str):
        import zmq

        from .remote_stage import RemoteStage

        if self._context is None:
            self._context = zmq.Context()
        stage = RemoteStage(daemon, self._context, self.timeouts, identity, span, cfg, self.config.max_ctx,
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
