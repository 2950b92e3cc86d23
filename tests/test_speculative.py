"""Speculative decoding across real processes: every drafter gives plain decoding's greedy
tokens; KV snapshots, the prefix cache, capture slices and remote projection do what they say."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from shardrt.config import DraftConfig, LaunchConfig
from shardrt.errors import ConfigError
from shardrt.generate import generate
from shardrt.launch import Cluster
from shardrt.pipeline import Pipeline
from shardrt.placement import parse_devices
from shardrt.sampling import SamplingParams
from shardrt.stage import Stage

from .oracle import load_hf_model
from .synthetic import write_model
from .test_multiprocess import Launch, _running, shm_segments

CODE = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
        "def mul(a, b):\n    return a * b\n\ndef div(a, b):\n")
GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)
MAX_CTX = 512


def three_procs(**kw) -> LaunchConfig:
    return LaunchConfig(devices=parse_devices("cpu:0,cpu:1,cpu:2"), max_ctx=MAX_CTX, **kw)


def run(cluster: Cluster, tokenizer, prompt: str, params=GREEDY, **kw):
    return generate(cluster.pipeline, tokenizer, tokenizer.encode(prompt), params, drafter=cluster.drafter,
                    draft_tokens=cluster.draft_tokens, ring=cluster.ring, **kw)


@pytest.fixture(scope="module")
def plain(demo_model, demo_tokenizer):
    with Cluster(three_procs(), demo_model) as cluster:
        return {prompt: run(cluster, demo_tokenizer, prompt).tokens
                for prompt in (CODE, "The three primary colours are")}


@pytest.mark.parametrize("kind,options", [
    ("ngram", {}),
    ("capture", {"capture_layers": (12, 20)}),
    ("model", {"tokens": 3}),  # the draft is the demo model itself, in its own daemon
])
def test_every_drafter_gives_the_plain_greedy_tokens(demo_model, demo_tokenizer, plain, kind, options):
    draft = DraftConfig(kind, model=demo_model if kind == "model" else None, **options)
    with Cluster(three_procs(draft=draft), demo_model) as cluster:
        if draft.kind == "model":
            assert len(cluster.daemons) == 3 and cluster.daemons[-1].label == "draft daemon (cpu:0)"
        for prompt, tokens in plain.items():
            result = run(cluster, demo_tokenizer, prompt)
            assert result.tokens == tokens
            spec = result.spec
            assert spec["drafter"] == draft.kind and spec["target_forwards"] > 0
            assert spec["drafted"] >= spec["accepted"] >= 0
            assert spec["acceptance_length"] == pytest.approx((len(tokens) - 1) / spec["target_forwards"], abs=1e-3)
        if draft.kind == "model":
            assert spec["accept_rate"] == 1.0  # the same model drafts exactly what the target decides
        if draft.kind == "ngram":
            code = run(cluster, demo_tokenizer, CODE).spec
            assert code["accepted"] > 0 and code["acceptance_length"] > 1.0


def test_sampling_with_a_draft_is_reproducible(demo_model, demo_tokenizer):
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
    with Cluster(three_procs(draft=DraftConfig("ngram")), demo_model) as cluster:
        a, b = (run(cluster, demo_tokenizer, CODE, params) for _ in range(2))
    assert a.tokens == b.tokens and len(a.tokens) == 24
    assert all(0 <= t < 49152 for t in a.tokens)


def test_snapshot_restore_continues_as_if_never_left(demo_model, demo_tokenizer):
    ids = demo_tokenizer.encode("The history of the printing press begins")
    with Cluster(three_procs(), demo_model) as cluster:
        pipe = cluster.pipeline

        def continue_greedy(n: int) -> list[int]:
            out, pos = [], pipe.length
            token = pipe.greedy(torch.tensor([ids[-1]]), pos)
            for _ in range(n):
                out.append(token)
                token = pipe.greedy(torch.tensor([token]), pos + len(out))
            return out

        pipe.reset()
        pipe.forward(torch.tensor(ids[:-1]), 0)
        assert pipe.kv_snapshot(3) == len(ids) - 1
        first = continue_greedy(10)
        pipe.reset()
        pipe.forward(torch.tensor(demo_tokenizer.encode("Something else entirely, to overwrite the cache")), 0)
        assert pipe.kv_restore(3) == len(ids) - 1
        assert all(stage.length == len(ids) - 1 for stage in pipe.stages)
        assert continue_greedy(10) == first
        pipe.kv_free(3)
        with pytest.raises(ConfigError, match="slot 3"):
            pipe.kv_restore(3)


def test_prefix_cache_hit_skips_the_shared_prefill(demo_model, demo_tokenizer):
    first_ids = demo_tokenizer.encode(CODE)
    extra = demo_tokenizer.encode("    return a / b\n\ndef mod(a, b):\n")
    second_ids = first_ids + extra
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with Cluster(three_procs(prefix_cache_slots=2), demo_model) as cluster:
        cache = cluster.prefix_cache
        cold = generate(cluster.pipeline, demo_tokenizer, first_ids, params, prefix_cache=cache)
        assert cold.prefilled_tokens == len(first_ids) and cold.reused_tokens == 0
        warm = generate(cluster.pipeline, demo_tokenizer, second_ids, params, prefix_cache=cache)
        reused = warm.reused_tokens
        assert reused >= len(first_ids) and warm.prefilled_tokens == len(second_ids) - reused
        assert cache.stats.to_json() == {"hits": 1, "misses": 1, "reused_tokens": reused, "stores": 2}
        # the same request again: everything but its last token comes from the cache
        again = generate(cluster.pipeline, demo_tokenizer, second_ids, params, prefix_cache=cache)
        assert again.prefilled_tokens == 1 and again.tokens == warm.tokens
    with Cluster(three_procs(prefix_cache_slots=0), demo_model) as cluster:
        fresh = generate(cluster.pipeline, demo_tokenizer, second_ids, params, prefix_cache=cluster.prefix_cache)
        assert fresh.tokens == warm.tokens and fresh.prefilled_tokens == len(second_ids)


def test_prefix_cache_evicts_the_least_recently_used(demo_model, demo_tokenizer):
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    prompts = [demo_tokenizer.encode(f"{word} went to the market to buy bread") for word in ("Alice", "Bob", "Carol")]
    assert len({p[0] for p in prompts}) == 3  # no shared prefix: each request is a miss
    with Cluster(three_procs(prefix_cache_slots=2), demo_model) as cluster:
        cache = cluster.prefix_cache
        for p in prompts:
            generate(cluster.pipeline, demo_tokenizer, p, params, prefix_cache=cache)
        assert len(cache.entries) == 2
        assert cache.stats.misses == 3
        assert generate(cluster.pipeline, demo_tokenizer, prompts[0], params, prefix_cache=cache).reused_tokens == 0
        assert generate(cluster.pipeline, demo_tokenizer, prompts[2], params, prefix_cache=cache).reused_tokens \
            == len(prompts[2]) - 1


def test_capture_slices_equal_single_process_and_transformers(demo_model, demo_tokenizer):
    ids = demo_tokenizer.encode("Capture slices are hidden states of chosen layers")
    layers = (3, 12, 25)
    single = Stage(demo_model, 0, 30, "cpu", max_ctx=64)
    _, local = single.run(torch.tensor(ids), 0, capture=layers)
    hf = load_hf_model(demo_model)
    with torch.inference_mode():
        hidden = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    with Cluster(three_procs(), demo_model) as cluster:
        logits, remote = cluster.pipeline.run(torch.tensor(ids), 0, capture=layers)
        # remote projection: the head's daemon turns hidden states into the same logits
        projected = cluster.pipeline.project(local[-1].data)
        assert cluster.pipeline.project_argmax(local[-1].data) == projected.argmax(-1).tolist()
    assert [(c.layer, c.start, c.count) for c in remote] == [(layer, 0, len(ids)) for layer in layers]
    for ours, theirs in zip(remote, local):
        assert torch.allclose(ours.data, theirs.data, atol=1e-5, rtol=0)
    for c in remote:  # transformers' hidden_states[i + 1] is the output of layer i
        assert (c.data - hidden[c.layer + 1][0]).abs().max().item() < 1e-3
    assert torch.allclose(projected, single.project(local[-1].data), atol=1e-4, rtol=0)


def test_feature_ring_keeps_the_latest_positions(demo_model, demo_tokenizer):
    from shardrt.spec.feature_ring import FeatureRing
    from shardrt.stage import Captured

    ring = FeatureRing((5,), dim=4, capacity=8)
    ring.write([Captured(5, 0, torch.arange(40.0).view(10, 4))])
    assert torch.equal(ring.read(5, 9, 1), torch.arange(36.0, 40.0).view(1, 4))
    assert torch.equal(ring.read(5, 2, 3), torch.arange(8.0, 20.0).view(3, 4))
    with pytest.raises(ConfigError, match="not held"):
        ring.read(5, 1, 1)  # overwritten by position 9
    with pytest.raises(ConfigError, match="layer 6"):
        ring.read(6, 9, 1)


def test_draft_with_another_vocabulary_is_refused(demo_model, tmp_path):
    other = write_model(tmp_path / "other.gguf", "llama")
    config = three_procs(draft=DraftConfig("model", model=other))
    with pytest.raises(ConfigError, match="different vocabulary"):
        with Cluster(config, demo_model):
            pass
    assert shm_segments(os.getpid()) == []


def test_draft_daemon_killed_mid_request_fails_cleanly(demo_model, tmp_path):
    run = Launch(demo_model, tmp_path, "--draft-model", str(demo_model))
    try:
        run.daemon_pids()
        draft_pid = None
        while draft_pid is None:
            line = run.err_lines.get(timeout=120)
            assert line is not None, "".join(run.stderr)
            run.stderr.append(line)
            if "started draft daemon (cpu:0) as pid" in line:
                draft_pid = int(line.split("as pid")[1].split()[0])
        run.wait_generating()
        os.kill(draft_pid, signal.SIGKILL)
        code, stderr = run.finish(timeout=30)
        assert code == 2, stderr
        last = stderr.strip().splitlines()[-1]
        assert "draft daemon (cpu:0)" in last and "SIGKILL" in last and "Traceback" not in stderr, last
        assert not _running(draft_pid)
        assert run.leftovers([draft_pid]) == []
    finally:
        run.kill()


def test_chained_local_pipeline_supports_the_same_operations(demo_model, demo_tokenizer):
    """In-process stages and remote stages answer the same calls the same way."""
    ids = demo_tokenizer.encode(CODE)
    local = Pipeline([Stage(demo_model, 0, 15, "cpu", max_ctx=MAX_CTX), Stage(demo_model, 15, 30, "cpu", max_ctx=MAX_CTX)])
    result = generate(local, demo_tokenizer, ids, GREEDY, drafter=None)
    with Cluster(three_procs(draft=DraftConfig("capture", capture_layers=(20,))), demo_model) as cluster:
        spec = generate(cluster.pipeline, demo_tokenizer, ids, GREEDY, drafter=cluster.drafter, ring=cluster.ring)
    assert spec.tokens == result.tokens


@pytest.mark.parametrize("args,needle", [
    (("--draft", "ngram", "--draft-tokens", "0"), "draft.tokens"),
    (("--draft", "capture", "--capture-layers", "99"), "--capture-layers: layer 99"),
    (("--draft", "capture", "--capture-layers", "a,b"), "--capture-layers: 'a'"),
    (("--draft-model", "/nonexistent.gguf"), "/nonexistent.gguf"),
    (("--draft-tokens", "3"), "without a drafter"),
    (("--draft", "model"), "draft GGUF"),
    (("--prefix-cache-slots", "-1"), "--prefix-cache-slots"),
    (("--draft", "ngram", "--draft-gpu", "tpu:0"), "--draft-gpu"),
])
def test_bad_speculative_options(demo_model, tmp_path, args, needle):
    from .test_cli import shardrt

    done = shardrt("launch", "--model", str(demo_model), "-p", "hi", "-n", "2", *args,
                   env={"TMPDIR": str(tmp_path), "XDG_RUNTIME_DIR": ""})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.glob("shardrt-*")) == []
