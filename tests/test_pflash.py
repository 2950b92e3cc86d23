"""Speculative prefill (PFlash) with real daemons on the demo GGUF: the drafter's daemon is its own
pinned process, a needle-in-a-haystack prompt keeps its key at keep 0.05, the kept text is what the
target's tokenizer encodes (also from a drafter with another vocabulary), chat prompts keep their
final turn, the prefix cache reuses a compressed prompt, short prompts pass through, `serve` takes
it per request, and bad drafters, keeps and YAML are refused in one line with nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from shardrt.config import LaunchConfig, PflashConfig
from shardrt.errors import ConfigError, IpcError
from shardrt.launch import Cluster
from shardrt.niah import QUESTION, haystack
from shardrt.pflash import PFLASH_PREFILL, PromptText, Scoring, forced_tail, kept_text, runs, select
from shardrt.placement import parse_device, parse_devices
from shardrt.stage import prefill_buckets
from shardrt.sampling import SamplingParams

from .synthetic import write_model
from .test_multiprocess import shm_segments

MAX_CTX = 4096
NIAH_TOKENS = 3000
ANSWER = SamplingParams(max_tokens=4, ignore_eos=True)
TIMEOUT = 180


def niah_config(model, **pflash) -> LaunchConfig:
    return LaunchConfig(devices=parse_devices("cpu:0"), max_ctx=MAX_CTX, pflash=PflashConfig(model, **pflash))


@pytest.fixture(scope="module")
def cluster(demo_model):
    """The target in this process, the demo model as drafter in its daemon on cpu:0."""
    with Cluster(niah_config(demo_model), demo_model) as running:
        yield running


def _own_processes(marker: str) -> list[psutil.Process]:
    """Processes whose command line names `marker` (a test's temporary directory)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


# -- the selection, on made-up scores ----------------------------------------------------------

def test_selection_keeps_whole_chunks_within_the_budget_plus_head_and_tail():
    s = Scoring(window=4, head=2, chunk=4, smooth=1)
    scores = torch.zeros(64)
    scores[20:24] = 5.0  # the best chunk
    scores[40:44] = 3.0  # the next
    scores[10:12] = 1.0
    kept = select(scores, budget=2 + 4 + 4 + 4, tail=60, s=s)
    assert runs(kept) == [(0, 2), (20, 24), (40, 44), (60, 64)]
    assert int(kept.sum()) == 14
    # the budget already spent on what is always kept: nothing more
    assert runs(select(scores, budget=6, tail=60, s=s)) == [(0, 2), (60, 64)]
    # keep everything
    assert int(select(scores, budget=64, tail=60, s=s).sum()) == 64
    # the final turn when it fits the budget, else its last line, else the window alone
    assert forced_tail(64, budget=20, turn_token=50, line_token=58, s=s) == 50
    assert forced_tail(64, budget=10, turn_token=30, line_token=58, s=s) == 58
    assert forced_tail(64, budget=10, turn_token=30, line_token=40, s=s) == 60


def test_a_stage_prefills_in_buckets_up_to_its_max_prefill():
    assert prefill_buckets(1024) == (32, 64, 128, 256, 512, 1024)
    assert prefill_buckets(8192)[-4:] == (1024, 2048, 4096, 8192)
    for bad in (512, 3000, 0):
        with pytest.raises(ConfigError, match=f"max_prefill: {bad} is not a power of two of at least 1024"):
            prefill_buckets(bad)


def test_scoring_stops_after_the_highest_scored_layer(tmp_path):
    """The drafter's prefill runs only up to its top scored layer: the layers above it write no KV,
    and the scores are those of a drafter that has no layers above (the same weights below)."""
    from shardrt.attention_scores import score_prompt
    from shardrt.pflash import scored_layers
    from shardrt.stage import Stage

    path = write_model(tmp_path / "drafter.gguf", "llama", n_layers=6, seed=2)
    whole, lower = Stage(path, 0, 6, "cpu", max_ctx=256), Stage(path, 0, 4, "cpu", max_ctx=256)
    layers = scored_layers(whole.cfg, 1 / 6, 0.7)
    assert layers == [1, 2, 3, 4]  # int(0.7 * 6)
    ids = torch.randint(1, whole.cfg.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    scores = score_prompt(whole, ids, window=8, skip=4, chunk=64, layers=layers[:3])  # up to layer 3
    assert whole.k_cache[5].abs().sum() == 0 and whole.k_cache[4].abs().sum() == 0 and whole.k_cache[3].abs().sum() > 0
    assert torch.equal(scores, score_prompt(lower, ids, window=8, skip=4, chunk=64, layers=layers[:3]))


def test_kept_text_is_the_prompts_own_characters():
    text = "alpha beta gamma delta"
    offsets = [(0, 5), (5, 10), (10, 16), (16, 22)]
    assert kept_text(text, offsets, [(0, 1), (2, 4)]) == "alpha gamma delta"
    assert kept_text(text, [(0, 0)] + offsets, [(0, 2), (4, 5)]) == "alpha delta"  # a BOS has no characters
    assert kept_text("ab", [(0, 1), (1, 2)], [(0, 1), (1, 2)]) == "a b"  # a gap never glues two words


def test_prompt_text_finds_the_final_turn(demo_tokenizer):
    plain = PromptText.plain("first line\nsecond\n\nthe question?\n")
    assert (plain.turn_start, plain.text[plain.line_start:]) == (0, "the question?\n")
    messages = [{"role": "user", "content": "an old question"}, {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": "context\nwhat now?"}]
    chat = PromptText.from_chat(demo_tokenizer, messages)
    assert chat.chat and chat.text == demo_tokenizer.render_chat(messages)
    assert chat.text[chat.turn_start:].startswith("context\nwhat now?<|im_end|>")
    assert chat.text[chat.line_start:].startswith("what now?<|im_end|>")


# -- the drafter's daemon ------------------------------------------------------------------------

def test_drafter_daemon_is_its_own_process_holding_the_whole_drafter(cluster, demo_model):
    stage = cluster.pflash.stage
    assert stage.daemon.label == "pflash daemon (cpu:0)" and stage.daemon.alive()
    assert stage.hello["pid"] == stage.daemon.pid != os.getpid()
    assert stage.hello["layers"] == [0, 30] and stage.hello["backend"] == "cpu"
    assert stage.hello["visible_env"] == {} and stage.daemon.child_env == {}
    assert stage.max_ctx == 8192  # the drafter's trained context, not the target's max_ctx
    assert stage.hello["max_prefill"] == PFLASH_PREFILL == Scoring().prefill_chunk  # few launches of each layer
    assert cluster.pipeline.max_ctx == MAX_CTX and len(cluster.pipeline.stages) == 1


@pytest.mark.parametrize("device,env", [
    ("hip:1", {"HIP_VISIBLE_DEVICES": "1", "ROCR_VISIBLE_DEVICES": "1"}),
    ("cuda:3", {"CUDA_VISIBLE_DEVICES": "3"}),
])
def test_drafter_daemon_starts_pinned(demo_model, device, env):
    """On a GPU the drafter's daemon sees only its device, as device 0; this box has neither, so
    the daemon refuses, reporting the environment it was pinned to; the parent's is untouched."""
    if device.startswith("cuda") and torch.cuda.device_count() > 3:
        pytest.skip("this box has a cuda:3: the daemon would load")
    before, segments = dict(os.environ), set(shm_segments(os.getpid()))  # the module's cluster holds some
    config = LaunchConfig(devices=parse_devices("cpu:0"), max_ctx=256,
                          pflash=PflashConfig(demo_model, device=parse_device(device)))
    with pytest.raises(ConfigError) as refused:
        with Cluster(config, demo_model):
            pass
    assert f"pflash daemon ({device})" in str(refused.value)
    assert refused.value.reply["visible_env"] == env and refused.value.reply["local_devices"] == [0]
    assert dict(os.environ) == before
    assert set(shm_segments(os.getpid())) == segments
    assert not psutil.pid_exists(refused.value.reply["pid"]) or \
        psutil.Process(refused.value.reply["pid"]).status() == psutil.STATUS_ZOMBIE


def test_daemon_refuses_bad_score_requests_and_goes_on(cluster):
    stage = cluster.pflash.stage
    ids = torch.arange(100, 140)
    for kwargs, needle in [
        ({"window": 40, "skip": 0, "chunk": 16, "layers": [5]}, "score_prompt.window"),
        ({"window": 8, "skip": 0, "chunk": 16, "layers": []}, "score_prompt.layers"),
        ({"window": 8, "skip": 0, "chunk": 0, "layers": [5]}, "score_prompt.chunk"),
        ({"window": 8, "skip": 0, "chunk": 16, "layers": [30]}, "layer 30 is outside"),
    ]:
        with pytest.raises(IpcError, match=needle):
            stage.score_prompt(ids, **kwargs)
    with pytest.raises(IpcError, match="token ids outside"):
        stage.score_prompt(torch.full((40,), 10**6), window=8, skip=0, chunk=16, layers=[5])
    assert stage.ping()["pid"] == stage.daemon.pid


# -- needles and text --------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [0.2, 0.8])
def test_niah_prompt_keeps_its_key(cluster, demo_tokenizer, depth):
    h = haystack(demo_tokenizer, NIAH_TOKENS, depth, seed=7)
    ids = demo_tokenizer.encode(h.text)
    result = cluster.generate(demo_tokenizer, ids, ANSWER, prompt=PromptText.plain(h.text))
    p = result.pflash
    assert p["passed_through"] is None and p["prompt_tokens"] == len(ids) > 2048
    assert h.key in p["kept_text"], p["kept_text"]
    assert p["kept_text"].endswith(QUESTION)  # the final line, the scoring window
    assert 0.03 <= p["keep_ratio"] <= 0.055 and p["drafter_kept"] <= 0.05 * p["drafter_tokens"] + 1
    # what the target prefilled is the kept text as its own tokenizer encodes it
    assert result.prompt_tokens == demo_tokenizer.encode(p["kept_text"]) and p["kept_tokens"] == len(result.prompt_tokens)
    assert p["drafter_ms"] > 0 and p["target_prefill_ms"] > 0 and len(result.tokens) == ANSWER.max_tokens
    assert {"prompt_tokens", "kept_tokens", "keep_ratio", "drafter_ms", "target_prefill_ms", "kept_text"} <= set(p)
    assert json.loads(json.dumps(result.to_json()))["pflash"] == p


def test_a_compressed_prompt_is_reused_from_the_prefix_cache(cluster, demo_tokenizer):
    h = haystack(demo_tokenizer, NIAH_TOKENS, 0.5, seed=8)
    ids, prompt = demo_tokenizer.encode(h.text), PromptText.plain(h.text)
    first = cluster.generate(demo_tokenizer, ids, ANSWER, prompt=prompt)
    second = cluster.generate(demo_tokenizer, ids, ANSWER, prompt=prompt)
    assert second.pflash["kept_text"] == first.pflash["kept_text"] and second.prompt_tokens == first.prompt_tokens
    assert second.reused_tokens == len(second.prompt_tokens) - 1 and second.tokens == first.tokens


def test_chat_prompt_keeps_its_final_turn_and_its_template(cluster, demo_tokenizer):
    h = haystack(demo_tokenizer, NIAH_TOKENS, 0.6, seed=9)
    body = h.text.removesuffix(QUESTION).rstrip()
    question = "Read the text in the system message.\n" + QUESTION
    messages = [{"role": "system", "content": body}, {"role": "user", "content": question}]
    ids = demo_tokenizer.encode_chat(messages)
    result = cluster.generate(demo_tokenizer, ids, ANSWER, prompt=PromptText.from_chat(demo_tokenizer, messages))
    kept = result.pflash["kept_text"]
    assert h.key in kept and kept.startswith("<|im_start|>system\n")
    assert kept.endswith(question + "<|im_end|>\n<|im_start|>assistant\n")  # the whole final turn
    assert result.prompt_tokens == demo_tokenizer.encode_rendered(kept)
    assert result.prompt_tokens[-3:] == ids[-3:]  # the assistant's header, as the template wrote it


def test_a_drafter_with_another_vocabulary_hands_over_text(demo_model, demo_tokenizer, tmp_path):
    """A tiny random drafter with a byte-level vocabulary of 259 tokens: it scores arbitrarily, but
    what it keeps is the prompt's own text, which the target's tokenizer encodes."""
    drafter = write_model(tmp_path / "bytes.gguf", "llama", context_length=32768)
    h = haystack(demo_tokenizer, 1200, 0.5, seed=10)
    ids = demo_tokenizer.encode(h.text)
    with Cluster(niah_config(drafter, min_prompt=1000), demo_model) as running:
        assert running.pflash.tokenizer.hf.vocab_size != demo_tokenizer.hf.vocab_size
        result = running.generate(demo_tokenizer, ids, ANSWER, prompt=PromptText.plain(h.text))
    p = result.pflash
    assert p["passed_through"] is None and p["drafter_tokens"] > 3 * len(ids)  # bytes, not words
    assert p["kept_text"].endswith(QUESTION)
    assert _within(p["kept_text"], h.text)
    assert result.prompt_tokens == demo_tokenizer.encode(p["kept_text"]) and p["kept_tokens"] < 0.1 * len(ids)


def test_a_warm_up_scores_a_throwaway_prompt_and_leaves_the_drafter_serving(demo_model, demo_tokenizer, tmp_path):
    # on a GPU the cluster warms its drafter at load; here (cpu:0) it is asked to
    drafter = write_model(tmp_path / "short.gguf", "llama", context_length=2048)
    with Cluster(niah_config(drafter, min_prompt=100), demo_model) as running:
        stats = running.pflash.stage.stats
        before = stats()["stages"][0]["forwards"]
        running.pflash.warm_up()
        # the whole context (min(max_ctx, two chunks)): its 2016 tokens before the window in one
        # chunk, then the window; early exits below the top layer, so no length is set
        assert stats()["stages"][0]["forwards"] == before + 2 and stats()["length"] == 0
        h = haystack(demo_tokenizer, 120, 0.5, seed=3)
        result = running.generate(demo_tokenizer, demo_tokenizer.encode(h.text), ANSWER, prompt=PromptText.plain(h.text))
        kept = result.pflash["kept_text"]
        assert result.pflash["passed_through"] is None and _within(kept, h.text) and h.text.endswith(kept[-16:])


def _within(kept: str, text: str) -> bool:
    """Whether `kept` is `text` with characters left out (a gap may bring a space of its own)."""
    at = 0
    for char in kept:
        at = text.find(char, at)
        if at < 0:
            return False
        at += 1
    return True


# -- the command line ------------------------------------------------------------------------------

def shardrt(*args: str, tmp: Path) -> tuple[subprocess.CompletedProcess, int]:
    """`shardrt ARGS` in its own runtime directory under `tmp`; the result and the process id."""
    proc = subprocess.Popen([sys.executable, "-m", "shardrt.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, "TMPDIR": str(tmp), "XDG_RUNTIME_DIR": ""})
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def test_short_prompt_passes_through_unchanged_and_json_says_so(demo_model, demo_tokenizer, tmp_path):
    prompt = "The capital of France is"
    common = ("launch", "--model", str(demo_model), "--target-gpus", "cpu:0", "-p", prompt, "-n", "8", "--json")
    with_pflash, _ = shardrt(*common, "--pflash-model", str(demo_model), tmp=tmp_path)
    without, _ = shardrt(*common, tmp=tmp_path)
    assert with_pflash.returncode == 0 and without.returncode == 0, with_pflash.stderr + without.stderr
    got, plain = json.loads(with_pflash.stdout), json.loads(without.stdout)
    p = got["pflash"]
    ids = demo_tokenizer.encode(prompt)
    assert p["passed_through"] == f"prompt of {len(ids)} tokens is not longer than min_prompt 2048"
    assert p["prompt_tokens"] == p["kept_tokens"] == len(ids) and p["keep_ratio"] == 1.0 and p["kept_text"] == prompt
    assert got["prompt_tokens"] == ids and got["tokens"] == plain["tokens"]
    assert "pflash" not in plain  # without --pflash-model nothing changes
    assert list(tmp_path.glob("shardrt-*")) == []


@pytest.mark.parametrize("args,needle", [
    (("--pflash-keep", "0"), "--pflash-keep: '0' is not a fraction of the prompt in (0, 1]"),
    (("--pflash-keep", "1.5"), "--pflash-keep: '1.5' is not a fraction"),
    (("--pflash-keep", "nan"), "--pflash-keep: 'nan'"),
    (("--pflash-min-prompt", "-1"), "--pflash-min-prompt: -1"),
    (("--pflash-keep", "0.1", "--no-model"), "PFlash options given without a drafter"),
    (("--pflash-gpu", "tpu:0"), "--pflash-gpu"),
    (("--pflash-model", "/nonexistent/drafter.gguf", "--no-model"), "--pflash-model: '/nonexistent/drafter.gguf' is not a file"),
    (("--pflash-model", "JUNK", "--no-model"), "pflash.model: 'junk.gguf' does not load as a drafter"),
    (("--pflash-model", "TRUNCATED", "--no-model"), "pflash.model: 'truncated.gguf' does not load as a drafter"),
    (("--pflash-model", "NOTOKENIZER", "--no-model"), "has no tokenizer"),
])
def test_bad_pflash_options_get_one_line_and_leave_nothing(demo_model, tmp_path, args, needle):
    files = {"JUNK": tmp_path / "junk.gguf", "TRUNCATED": tmp_path / "truncated.gguf",
             "NOTOKENIZER": tmp_path / "bare.gguf"}
    files["JUNK"].write_bytes(b"this is not a model\n" * 8)
    files["TRUNCATED"].write_bytes(Path(demo_model).read_bytes()[: 5 << 20])
    write_model(files["NOTOKENIZER"], "llama", tokenizer=False)
    args = [str(files[a]) if a in files else a for a in args]
    pflash = [] if "--no-model" in args else ["--pflash-model", str(demo_model)]
    args = [a for a in args if a != "--no-model"]
    done, pid = shardrt("launch", "--model", str(demo_model), "--target-gpus", "cpu:0", "-p", "hi", "-n", "2",
                        *pflash, *args, tmp=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardrt: error:") and needle in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert shm_segments(pid) == [] and list(tmp_path.glob("shardrt-*")) == [] and _own_processes(str(tmp_path)) == []


@pytest.mark.parametrize("section,needle", [
    ("pflash:\n  model: DEMO\n  keep: 2\n", "pflash.keep: 2 is not a fraction"),
    ("pflash:\n  model: DEMO\n  keep: yes\n", "pflash.keep: True"),
    ("pflash:\n  model: DEMO\n  min_prompt: 1.5\n", "pflash.min_prompt: 1.5"),
    ("pflash:\n  modle: DEMO\n", "pflash: unknown key 'modle'; accepted: device, keep, min_prompt, model"),
    ("pflash:\n  keep: 0.1\n", "pflash.model: None is not a path"),
    ("pflash: [DEMO]\n", "pflash: expected a mapping"),
    ("pflash:\n  model: DEMO\n  device: nodeb/cpu:0\n", "pflash.device: nodeb/cpu:0 is on host nodeb"),
    ("pflash:\n  model: DEMO\n  keep: [0.1\n", "is not valid YAML"),
])
def test_bad_pflash_yaml_gets_one_line(demo_model, tmp_path, section, needle):
    path = tmp_path / "placement.yaml"
    path.write_text("target:\n  devices: [cpu:0]\n" + section.replace("DEMO", str(demo_model)))
    done, pid = shardrt("launch", "--config", str(path), "--model", str(demo_model), "-p", "hi", "-n", "2",
                        tmp=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert shm_segments(pid) == [] and list(tmp_path.glob("shardrt-*")) == []


def test_good_pflash_yaml_and_flags_over_it(demo_model, tmp_path):
    from shardrt.cli import build_parser
    from shardrt.config import from_args

    path = tmp_path / "placement.yaml"
    path.write_text(f"pflash:\n  model: {demo_model.name}\n  device: hip:1\n  keep: 0.1\n  min_prompt: 100\n")
    (tmp_path / demo_model.name).symlink_to(demo_model)
    config = from_args(build_parser().parse_args(["launch", "--config", str(path), "--pflash-keep", "0.2"]))
    assert config.pflash == PflashConfig(tmp_path / demo_model.name, parse_device("hip:1"), 0.2, 100)
    assert from_args(build_parser().parse_args(["launch"])).pflash is None


# -- serve ------------------------------------------------------------------------------------------

def test_serve_compresses_the_requests_that_ask(demo_model, demo_tokenizer, tmp_path):
    from .test_server import serving

    h = haystack(demo_tokenizer, 1500, 0.4, seed=11)
    flags = ("--pflash-model", str(demo_model), "--pflash-keep", "0.1", "--pflash-min-prompt", "1000",
             "--max-seqs", "2", "--max-ctx", "2048", "--target-gpus", "cpu:0")
    with serving(demo_model, tmp_path / "stderr.txt", *flags) as server:
        status, _, health = server.request("GET", "/health")
        assert status == 200 and "pflash daemon (cpu:0)" in [s["process"] for s in health["stages"]]
        body = {"model": server.model, "prompt": h.text, "max_tokens": 4, "temperature": 0}
        status, _, asked = server.request("POST", "/v1/completions", {**body, "pflash": True}, timeout=TIMEOUT)
        assert status == 200, asked
        p = asked["pflash"]
        assert p["passed_through"] is None and h.key in p["kept_text"] and p["keep_ratio"] < 0.12
        assert asked["usage"]["prompt_tokens"] == p["kept_tokens"] == len(demo_tokenizer.encode(p["kept_text"]))
        status, _, plain = server.request("POST", "/v1/completions", body, timeout=TIMEOUT)
        assert status == 200 and "pflash" not in plain
        assert plain["usage"]["prompt_tokens"] == len(demo_tokenizer.encode(h.text))
        short = {**body, "prompt": "The capital of France is", "pflash": True}
        status, _, passed = server.request("POST", "/v1/completions", short, timeout=TIMEOUT)
        assert status == 200 and "min_prompt 1000" in passed["pflash"]["passed_through"]
        status, _, bad = server.request("POST", "/v1/completions", {**body, "pflash": "yes"})
        assert status == 400 and bad["error"]["param"] == "pflash"
        status, _, stream = server.request("POST", "/v1/completions", {**body, "pflash": True, "stream": True},
                                           timeout=TIMEOUT)
        events = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
        assert status == 200 and events[-1]["pflash"]["kept_text"] == p["kept_text"]
        assert "".join(e["choices"][0]["text"] for e in events) == asked["choices"][0]["text"]
        assert server.metric("shardrt_pflash_prompts_total", outcome="compressed") == 2  # asked, and streamed
        assert server.metric("shardrt_pflash_prompts_total", outcome="passed_through") == 1
        assert server.metric("shardrt_pflash_kept_tokens_total") == 2 * p["kept_tokens"]
        assert server.metric("shardrt_pflash_prompt_tokens_total") == 2 * p["prompt_tokens"]
        assert server.metric("shardrt_pflash_drafter_seconds_total") > 0
    assert "Traceback" not in server.stderr()


def test_a_server_without_a_drafter_refuses_pflash_requests(demo_model, demo_tokenizer):
    from shardrt.server.engine import Engine, SharedTokenizer
    from shardrt.server.metrics import ServerMetrics
    from shardrt.server.schema import ApiError, parse_request

    engine = Engine(LaunchConfig(max_ctx=256), demo_model, ServerMetrics(), max_queue=4)
    engine.tokenizer, engine.state = SharedTokenizer(demo_tokenizer), "ready"  # prepare() needs no stages
    request = parse_request("text", {"model": "m", "prompt": "hi", "pflash": True}, "m")
    with pytest.raises(ApiError) as refused:
        engine.prepare(request)
    assert refused.value.param == "pflash" and "--pflash-model" in refused.value.message


def test_bench_pflash_reports_each_length_and_what_the_drafter_cannot_hold():
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_pflash.py"
    done = subprocess.run([sys.executable, str(script), "--lengths", "2048,16384", "--depths", "0.5", "--keep", "0.1",
                           "--target-gpus", "cpu:0"], capture_output=True, text=True, timeout=TIMEOUT * 2)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    row = report["lengths"]["2048"]
    (case,) = row["cases"]
    assert case["key_kept"] and 0.08 <= case["keep_ratio"] <= 0.105 and case["ttft_ms"] > case["target_prefill_ms"]
    assert row["ttft_plain_ms"] > 0 and row["ttft_speedup"] > 0 and report["drafter_context"] == 8192
    assert "does not fit the drafter's context of 8192 tokens" in report["lengths"]["16384"]["skipped"]
