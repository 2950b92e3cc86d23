"""The launch configuration: YAML placement files, flags over the file, the environment, and
the real `shardrt` command refusing bad input with one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardrt import config
from shardrt.cli import build_parser
from shardrt.config import SHARED_BYTES_ENV, LaunchConfig, from_args, load_yaml, parse_shared_bytes
from shardrt.errors import ConfigError, PlacementError
from shardrt.placement import DeviceSpec, default_device

REPO = Path(__file__).resolve().parent.parent
CLI_TIMEOUT = 120

DESIGN_EXAMPLE = """\
model: /models/Qwen3-8B-Q4_K_M.gguf
max_ctx: 8192
backends:                      # which interpreter runs each backend's daemons
  cuda: {python: /opt/venv-cu/bin/python}
  hip:  {python: /opt/venv-rocm/bin/python}
target:
  devices: [cuda:0, hip:0, hip:1]
  layer_split: [0.08, 0.46, 0.46]   # weights, normalised; or "auto"
  isolate_gpus: true                # one daemon per GPU, visibility pinned
ipc:
  shared_bytes: auto
"""

GOOD_TARGET = "target:\n  devices: [cuda:0, hip:0, hip:1]\n"


@pytest.fixture(autouse=True)
def no_shared_bytes_env(monkeypatch):
    monkeypatch.delenv(SHARED_BYTES_ENV, raising=False)


def write(tmp_path: Path, text: str, name: str = "place.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def parse(*argv: str):
    return from_args(build_parser().parse_args(["plan", *argv]))


# -- the YAML file -----------------------------------------------------------------------

def test_design_example_loads(tmp_path):
    cfg = load_yaml(write(tmp_path, DESIGN_EXAMPLE))
    assert cfg == LaunchConfig(
        model=Path("/models/Qwen3-8B-Q4_K_M.gguf"), max_ctx=8192,
        devices=(DeviceSpec("cuda", 0), DeviceSpec("hip", 0), DeviceSpec("hip", 1)),
        layer_split=pytest.approx((0.08, 0.46, 0.46)), isolate_gpus=True, all_daemons=False,
        pythons={"cuda": "/opt/venv-cu/bin/python", "hip": "/opt/venv-rocm/bin/python"}, shared_bytes=None)


@pytest.mark.parametrize("text,field,value", [
    ("", "max_ctx", 4096),  # an empty file is all defaults
    ("max_ctx: 16\n", "max_ctx", 16),
    ("max_seqs: 4\n", "max_seqs", 4),
    ("", "max_seqs", None),  # the command's default: 1, or 8 under serve
    ("model: m.gguf\n", "model", "RELATIVE"),  # relative to the file, not the working directory
    ("backends:\n  rocm: {python: /opt/r/bin/python}\n", "pythons", {"hip": "/opt/r/bin/python"}),
    ("backends:\n  cuda:\n", "pythons", {}),
    ("target:\n  devices: 'cpu:0, cpu:1'\n", "devices", (DeviceSpec("cpu", 0), DeviceSpec("cpu", 1))),
    ("target:\n  devices: [cpu:0, cpu:1]\n  layer_split: auto\n", "layer_split", "auto"),  # by free memory, at launch
    ("target:\n  devices: [cpu:0, cpu:1]\n  layer_split: '1,3'\n", "layer_split", (0.25, 0.75)),
    ("target:\n  isolate_gpus: false\n  all_daemons: true\n", "all_daemons", True),
    ("ipc:\n  shared_bytes: 8M\n", "shared_bytes", 8 << 20),
    ("ipc:\n  shared_bytes: 64k\n", "shared_bytes", 64 << 10),
    ("ipc:\n  shared_bytes: 1048576\n", "shared_bytes", 1 << 20),
    ("ipc:\n  shared_bytes: ' AUTO '\n", "shared_bytes", None),
    ("", "graphs", True),
    ("graphs: false\n", "graphs", False),
    ("", "weights", "auto"),
    ("weights: quantized\n", "weights", "quantized"),
    ("weights: dequantized\n", "weights", "dequantized"),
])
def test_good_yaml_values(tmp_path, text, field, value):
    cfg = load_yaml(write(tmp_path, text))
    if value == "RELATIVE":
        value = tmp_path / "m.gguf"
    assert getattr(cfg, field) == value


@pytest.mark.parametrize("text,needles", [
    ("modle: x.gguf\n", ["unknown key 'modle'", "accepted:"]),
    ("target:\n  device: [cpu:0]\n", ["target:", "unknown key 'device'"]),
    ("ipc:\n  bytes: 8M\n", ["ipc:", "unknown key 'bytes'"]),
    ("backends:\n  tpu: {python: /x}\n", ["backends:", "unknown key 'tpu'"]),
    ("backends:\n  hip: {python: 3}\n", ["backends.hip.python:", "3"]),
    ("backends:\n  hip: {python: ''}\n", ["backends.hip.python:", "''"]),
    ("backends:\n  hip: {interpreter: /x}\n", ["backends.hip:", "unknown key 'interpreter'"]),
    ("backends:\n  hip: /opt/venv-rocm/bin/python\n", ["backends.hip:", "expected a mapping", "/opt/venv-rocm"]),
    ("target:\n  devices: [cuda0]\n", ["target.devices:", "'cuda0'"]),
    ("target:\n  devices: [cuda:0, npu:1]\n", ["target.devices:", "'npu'"]),
    ("target:\n  devices: [cpu:0, cpu:0]\n", ["target.devices:", "cpu:0 appears twice"]),
    ("target:\n  devices: []\n", ["target.devices:", "[]"]),
    ("target:\n  devices: 7\n", ["target.devices:", "7"]),
    (GOOD_TARGET + "  layer_split: [0.5, 0.5]\n", ["target.layer_split:", "2 weights for 3 devices"]),
    (GOOD_TARGET + "  layer_split: [1, 0, 1]\n", ["target.layer_split:", "0"]),
    (GOOD_TARGET + "  layer_split: [1, .nan, 1]\n", ["target.layer_split:", "nan"]),
    ("target:\n  layer_split: [1]\n", ["target.layer_split:", "without target.devices"]),
    (GOOD_TARGET + "  isolate_gpus: 'yes'\n", ["target.isolate_gpus:", "'yes'"]),
    (GOOD_TARGET + "  all_daemons: 1\n", ["target.all_daemons:", "1"]),
    ("max_ctx: -5\n", ["max_ctx:", "-5"]),
    ("max_ctx: 0\n", ["max_ctx:", "0"]),
    ("max_ctx: 4096.5\n", ["max_ctx:", "4096.5"]),
    ("max_ctx: true\n", ["max_ctx:", "True"]),
    ("max_seqs: 0\n", ["max_seqs:", "0", "1..1024"]),
    ("max_seqs: 1025\n", ["max_seqs:", "1025"]),
    ("max_seqs: true\n", ["max_seqs:", "True"]),
    ("model: 12\n", ["model:", "12"]),
    ("ipc:\n  shared_bytes: -1\n", ["ipc.shared_bytes:", "-1"]),
    ("ipc:\n  shared_bytes: ''\n", ["ipc.shared_bytes:", "''"]),
    ("ipc:\n  shared_bytes: abc\n", ["ipc.shared_bytes:", "'abc'"]),
    ("ipc:\n  shared_bytes: 100\n", ["ipc.shared_bytes:", "100", "too small"]),
    ("ipc:\n  shared_bytes: 1.5G\n", ["ipc.shared_bytes:", "'1.5G'"]),
    ("ipc:\n  shared_bytes: 8T\n", ["ipc.shared_bytes:", "'8T'"]),
    ("ipc:\n  shared_bytes: true\n", ["ipc.shared_bytes:", "True"]),
    ("ipc: 8M\n", ["ipc:", "expected a mapping", "'8M'"]),
    ("draft:\n  kind: medusa\n", ["draft.kind:", "'medusa'"]),
    ("graphs: sometimes\n", ["graphs:", "'sometimes'"]),
    ("weights: q4\n", ["weights:", "'q4'", "auto, quantized, dequantized"]),
    ("draft:\n  kind: ngram\n  tokens: 0\n", ["draft.tokens:", "0"]),
    ("draft:\n  kind: ngram\n  speed: fast\n", ["draft:", "unknown key", "'speed'"]),
    ("draft:\n  kind: model\n", ["draft.model:"]),
    ("draft:\n  kind: capture\n  capture_layers: [a]\n", ["draft.capture_layers:", "'a'"]),
    ("draft:\n  kind: model\n  model: m.gguf\n  device: tpu:1\n", ["draft.device:", "'tpu:1'"]),
    ("- cuda:0\n- hip:0\n", ["place.yaml", "expected a mapping", "list"]),
    ("just a string\n", ["place.yaml", "expected a mapping", "str"]),
    ("model: x\nmax_ctx: 10\ntarget: devices: [cpu:0]\n", ["'place.yaml' is not valid YAML", "line 3"]),
    ("max_ctx: 10\ntarget:\n  devices: [cuda:0, hip:0\n  isolate_gpus: true\n", ["not valid YAML", "line 4"]),
])
def test_bad_yaml_names_field_and_value(tmp_path, text, needles):
    with pytest.raises(ConfigError) as err:
        load_yaml(write(tmp_path, text))
    message = str(err.value)
    assert all(n in message for n in needles), message
    assert "\n" not in message


def test_unreadable_config_file(tmp_path):
    with pytest.raises(PlacementError, match="--config: cannot read .*nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["p4-2xprovii.yaml", "cpu-3proc.yaml"])
def test_shipped_configs_parse(name):
    cfg = load_yaml(REPO / "configs" / name)
    if name == "p4-2xprovii.yaml":
        assert cfg.model == Path("/models/Qwen3-8B-Q4_K_M.gguf") and cfg.max_ctx == 8192
        assert [str(d) for d in cfg.devices] == ["cuda:0", "hip:0", "hip:1"]
        assert cfg.layer_split == pytest.approx((0.08, 0.46, 0.46)) and cfg.isolate_gpus
        assert cfg.pythons == {"cuda": "/opt/venv-cu/bin/python", "hip": "/opt/venv-rocm/bin/python"}
        assert cfg.shared_bytes is None
    else:
        assert cfg.model is None and cfg.max_ctx == 2048
        assert [str(d) for d in cfg.devices] == ["cpu:0", "cpu:1", "cpu:2"] and cfg.layer_split is None


# -- flags over the file -----------------------------------------------------------------

def test_graphs_and_weights_flags(tmp_path):
    cfg = parse("--no-graphs", "--weights", "quantized", "--config", str(write(tmp_path, "graphs: true\n")))
    assert cfg.graphs is False and cfg.weights == "quantized"


def test_flags_override_the_file(tmp_path, demo_model):
    path = write(tmp_path, DESIGN_EXAMPLE)
    cfg = parse("--config", str(path), "--model", str(demo_model), "--target-gpus", "cpu:0,cpu:1",
                "--max-ctx", "128", "--no-isolate-gpus", "--all-daemons")
    assert cfg.model == demo_model and cfg.max_ctx == 128
    assert cfg.devices == (DeviceSpec("cpu", 0), DeviceSpec("cpu", 1))
    assert cfg.layer_split is None  # the file's split was for the file's devices
    assert not cfg.isolate_gpus and cfg.all_daemons
    assert cfg.pythons == {"cuda": "/opt/venv-cu/bin/python", "hip": "/opt/venv-rocm/bin/python"}  # kept


def test_layer_split_flag_applies_to_the_files_devices(tmp_path, demo_model):
    path = write(tmp_path, f"model: {demo_model}\ntarget:\n  devices: [cpu:0, cpu:1]\n  layer_split: [1, 1]\n"
                           "  isolate_gpus: false\n")
    cfg = parse("--config", str(path), "--layer-split", "1,3", "--isolate-gpus")
    assert cfg.devices == (DeviceSpec("cpu", 0), DeviceSpec("cpu", 1))
    assert cfg.layer_split == pytest.approx((0.25, 0.75)) and cfg.isolate_gpus
    assert parse("--config", str(path)).layer_split == pytest.approx((0.5, 0.5))


def test_model_in_yaml_is_relative_to_the_file(tmp_path, demo_model):
    (tmp_path / "demo.gguf").symlink_to(demo_model)
    cfg = parse("--config", str(write(tmp_path, "model: demo.gguf\n")))
    assert cfg.model == tmp_path / "demo.gguf"


def test_no_file_no_flags_is_the_default_device():
    cfg = parse()
    assert cfg.devices == (default_device(),) and cfg.model is None and cfg.max_ctx == 4096
    assert cfg.shared_bytes is None and cfg.isolate_gpus


@pytest.mark.parametrize("argv,needles", [
    (["--layer-split", "1,1"], ["--layer-split:", "without --target-gpus"]),
    (["--target-gpus", "cpu:0", "--layer-split", "1,2"], ["--layer-split:", "2 weights for 1 devices"]),
    (["--target-gpus", "cpu:0,gpu:1"], ["--target-gpus:", "'gpu'"]),
    (["--max-ctx", "-5"], ["--max-ctx:", "-5"]),
    (["--model", "/nonexistent/x.gguf"], ["model:", "/nonexistent/x.gguf"]),
    (["/a.gguf", "--model", "/b.gguf"], ["--model:", "/a.gguf", "/b.gguf"]),
    (["--weights", "int4"], ["--weights:", "'int4'", "auto, quantized, dequantized"]),
])
def test_bad_flags_name_field_and_value(argv, needles):
    with pytest.raises(ConfigError) as err:
        parse(*argv)
    assert all(n in str(err.value) for n in needles), str(err.value)


def test_model_named_by_the_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="model: .*missing.gguf.* is not a file"):
        parse("--config", str(write(tmp_path, "model: missing.gguf\n")))


# -- SHARDRT_IPC_SHARED_BYTES ------------------------------------------------------------

@pytest.mark.parametrize("value", ["-1", " ", "", "lots", "10", "8 M", "1e6", "²", "0x100000"])
def test_bad_shared_bytes_env(monkeypatch, value):
    monkeypatch.setenv(SHARED_BYTES_ENV, value)
    with pytest.raises(ConfigError) as err:
        parse()
    message = str(err.value)
    assert message.startswith(f"{SHARED_BYTES_ENV}:") and value.strip() in message, message


@pytest.mark.parametrize("value,expected", [("8M", 8 << 20), ("auto", None), ("65536", 65536), (" 1g ", 1 << 30)])
def test_shared_bytes_env_wins_over_the_file(tmp_path, monkeypatch, value, expected):
    monkeypatch.setenv(SHARED_BYTES_ENV, value)
    cfg = parse("--config", str(write(tmp_path, "ipc:\n  shared_bytes: 16M\n")))
    assert cfg.shared_bytes == expected


def test_shared_bytes_bounds():
    assert parse_shared_bytes(config.MIN_SHARED_BYTES, "x") == config.MIN_SHARED_BYTES
    with pytest.raises(ConfigError, match="x: 65535 bytes is too small"):
        parse_shared_bytes(config.MIN_SHARED_BYTES - 1, "x")


# -- the real command line ---------------------------------------------------------------

def shardrt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != SHARED_BYTES_ENV}
    return subprocess.run([sys.executable, "-m", "shardrt.cli", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, env={**environ, **(env or {})}, stdin=subprocess.DEVNULL, cwd=REPO)


def assert_one_error_line(run: subprocess.CompletedProcess, *needles: str) -> None:
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr and run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardrt: error:"), run.stderr
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.mark.parametrize("text,needles", [
    ("target:\n  devices: [cuda:0, hip:0]\n  isolate_gpus: 'yes'\n", ["target.isolate_gpus:", "'yes'"]),
    ("target:\n  devices: [cuda:0\n", ["not valid YAML", "line"]),
    ("ipc:\n  shared_bytes: 100\n", ["ipc.shared_bytes:", "100"]),
])
def test_cli_plan_refuses_a_bad_file(tmp_path, text, needles):
    assert_one_error_line(shardrt("plan", "--config", str(write(tmp_path, text))), *needles)


def test_cli_launch_refuses_bad_gpus_and_env(demo_model):
    run = shardrt("launch", "--model", str(demo_model), "-p", "hi", "-n", "1", "--target-gpus", "cuda:0,,hip:0")
    assert_one_error_line(run, "--target-gpus:", "''")
    run = shardrt("launch", "--model", str(demo_model), "-p", "hi", "-n", "1", env={SHARED_BYTES_ENV: "lots"})
    assert_one_error_line(run, SHARED_BYTES_ENV, "'lots'")


def test_cli_plan_json_on_the_demo_model(demo_model):
    from shardrt.devices import discover

    run = shardrt("plan", str(demo_model), "--target-gpus", "cuda:0,hip:0,hip:1", "--layer-split", "0.08,0.46,0.46",
                  "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["model"] == str(demo_model) and out["layers"] == 30  # SmolLM2-135M
    hip = lambda ids: {"HIP_VISIBLE_DEVICES": ids, "ROCR_VISIBLE_DEVICES": ids}  # noqa: E731
    # 0.08 * 30 = 2.4 -> 2; 0.54 * 30 = 16.2 -> 16
    assert [(s["device"], s["backend"], s["process"], s["local_device"], s["pinned_env"], s["layers"], s["python"])
            for s in out["shards"]] == [
        ("cuda:0", "cuda", "coordinator", 0, {}, "[0,2)+embed", "coordinator"),
        ("hip:0", "hip", "daemon 1", 0, hip("0"), "[2,16)", "this interpreter"),
        ("hip:1", "hip", "daemon 2", 0, hip("1"), "[16,30)+head", "this interpreter"),
    ]
    assert all(s["weight_bytes"] > 0 and s["cover"].startswith("span cover") for s in out["shards"])
    # the embedding and head dominate this small model, so the last shard maps the most
    assert out["shards"][2]["weight_bytes"] > out["shards"][1]["weight_bytes"]
    # weights: auto keeps the blocks on GPUs (the kernels run there, as far as this machine can
    # tell): as stored, the norms in bf16
    assert all(s["device_weight_bytes"] <= s["weight_bytes"] and s["weights_held"] == "blocks" for s in out["shards"])
    dense = json.loads(shardrt("plan", str(demo_model), "--target-gpus", "cuda:0,hip:0,hip:1", "--layer-split",
                               "0.08,0.46,0.46", "--weights", "dequantized", "--json").stdout)["shards"]
    # dequantized to bf16 on a GPU: Q4_1 blocks grow ~3.2x, the Q8_0 embedding ~1.9x
    assert all(1.8 * s["weight_bytes"] < s["device_weight_bytes"] < 3.5 * s["weight_bytes"] for s in dense)
    assert all(s["weights_held"] == "dense" for s in dense)
    present = {str(d.spec) for d in discover()}
    assert out["missing"] == [d for d in ("cuda:0", "hip:0", "hip:1") if d not in present]


def test_cli_plan_shipped_config_with_demo_model(demo_model):
    run = shardrt("plan", "--config", "configs/p4-2xprovii.yaml", "--model", str(demo_model), "--no-isolate-gpus",
                  "--json")
    assert run.returncode == 0, run.stderr
    shards = json.loads(run.stdout)["shards"]
    assert [(s["process"], s["python"], s["pinned_env"].get("HIP_VISIBLE_DEVICES"), s["local_device"])
            for s in shards] == [
        ("coordinator", "coordinator", None, 0),
        ("daemon 1", "/opt/venv-rocm/bin/python", "0,1", 0),
        ("daemon 1", "/opt/venv-rocm/bin/python", "0,1", 1),
    ]
    # without --model, the file's model is used and it does not exist here
    assert_one_error_line(shardrt("plan", "--config", "configs/p4-2xprovii.yaml"), "/models/Qwen3-8B-Q4_K_M.gguf")


def test_draft_section_parses(tmp_path):
    from shardrt.config import load_yaml

    path = tmp_path / "spec.yaml"
    path.write_text("draft:\n  kind: model\n  model: draft.gguf\n  device: hip:1\n  tokens: 6\n")
    draft = load_yaml(path).draft
    assert (draft.kind, draft.model, str(draft.device), draft.tokens) == ("model", tmp_path / "draft.gguf", "hip:1", 6)
