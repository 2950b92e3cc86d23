"""From a `LaunchConfig` to running stages: plan the shards, load the in-process ones, exec
and handshake the daemons, and hand back a `Pipeline`. `Cluster` is a context manager: on
exit (normal, error, Ctrl-C, SIGTERM) every daemon, socket and segment is gone.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .config import LaunchConfig, check_hosts
from .errors import ConfigError, PlacementError, ShardrtError
from .gguf_file import GGUFFile
from .gguf_file import model_identity as gguf_model_identity
from .gguf_loader import LayerSpan, StageWeights
from .lifecycle import DaemonProcess, Timeouts, make_runtime_dir, remove_runtime_dir
from .memory import (CTX_STEP, MIN_AUTO_CTX, DeviceMemory, Need, auto_split, budgets, capacities, refusal,
                     shard_need)
from .memory import pools as memory_pools
from .model import ModelConfig
from .pipeline import Pipeline
from .placement import DeviceSpec, ProcessPlan, Shard, plan_shards
from .worker import ShardSpec

log = logging.getLogger(__name__)
_launches = itertools.count(1)

DRAFT_PROCESS = 99  # the draft daemon's index: its socket and log names in the runtime directory
PFLASH_PROCESS = 98  # the PFlash drafter daemon's
SHM_TOKENS = 512  # activations of up to this many tokens ride in shared memory; more go as frames
SHM_FLOOR = 256 * 1024


@dataclass(frozen=True)
class ShardRow:
    """One line of `shardrt plan`."""

    shard: Shard
    process: ProcessPlan
    span: LayerSpan
    weight_bytes: int  # in the file
    need: Need  # on the device: weights as they will sit there, KV cache, working memory, runtime
    cover: str

    @property
    def device_bytes(self) -> int:
        return self.need.weights


@dataclass(frozen=True)
class Placement:
    """The shards of a launch with what each needs and what its device offers."""

    config: LaunchConfig  # with --layer-split auto and --max-ctx auto resolved
    rows: list[ShardRow]
    memory: dict[str, DeviceMemory]  # by memory pool (a GPU's own, or "host")
    pools: dict[DeviceSpec, str]

    def refusal(self) -> str | None:
        return refusal(self.rows, self.memory, self.pools, self.config.weights)


def check_same_vocabulary(target: Path, draft: Path) -> None:
    """A draft proposes token ids; they mean the same only with the very same vocabulary."""
    with GGUFFile(target) as t, GGUFFile(draft) as d:
        ours, theirs = t.get("tokenizer.ggml.tokens"), d.get("tokenizer.ggml.tokens")
    if ours is None or theirs is None or ours != theirs:
        size = len(theirs) if theirs is not None else "no"
        raise ConfigError(f"--draft-model: {draft.name!r} has a different vocabulary ({size} tokens) from the target "
                          f"{target.name!r} ({len(ours) if ours is not None else 'no'} tokens); a draft must share it")


def model_identity(path: Path, cfg: ModelConfig) -> dict:
    return {**gguf_model_identity(path), "arch": cfg.arch, "layers": cfg.n_layers}


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
        need = shard_need(gguf, cfg, span, shard.device, config.dtype, config.weights, config.kv_tokens, config.seqs)
        rows.append(ShardRow(shard, by_index[shard.process], span, weights.cover.covered_bytes, need,
                             str(weights.cover)))
    return rows


def plan_placement(config: LaunchConfig, gguf: GGUFFile, cfg: ModelConfig, found: list) -> Placement:
    """Rows for `config`, with an auto split and an auto context chosen against the memory the
    devices in `found` (devices.discover) offer; `refusal()` says whether it fits. What devices on
    other hosts cannot have (the auto choices, no cluster) is refused first (config.check_hosts)."""
    check_hosts(config)
    cpu = DeviceSpec("cpu", 0)

    def placed(c: LaunchConfig) -> Placement | None:
        """c with an auto split resolved, or None when its devices cannot hold every layer."""
        pools, budget = memory_pools(c.devices, found), budgets(c.devices, found, c.reserve)
        if c.layer_split == "auto":
            caps = capacities(gguf, cfg, c.devices, budget, pools, c.dtype, c.weights, c.kv_tokens, c.seqs)
            if sum(int(x) for x in caps) < cfg.n_layers:
                return None
            c = replace(c, layer_split=auto_split(cfg.n_layers, caps, [d.is_gpu for d in c.devices]))
        return Placement(c, plan_rows(c, gguf, cfg), budget, pools)

    def fits(c: LaunchConfig) -> Placement | None:
        p = placed(c)
        if p is None and c.layer_split == "auto" and c.allow_cpu_overflow and cpu not in c.devices:
            p = placed(replace(c, devices=c.devices + (cpu,)))
        return p if p is not None and p.refusal() is None else None

    if config.max_ctx_auto:
        steps = sorted({*range(MIN_AUTO_CTX, cfg.context_length, CTX_STEP), cfg.context_length})
        low, high, best = 0, len(steps) - 1, None
        while low <= high:  # the largest context that fits
            mid = (low + high) // 2
            found_fit = fits(replace(config, max_ctx=steps[mid]))
            if found_fit is not None:
                best, low = found_fit, mid + 1
            else:
                high = mid - 1
        if best is None:
            p = placed(replace(config, max_ctx=steps[0]))
            reason = p.refusal() if p is not None else "the devices cannot hold every layer"
            raise PlacementError(f"--max-ctx auto: not even {steps[0]} tokens fit: {reason}")
        return best
    fit = fits(config)
    if fit is not None:
        return fit
    p = placed(config)
    if p is None and config.allow_cpu_overflow and cpu not in config.devices:
        p = placed(replace(config, devices=config.devices + (cpu,)))
    if p is not None:
        return p  # the caller refuses it with one line per device
    pools, budget = memory_pools(config.devices, found), budgets(config.devices, found, config.reserve)
    caps = capacities(gguf, cfg, config.devices, budget, pools, config.dtype, config.weights, config.kv_tokens,
                      config.seqs)
    held = ", ".join(f"{d} {c:.1f}" for d, c in zip(config.devices, caps))
    raise PlacementError(f"--layer-split auto: {','.join(map(str, config.devices))} hold {sum(int(c) for c in caps)} of "
                         f"the model's {cfg.n_layers} layers at max_ctx {config.max_ctx} ({held}); lower --max-ctx, "
                         + ("use --weights auto, " if config.weights == "dequantized" else "")
                         + "add a device, or --allow-cpu-overflow")


def cpu_threads(config: LaunchConfig, runs: list[list[ShardRow]]) -> int | None:
    """Threads for each process that holds CPU stages when they compute at once (a batch pipelined
    through them under serve): the host's cores shared out, rather than each taking them all and
    every one of them waiting on the others. None: torch's default (one sequence at a time, one
    such process, or OMP_NUM_THREADS set by the user)."""
    holders = sum(1 for run in runs if _holds_cpu(run))
    if config.seqs <= 1 or holders < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // holders)


def _holds_cpu(run: list[ShardRow]) -> bool:
    """Whether the run's process computes on this box's cores (a daemon on another host has its own)."""
    return any(not row.shard.device.is_gpu and not row.shard.device.remote for row in run)


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
        self.pflash = None  # pflash.Compressor: the PFlash drafter's daemon and tokenizer
        self.threads: int | None = None  # torch CPU threads per process holding CPU stages (cpu_threads)
        self._torch_threads: int | None = None  # this process's own before, while the Cluster changed it
        self.draft_tokens = config.draft.tokens if config.draft is not None else 4
        self.nodes: dict[str, str] = {}  # other host -> its Ray node id
        self.launch_id = f"{os.getpid()}-{next(_launches)}"  # names this launch's Ray actors

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

        from .devices import discover

        with GGUFFile(self.model_path) as gguf:
            cfg = ModelConfig.from_gguf(gguf)
            placement = plan_placement(self.config, gguf, cfg, discover(self.config.pythons))
        refused = placement.refusal()
        if refused:  # before any weight is read or any daemon started
            raise PlacementError(refused)
        self.config, self.rows, self.cfg = placement.config, placement.rows, cfg
        identity = model_identity(self.model_path, cfg)
        shared = self.config.shared_bytes or auto_shared_bytes(cfg)

        runs = _runs(self.rows)
        self.threads = cpu_threads(self.config, runs)
        self.nodes = self._find_hosts()  # before any daemon starts: an unknown host leaves nothing behind
        # the PFlash drafter first: a file that does not load is refused before anything else starts
        pflash = self._start_pflash_daemon(self.config.pflash) if self.config.pflash is not None else None
        # daemons first, so they load their weights while the coordinator loads its own
        daemons = {i: self._start_daemon(run[0].process, run, self.model_path, identity, shared)
                   for i, run in enumerate(runs) if not run[0].process.in_process}
        if self.threads and any(_holds_cpu(run) for run in runs if run[0].process.in_process):
            import torch

            self._torch_threads = torch.get_num_threads()  # given back on close
            torch.set_num_threads(self.threads)
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
                                    graphs=self.config.graphs, weights=self.config.weights,
                                    max_seqs=self.config.seqs))
        self.pipeline = Pipeline(stages)
        self._start_spec(shared)
        if pflash is not None:
            self._connect_pflash(*pflash)

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

    def generate(self, tokenizer, prompt_ids: list[int], params, on_text=None, cancelled=None, handover=None,
                 prompt=None):
        """One request through this cluster (sequence slot 0), with its drafter, feature ring and
        prefix cache; `handover` as in generate.generate. With PFlash and the prompt's text
        (`prompt`, a pflash.PromptText), the drafter compresses it first and the result says how."""
        from .generate import Generation, generate

        report = None
        if prompt is not None and self.pflash is not None:
            prompt_ids, report = self.pflash.compress(prompt, prompt_ids, tokenizer)
        result = generate(self.pipeline, tokenizer, prompt_ids, params, on_text, drafter=self.drafter,
                          draft_tokens=self.draft_tokens, prefix_cache=self.prefix_cache,
                          ring=self.ring, cancelled=cancelled, handover=handover)
        if report is not None and isinstance(result, Generation):
            result.pflash = report.to_json(result.prefill_seconds)
        return result

    def _start_pflash_daemon(self, pflash) -> tuple:
        """The PFlash drafter's daemon, holding every layer of it on its own device, pinned like
        any other; its KV cache holds the drafter's trained context (at most PFLASH_MAX_CTX). Its
        GGUF and tokenizer are read here first, so a file that does not load starts nothing."""
        from .pflash import PFLASH_MAX_CTX, PFLASH_PREFILL
        from .tokenizer import Tokenizer

        try:
            with GGUFFile(pflash.model) as gguf:
                cfg = ModelConfig.from_gguf(gguf)
                device = pflash.device or DeviceSpec("cpu", 0)
                (row,) = plan_rows(LaunchConfig(devices=(device,), dtype=self.config.dtype, weights=self.config.weights),
                                   gguf, cfg)
            tokenizer = Tokenizer(pflash.model)  # the drafter's own: the boundary with the target is text
        except ShardrtError as exc:
            raise ConfigError(f"pflash.model: {pflash.model.name!r} does not load as a drafter: {exc}") from None
        max_ctx = min(cfg.context_length, PFLASH_MAX_CTX)
        process = ProcessPlan(PFLASH_PROCESS, device.backend, (device,))
        identity = model_identity(pflash.model, cfg)
        daemon = self._start_daemon(process, [row], pflash.model, identity,
                                    self.config.shared_bytes or auto_shared_bytes(cfg),
                                    label=f"pflash daemon ({device})", max_seqs=1, max_ctx=max_ctx,
                                    max_prefill=PFLASH_PREFILL)
        return daemon, identity, row.span, cfg, tokenizer, max_ctx

    def _connect_pflash(self, daemon, identity, span, cfg, tokenizer, max_ctx) -> None:
        from .pflash import Compressor

        stage = self._connect(daemon, identity, span, cfg, f"drafter layers {span}", max_ctx=max_ctx)
        self.pflash = Compressor(stage, tokenizer, self.config.pflash.keep, self.config.pflash.min_prompt)
        if self.config.pflash.device is not None and self.config.pflash.device.backend != "cpu":
            self.pflash.warm_up()  # a GPU's first long prompt would pay its kernels' loading

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
                                    label=f"draft daemon ({device})", max_seqs=1)
        stage = self._connect(daemon, identity, row.span, draft_cfg, f"draft layers {row.span}")
        return Pipeline([stage])

    def _find_hosts(self) -> dict[str, str]:
        """The Ray node of each other host the placement names (joining the cluster first)."""
        hosts = self.config.remote_hosts
        if not hosts:
            return {}
        from .cluster.ray_cluster import connect, resolve_host

        connect(self.config.cluster)
        return {host: resolve_host(host) for host in hosts}

    def _start_daemon(self, process: ProcessPlan, run: list[ShardRow], model: Path, identity: dict,
                      shared: int, label: str | None = None, max_seqs: int | None = None,
                      max_ctx: int | None = None, max_prefill: int = 1024) -> DaemonProcess:
        if self.runtime_dir is None:
            self.runtime_dir = make_runtime_dir()
        shards = tuple(ShardSpec(str(r.shard.device), process.local_index(r.shard.device), r.shard.start, r.shard.stop)
                       for r in run)
        if process.remote:
            return self._start_remote_daemon(process, shards, model, identity, label, max_seqs)
        daemon = DaemonProcess(
            label=label or f"{process.label} ({','.join(str(d) for d in process.devices)})", backend=process.backend,
            python=self.config.pythons.get(process.backend), child_env=process.child_env(),
            runtime_dir=self.runtime_dir, index=process.index, shared_bytes=shared, model=str(model.resolve()),
            identity=identity, shards=shards, max_ctx=max_ctx or self.config.max_ctx, dtype=self.config.dtype,
            graphs=self.config.graphs, weights=self.config.weights, max_seqs=max_seqs or self.config.seqs,
            threads=self.threads if _holds_cpu(run) else None, max_prefill=max_prefill,
        )
        self.daemons.append(daemon)
        log.info("started %s as pid %d with %s", daemon.label, daemon.pid, process.child_env() or "no pinning")
        return daemon

    def _start_remote_daemon(self, process: ProcessPlan, shards: tuple, model: Path, identity: dict,
                             label: str | None, max_seqs: int | None):
        """A daemon on another host, through a Ray actor pinned to its node; it maps that host's
        copy of the model (checked against this one before it loads)."""
        from .cluster.host_actor import actor_name
        from .cluster.remote_daemon import RayDaemon

        host = self.config.host(process.host)
        devices = ",".join(str(d) for d in process.devices)
        daemon = RayDaemon(
            label=label or f"{process.label} ({devices})", backend=process.backend,
            python=host.python(process.backend), child_env=process.child_env(), host=process.host,
            node_id=self.nodes[process.host], name=actor_name(self.launch_id, process.index),
            model=str(host.model or model.resolve()), identity=identity, shards=shards, max_ctx=self.config.max_ctx,
            dtype=self.config.dtype, graphs=self.config.graphs, weights=self.config.weights,
            max_seqs=max_seqs or self.config.seqs,
        )
        self.daemons.append(daemon)
        log.info("started %s on host %s through Ray actor %s", daemon.label, process.host,
                 actor_name(self.launch_id, process.index))
        return daemon

    def _connect(self, daemon: DaemonProcess, identity: dict, span: LayerSpan, cfg: ModelConfig, layers: str,
                 max_ctx: int | None = None):
        import zmq

        from .remote_stage import RemoteStage

        if self._context is None:
            self._context = zmq.Context()
        stage = RemoteStage(daemon, self._context, self.timeouts, identity, span, cfg, max_ctx or self.config.max_ctx,
                            description=f"stage {daemon.label}, {layers}", max_seqs=daemon.max_seqs)
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
            t0 = time.monotonic()
            try:
                daemon.stop(self.timeouts)
            except Exception:  # one daemon that cannot be stopped must not keep the others running
                log.exception("could not stop %s", daemon.label)
            log.info("stopped %s in %.2fs", daemon.label, time.monotonic() - t0)
        self.remote, self.daemons = [], []
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None
        if self.runtime_dir is not None:
            remove_runtime_dir(self.runtime_dir)
            self.runtime_dir = None
        if self._torch_threads is not None:
            import torch

            torch.set_num_threads(self._torch_threads)
            self._torch_threads = None
