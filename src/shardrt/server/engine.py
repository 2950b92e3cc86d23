"""The engine: one thread owns the `Cluster` and takes requests from a bounded FIFO queue:
with `--max-seqs` above 1, up to that many decode together (server/batch.py: requests join and
leave the running batch between steps); with 1, one at a time. With a drafter, a request that
finds no other running or waiting decodes speculatively; when another arrives it stops drafting
and joins the batch where it stands. It cancels what clients abandon, notices stages that die (a
failed request, or a daemon found dead while idle or by `/health`), restarts the whole Cluster
with the same configuration, and reports its state for `/health` and its numbers for `/metrics`.
A request that asks for PFlash (`"pflash": true`) has its prompt compressed by the drafter's
daemon, in this thread, before it runs.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..config import LaunchConfig
from ..errors import ConfigError, IpcError, ModelFormatError, StageDied
from ..generate import Handover
from ..sampling import SamplingParams
from .encoding import BatchedEncoder
from .metrics import ServerMetrics
from .schema import ApiError, GenerateRequest

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.25  # how often an idle engine checks that its daemons are alive
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # between failed restarts
STOP_JOIN_S = 30.0  # how long shutdown waits for the engine thread (a restart in progress loads weights)


class SharedTokenizer:
    """The tokenizer as the server's threads share it: HTTP threads encode prompts (in batches,
    encoding.BatchedEncoder) while the engine thread decodes (behind a lock: one decode at a time)."""

    def __init__(self, tokenizer):
        self._tokenizer, self._lock = tokenizer, threading.Lock()
        self._encoder = BatchedEncoder(tokenizer)
        self.stop_ids = tokenizer.stop_ids

    def encode(self, text: str) -> list[int]:
        return self._encoder.encode(text, special=True)

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self._tokenizer.decode(ids)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode_rendered(self.render_chat(messages))

    def render_chat(self, messages: list[dict]) -> str:
        return self._tokenizer.render_chat(messages)

    def encode_rendered(self, text: str) -> list[int]:
        return self._encoder.encode(text, special=False)


class Job:
    """One request on its way through the engine. Its events, in order: ("text", piece)...,
    then ("done", Generation) or ("error", ApiError)."""

    def __init__(self, request: GenerateRequest, prompt_ids: list[int], params: SamplingParams,
                 received: float | None = None):
        self.request, self.prompt_ids, self.params = request, prompt_ids, params
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.arrived = time.monotonic()  # tokenized, entering the queue
        self.received = self.arrived if received is None else received  # handed to `prepare`
        self.first_token_at: float | None = None
        self.http_cpu: float | None = None  # CPU seconds its HTTP thread took to queue it (headers, body, template, encode)
        self._cancel = threading.Event()
        self.prompt = None  # pflash.PromptText while the prompt waits to be compressed (the request asked)
        self.pflash = None  # pflash.Report once it was

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def on_text(self, piece: str) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if piece:
            self.events.put(("text", piece))

    def finish(self, result) -> None:
        self.events.put(("done", result))

    def fail(self, error: ApiError) -> None:
        self.events.put(("error", error))


@dataclass(frozen=True)
class StageInfo:
    """What `/health` says about one stage, and the daemon to test, if it lives in one."""

    name: str  # e.g. "daemon 1 (cpu:1), layers [15,30)"; also the `stage` label in /metrics
    process: str  # "coordinator", "daemon 1", "draft daemon"
    pid: int
    handle: object  # the Stage or RemoteStage: its `stats()` gives forwards and time
    daemon: object | None = None

    def alive(self) -> bool:
        return self.daemon is None or self.daemon.alive()

    def to_json(self) -> dict:
        return {"stage": self.name, "process": self.process, "pid": self.pid, "alive": self.alive()}


class Engine:
    def __init__(self, config: LaunchConfig, model_path: Path, metrics: ServerMetrics, max_queue: int, timeouts=None,
                 max_batch_tokens: int | None = None, step_log=None):
        self.config, self.model_path, self.metrics = config, Path(model_path), metrics
        self.max_queue, self.timeouts, self.max_batch_tokens = max_queue, timeouts, max_batch_tokens
        self.step_log = step_log  # step_log.StepLog (--step-log) or None
        self.tokenizer: SharedTokenizer | None = None
        self.cluster = None
        self.state = "starting"  # starting | ready | stage_died | restarting | failed | stopped
        self.failure: dict | None = None  # the last stage failure: {"stage", "error", "at"}
        self.restarts = 0
        self.last_restart_seconds: float | None = None
        self.stages: list[StageInfo] = []
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None  # one at a time
        self._scheduler = None  # batched: a BatchScheduler over the Cluster's pipeline
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Load the tokenizer and the Cluster in the calling thread (so Ctrl-C unwinds it), then
        hand the Cluster to the engine thread."""
        from ..tokenizer import Tokenizer

        self.tokenizer = SharedTokenizer(Tokenizer(self.model_path))
        self._open()
        self._ready()
        self._thread = threading.Thread(target=self._loop, name="shardrt-engine", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Refuse what waits, cancel what runs, close the Cluster; bounded by STOP_JOIN_S."""
        with self._cond:
            self._stopping = True
            waiting = list(self._queue)
            self._queue.clear()
            running = [self._running] if self._running is not None else []
            if self._scheduler is not None:
                running += [r.job for r in self._scheduler.running]
            self._cond.notify_all()
        self.metrics.queue_depth.set(0)
        for job in waiting:
            job.fail(ApiError("server: shutting down", status=503, code="shutting_down"))
        for job in running:
            job.cancel()
        if self._thread is not None:
            self._thread.join(STOP_JOIN_S)
            if self._thread.is_alive():
                log.warning("the engine did not stop within %.0fs; its daemons exit with this process", STOP_JOIN_S)
                return
        self._close()
        self.state = "stopped"

    def _open(self) -> None:
        from ..launch import Cluster

        cluster = Cluster(self.config, self.model_path, self.timeouts)
        cluster.__enter__()  # the Cluster closes itself if its start fails
        self.cluster = cluster
        stages = []
        remote = {id(r) for r in cluster.remote}
        for stage in cluster.pipeline.stages:
            if id(stage) in remote:
                stages.append(self._remote_info(stage))
            else:
                device = next((r.shard.device for r in cluster.rows if r.shard.start == stage.span.start), stage.device)
                stages.append(StageInfo(f"coordinator ({device}), layers {stage.span}", "coordinator", os.getpid(), stage))
        in_pipeline = {id(s) for s in cluster.pipeline.stages}
        stages += [self._remote_info(r) for r in cluster.remote if id(r) not in in_pipeline]  # the draft daemon
        self.stages = stages
        if self.config.seqs > 1:
            from .batch import BatchScheduler

            self._scheduler = BatchScheduler(cluster.pipeline, self.tokenizer, cluster.prefix_cache,
                                             **({"max_batch_tokens": self.max_batch_tokens} if self.max_batch_tokens else {}),
                                             step_log=self.step_log)
        self._prefix_base = (0, 0, 0, 0)
        self._shared_base = (0, 0)
        self._stats_base: dict[str, tuple[int, float]] = {}

    def _ready(self) -> None:
        with self._cond:
            self.state = "ready"
        self.metrics.up.set(1)

    @staticmethod
    def _remote_info(stage) -> StageInfo:
        return StageInfo(stage.description.removeprefix("stage "), stage.daemon.label, stage.daemon.pid, stage,
                         stage.daemon)

    def _close(self) -> None:
        if self._scheduler is not None:
            for run in self._scheduler.drop_all():
                run.job.fail(ApiError("server: shutting down", status=503, code="shutting_down"))
            self._scheduler = None
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            try:
                cluster.close()
            except Exception as exc:  # closing must go on whatever one step says
                log.warning("closing the cluster: %s", exc)

    # -- the queue ----------------------------------------------------------------------

    def prepare(self, request: GenerateRequest) -> Job:
        """Tokenize and check a request against max_ctx (in the caller's thread, before queueing)."""
        received = time.monotonic()
        if self.tokenizer is None or self.state == "starting":
            raise ApiError("server: still loading the model; retry shortly", status=503, code="starting", retry_after=2)
        try:
            prompt_ids = self.tokenizer.encode_chat(request.chat_messages()) if request.kind == "chat" \
                else self.tokenizer.encode(request.prompt)
        except ModelFormatError as exc:
            raise ApiError(f"messages: {exc}; use /v1/completions", "messages", code="no_chat_template") from None
        except Exception as exc:  # the GGUF's own Jinja template may refuse a conversation
            raise ApiError(f"messages: the model's chat template refused them: {exc}", "messages") from None
        pflash = self.config.pflash
        if request.pflash and pflash is None:
            raise ApiError("pflash: this server has no PFlash drafter; start it with --pflash-model PATH", "pflash",
                           code="unsupported_value")
        compressed = request.pflash and len(prompt_ids) > pflash.min_prompt
        # a prompt the drafter will compress is checked against max_ctx once it has (Engine._compress)
        max_tokens = request.resolve_max_tokens(1 if compressed else len(prompt_ids), self.config.max_ctx)
        text = None
        if request.pflash:  # a short prompt passes through, and the response says so
            from ..pflash import PromptText

            text = PromptText.from_chat(self.tokenizer, request.chat_messages()) if request.kind == "chat" \
                else PromptText.plain(request.prompt)
        job = Job(request, prompt_ids, self._params(request, max_tokens), received)
        job.prompt = text
        return job

    @staticmethod
    def _params(request: GenerateRequest, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_k=request.top_k,
                                  top_p=request.top_p, seed=request.seed, stop=request.stop,
                                  ignore_eos=request.ignore_eos)
        except ConfigError as exc:
            raise ApiError(str(exc), str(exc).split(":")[0]) from None

    def _compress(self, job: Job) -> bool:
        """PFlash, in the engine thread (which owns the drafter's daemon): the job's prompt becomes
        the kept text's tokens, checked against max_ctx. False when the job failed instead."""
        if job.prompt is None:
            return True
        try:
            ids, report = self.cluster.pflash.compress(job.prompt, job.prompt_ids, self.tokenizer)
            job.params = self._params(job.request, job.request.resolve_max_tokens(len(ids), self.config.max_ctx))
        except ApiError as exc:
            job.fail(exc)
            return False
        except (StageDied, IpcError) as exc:
            dead = self._dead_stage()
            job.fail(self._stage_error(exc))
            self.metrics.generations.inc(finish_reason="error")
            self._stage_died(dead.name if dead is not None else str(exc).removeprefix("stage ").split(":")[0], str(exc))
            return False
        except Exception as exc:  # a bug: this request fails, the engine goes on
            log.error("pflash failed: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            job.fail(ApiError(f"server: pflash failed ({type(exc).__name__}: {exc})", status=500, code="internal_error"))
            self.metrics.generations.inc(finish_reason="error")
            return False
        job.prompt_ids, job.pflash, job.prompt = ids, report, None
        m = self.metrics
        if report.passed_through is None:
            m.pflash_prompts.inc(outcome="compressed")
            m.pflash_prompt_tokens.inc(report.prompt_tokens)
            m.pflash_kept_tokens.inc(report.kept_tokens)
        else:
            m.pflash_prompts.inc(outcome="passed_through")
        m.pflash_drafter_seconds.inc(report.drafter_ms / 1000)
        return True

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ApiError("server: shutting down", status=503, code="shutting_down")
            if self.state == "failed":
                raise ApiError(f"server: the stages are down ({self.failure['error'] if self.failure else '?'}); "
                               "restarting them", status=503, code="stages_down", retry_after=5)
            if len(self._queue) >= self.max_queue + self._free_slots():
                self.metrics.queue_rejected.inc()
                raise ApiError(f"server: every sequence slot is taken and the queue is full ({self.max_queue} "
                               "requests waiting, --max-queue); retry later", status=503, code="queue_full",
                               retry_after=1)
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()

    def _free_slots(self) -> int:
        """Sequence slots no request holds (a request in the queue takes one at the next step)."""
        scheduler = self._scheduler
        if scheduler is None:
            return 0 if self._running is not None else 1
        return scheduler.free_slots

    def withdraw(self, job: Job) -> None:
        """The client went away: cancel the job and free its place in the queue."""
        job.cancel()
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self.metrics.queue_depth.set(len(self._queue))
                self.metrics.generations.inc(finish_reason="cancelled")

    def _take(self) -> Job | None:
        with self._cond:
            if not self._queue and not self._stopping and self.state == "ready":
                self._cond.wait(IDLE_POLL_S)
            if self._stopping or self.state != "ready" or not self._queue:
                return None
            job = self._queue.popleft()
            self._running = job
            self.metrics.queue_depth.set(len(self._queue))
            return job

    # -- the engine thread --------------------------------------------------------------

    def _loop(self) -> None:
        failures = 0
        while not self._stopping:
            if self.state in ("stage_died", "failed"):
                failures = 0 if self._restart(failures) else failures + 1
                continue
            if self._scheduler is not None:
                self._batch_round()
                continue
            job = self._take()
            if job is None:
                dead = self._dead_stage()
                if dead is not None:
                    self._stage_died(dead.name, f"{dead.name}: daemon exited ({dead.daemon.exit_reason()})")
                continue
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None
        self._close()

    def _batch_round(self) -> None:
        """Let waiting requests into free slots, then one step of the running batch."""
        scheduler = self._scheduler
        if not scheduler.running and scheduler.unsettled and self.state == "ready":
            # the last requests ended: keep their prefixes and free their slots now, while idle, not
            # in front of the next burst (64 snapshots can take longer than the burst's prefill)
            if not self._scheduled(scheduler.settle):
                return
        with self._cond:
            if not self._queue and not scheduler.running and not self._stopping and self.state == "ready":
                self._cond.wait(IDLE_POLL_S)
            if self._stopping or self.state != "ready":
                return
            alone = None
            if self.cluster.drafter is not None and len(self._queue) == 1 and not scheduler.running:
                alone = self._running = self._queue.popleft()
            joining = []
            while self._queue and len(joining) < scheduler.free_slots:
                joining.append(self._queue.popleft())
            self.metrics.queue_depth.set(len(self._queue))
        if alone is not None:
            self._speculate(alone)
            return
        for job in joining:
            if job.cancelled():
                job.fail(ApiError("request: cancelled", status=499, code="cancelled"))
                continue
            if not self._compress(job):
                continue
            try:
                scheduler.admit(job)
            except ConfigError as exc:
                job.fail(ApiError(str(exc), str(exc).split(":")[0]))
        if not scheduler.running:
            dead = self._dead_stage()
            if dead is not None:
                self._stage_died(dead.name, f"{dead.name}: daemon exited ({dead.daemon.exit_reason()})")
            return
        self.metrics.running.set(len(scheduler.running))
        if self._scheduled(scheduler.step):
            self.metrics.running.set(len(scheduler.running))

    def _scheduled(self, call) -> bool:
        """Run a scheduler call and deliver what finished; False when the stages failed under it
        (every running request then has its error, and the restart is under way)."""
        scheduler = self._scheduler
        try:
            finished = call()
        except (StageDied, IpcError) as exc:
            self._batch_failed(exc)
            return False
        except Exception as exc:  # a bug or a broken stage: fail the batch, restart to a clean state
            log.error("batched step failed: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            for run in scheduler.drop_all():
                run.job.fail(ApiError(f"server: generation failed ({type(exc).__name__}: {exc})", status=500,
                                      code="internal_error"))
                self.metrics.generations.inc(finish_reason="error")
            self._stage_died("engine", f"{type(exc).__name__}: {exc}")
            return False
        for run, result in finished:
            self._deliver(run.job, result)
        return True

    def _speculate(self, job: Job) -> None:
        """The only request: speculative in slot 0 until another request waits, then in the batch.
        The slots of requests that ended are given back first; if the stages fail doing so, the
        request waits at the head of the queue for the restart."""
        try:
            if not self._scheduled(self._scheduler.settle):
                with self._cond:
                    self._queue.appendleft(job)
                    self.metrics.queue_depth.set(len(self._queue))
                return
            self._run(job, handover=lambda: bool(self._queue))
        finally:
            with self._cond:
                self._running = None

    def _stage_error(self, exc: Exception) -> ApiError:
        return ApiError(f"{exc}; the server is restarting its stages, retry shortly", status=503, code="stage_died",
                        retry_after=5)

    def _batch_failed(self, exc: Exception) -> None:
        """A stage failed under the batch: every running request gets the error, then the restart."""
        for run in self._scheduler.drop_all():
            run.job.fail(self._stage_error(exc))
            self.metrics.generations.inc(finish_reason="error")
        dead = self._dead_stage()
        self._stage_died(dead.name if dead is not None else str(exc).removeprefix("stage ").split(":")[0], str(exc))

    def _run(self, job: Job, handover=None) -> None:
        if job.cancelled():
            job.fail(ApiError("request: cancelled", status=499, code="cancelled"))
            return
        if not self._compress(job):
            return
        self.metrics.running.set(1)
        try:
            result = self.cluster.generate(self.tokenizer, job.prompt_ids, job.params, on_text=job.on_text,
                                           cancelled=job.cancelled, handover=handover)
        except (StageDied, IpcError) as exc:
            dead = self._dead_stage()
            name = dead.name if dead is not None else str(exc).removeprefix("stage ").split(":")[0]
            job.fail(self._stage_error(exc))
            self.metrics.generations.inc(finish_reason="error")
            self._stage_died(name, str(exc))
            return
        except Exception as exc:  # a bug or a broken stage: fail this request, restart to a clean state
            log.error("generation failed: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            job.fail(ApiError(f"server: generation failed ({type(exc).__name__}: {exc})", status=500,
                              code="internal_error"))
            self.metrics.generations.inc(finish_reason="error")
            self._stage_died("engine", f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.metrics.running.set(0)
        if isinstance(result, Handover):
            self._scheduler.adopt(job, result)
            self.metrics.spec_handovers.inc()
        else:
            self._deliver(job, result)

    def _deliver(self, job: Job, result) -> None:
        if job.pflash is not None:
            result.pflash = job.pflash.to_json(result.prefill_seconds)
        try:
            self._record(job, result)  # before the client hears: what it reads from /metrics next is current
        except Exception as exc:  # numbers must never cost an answer
            log.error("recording metrics: %s: %s", type(exc).__name__, exc)
        if result.finish_reason == "cancelled" and self._stopping:
            job.fail(ApiError("server: shutting down", status=503, code="shutting_down"))
        else:
            job.finish(result)

    def _record(self, job: Job, result) -> None:
        m = self.metrics
        m.generations.inc(finish_reason=result.finish_reason)
        m.prompt_tokens.inc(len(result.prompt_tokens))
        m.generation_tokens.inc(len(result.tokens))
        m.ttft.observe((job.first_token_at or time.monotonic()) - job.arrived)
        if len(result.tokens) > 1:
            m.decode_tokens.inc(len(result.tokens) - 1)
            m.decode_seconds.inc(result.decode_seconds)
            m.decode_rate.set(result.decode_tokens_per_s)
        if result.spec:
            m.spec_drafted.inc(result.spec["drafted"])
            m.spec_accepted.inc(result.spec["accepted"])
        stats = self.cluster.prefix_cache.stats
        now = (stats.hits, stats.misses, stats.reused_tokens, stats.stores)
        for counter, new, old in zip((m.prefix_hits, m.prefix_misses, m.prefix_reused, m.prefix_stores), now,
                                     self._prefix_base):
            counter.inc(new - old)
        self._prefix_base = now
        if self._scheduler is not None:
            shared = (self._scheduler.shared.requests, self._scheduler.shared.tokens)
            m.prefix_shared.inc(shared[0] - self._shared_base[0])
            m.prefix_shared_tokens.inc(shared[1] - self._shared_base[1])
            self._shared_base = shared
        try:
            self._record_stages()
        except (StageDied, IpcError) as exc:
            dead = self._dead_stage()
            self._stage_died(dead.name if dead else "a daemon", str(exc))

    def _record_stages(self) -> None:
        """Per-stage forward counts and time, from each stage's own `stats` (new stages after a
        restart count from zero again, so only what is new since the last look is added)."""
        for info in self.stages:
            reply = info.handle.stats()
            forwards, seconds = int(reply.get("forwards", 0)), float(reply.get("forward_seconds", 0.0))
            before = self._stats_base.get(info.name, (0, 0.0))
            self._stats_base[info.name] = (forwards, seconds)
            self.metrics.stage_forwards.inc(forwards - before[0], stage=info.name)
            self.metrics.stage_seconds.inc(seconds - before[1], stage=info.name)

    def _dead_stage(self) -> StageInfo | None:
        return next((s for s in self.stages if not s.alive()), None)

    def _stage_died(self, stage: str, error: str) -> None:
        with self._cond:
            if self.state == "ready":
                log.warning("stage died: %s", error)
                self.failure = {"stage": stage, "error": error, "at": time.time()}
                self.state = "stage_died"
                self.metrics.up.set(0)
                self._cond.notify_all()

    def _restart(self, failures: int) -> bool:
        """Close the Cluster and start a new one with the same configuration; True when it runs."""
        with self._cond:
            self.state = "restarting"
        t0 = time.monotonic()
        self._close()
        try:
            self._open()
        except Exception as exc:  # any failure: stay down, say why, try again later
            wait = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            log.error("restarting the cluster failed: %s; next try in %.0fs", exc, wait)
            with self._cond:
                self.state = "failed"
                self.failure = {**(self.failure or {}), "error": f"restart failed: {exc}", "at": time.time()}
                waiting = list(self._queue)
                self._queue.clear()
                self.metrics.queue_depth.set(0)
            for job in waiting:
                job.fail(ApiError(f"server: the stages are down ({exc}); retry later", status=503,
                                  code="stages_down", retry_after=int(wait) + 1))
            with self._cond:
                if not self._stopping:
                    self._cond.wait(wait)
            return False
        took = time.monotonic() - t0
        with self._cond:
            self.restarts += 1
            self.last_restart_seconds = took
        self.metrics.restarts.inc()
        self.metrics.last_restart.set(took)
        self._ready()
        log.warning("restarted the cluster in %.2fs (%s)", took, self.failure["stage"] if self.failure else "?")
        return True

    def _running_count(self) -> int:
        batched = len(self._scheduler.running) if self._scheduler is not None else 0
        return batched + int(self._running is not None)

    # -- /health --------------------------------------------------------------------------

    def health(self) -> tuple[int, dict]:
        """(HTTP status, body): 200 when every stage is ready, else 503 with the stage that is not."""
        dead = self._dead_stage() if self.state == "ready" else None
        if dead is not None:  # found here first: tell the engine thread, which restarts when idle
            self._stage_died(dead.name, f"{dead.name}: daemon exited ({dead.daemon.exit_reason()})")
        with self._cond:
            body = {"status": "ok" if self.state == "ready" else self.state,
                    "model": self.model_path.name,
                    "stages": [s.to_json() for s in self.stages],
                    "queue": len(self._queue), "running": self._running_count(),
                    "restarts": self.restarts, "last_restart_seconds": self.last_restart_seconds}
            if self.failure:
                key = "last_failure" if self.state == "ready" else "failure"
                body[key] = dict(self.failure)
                if self.state != "ready":
                    body["stage"] = self.failure["stage"]
        return (200 if self.state == "ready" else 503), body

