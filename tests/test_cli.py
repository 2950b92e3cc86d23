"""The `shardrt` command as a user runs it: a real process, real model, real exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TIMEOUT = 180


def shardrt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardrt.cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def test_launch_json_is_greedy_and_deterministic(demo_model, demo_tokenizer):
    runs = [shardrt("launch", "--model", str(demo_model), "--target-gpus", "cpu:0", "-p", "The capital of France is",
                    "-n", "12", "--json") for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (json.loads(r.stdout) for r in runs)
    assert first["prompt_tokens"] == demo_tokenizer.encode("The capital of France is")
    assert len(first["tokens"]) == 12 and first["tokens"] == second["tokens"]
    assert first["text"] == demo_tokenizer.decode(first["tokens"])
    assert "Paris" in first["text"]
    assert first["prefill_seconds"] > 0 and first["decode_tokens_per_s"] > 0


def test_launch_streams_text_and_stops_at_stop_string(demo_model):
    run = shardrt("launch", str(demo_model), "-p", "The capital of France is", "-n", "20", "--stop", "\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("The capital of France is Paris")
    assert run.stdout.count("\n") == 1  # the stop string itself is not printed, only the final newline
    assert "tok/s decode" in run.stderr


def test_chat_uses_the_gguf_template(demo_model):
    run = shardrt("launch", str(demo_model), "--chat", "-p", "What is the capital of France?", "-n", "24", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert "Paris" in out["text"]


def test_sampling_with_a_seed_repeats(demo_model):
    args = ("launch", str(demo_model), "-p", "Once upon a time", "-n", "16", "--temperature", "0.9",
            "--top-p", "0.9", "--top-k", "40", "--json")
    a, b, c = (shardrt(*args, "--seed", s) for s in ("7", "7", "8"))
    tokens = [json.loads(r.stdout)["tokens"] for r in (a, b, c)]
    assert tokens[0] == tokens[1]
    assert tokens[0] != tokens[2]


@pytest.mark.parametrize("args,needle", [
    (("--target-gpus", "gpu0"), "'gpu0'"),
    (("--target-gpus", "tpu:0"), "'tpu'"),
    (("--target-gpus", "cpu:0,cpu:0"), "cpu:0 appears twice"),
    (("--temperature", "-1"), "temperature"),
    (("--top-p", "0"), "top_p"),
    (("--model", "/nonexistent/x.gguf"), "/nonexistent/x.gguf"),
    (("--max-ctx", "0"), "--max-ctx: 0"),
    (("--max-seqs", "2000"), "--max-seqs: 2000 is not a number of sequences in 1..1024"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, demo_model):
    base = ("launch", "-p", "hi", "-n", "2")
    if "--model" not in args:
        base += ("--model", str(demo_model))
    run = shardrt(*base, *args)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardrt: error:") and needle in lines[0], run.stderr


def test_bad_cache_env_is_refused(demo_model):
    run = shardrt("launch", "-p", "hi", "-n", "2", env={"SHARDRT_CACHE": "  "})
    assert run.returncode == 2 and "SHARDRT_CACHE" in run.stderr and "Traceback" not in run.stderr
