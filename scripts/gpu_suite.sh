#!/usr/bin/env bash
# On a machine with one CUDA GPU: the GPU tests, then the benchmarks that set shardrt beside
# llama.cpp on the same random-weight files, each benchmark's JSON line appended to OUT/results.jsonl.
#
#   bash scripts/gpu_suite.sh OUT [LLAMA_BIN] [TOKENIZER_GGUF]
#
# LLAMA_BIN: a folder with llama.cpp's llama-bench and llama-server (built with CUDA); without it
# shardrt runs alone. TOKENIZER_GGUF: a GGUF whose tokenizer the random files take (default: the
# demo model, fetched once). Files are written under OUT/models and removed at the end (~42 GiB at
# most at once). Each step has its own time limit; a step that fails is logged and the next runs.
set -u
OUT=${1:?usage: gpu_suite.sh OUT [LLAMA_BIN] [TOKENIZER_GGUF]}
LLAMA=${2:-}
TOKENIZER=${3:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUT/models"
M=$OUT/models
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt"; }
tok=(); [ -n "$TOKENIZER" ] && tok=(--tokenizer-from "$TOKENIZER")
bench=(); [ -n "$LLAMA" ] && bench=(--llama-bench "$LLAMA/llama-bench")
server=(); [ -n "$LLAMA" ] && server=(--llama-server "$LLAMA/llama-server" --llama-slots 64)

log "GPU tests"
timeout 900 python3 -m pytest -v -p no:cacheprovider --timeout 300 -k "gpu or graph or cuda" \
  tests/test_moe_mmq.py tests/test_mmq.py tests/test_moe_qdot.py tests/test_moe.py tests/test_qwen35.py \
  tests/test_gpt_oss.py tests/test_gemma3.py tests/test_qdot.py tests/test_quant.py tests/test_kernels.py tests/test_gpu.py \
  > "$OUT/tests.txt" 2>&1
log "tests: exit $? ($(grep -cE ' PASSED' "$OUT/tests.txt") passed, $(grep -cE ' FAILED| ERROR' "$OUT/tests.txt") failed)"

log "decode and prefill: MoE and hybrid Q4_K_M"
timeout 1200 python3 scripts/bench_quant.py --shape qwen3-30b-a3b,qwen3.6-27b --types q4_k_m --placements one \
  --decode-tokens 64 --profile --keep "$M" "${tok[@]}" "${bench[@]}" >> "$OUT/results.jsonl" 2>> "$OUT/log.txt"
log "exit $?"; rm -f "$M"/random-qwen3*.gguf

log "decode and prefill: Llama-3 8B Q4_K_M and Q8_0"
timeout 900 python3 scripts/bench_quant.py --types q4_k_m,q8_0 --placements one --profile --keep "$M" "${tok[@]}" \
  "${bench[@]}" >> "$OUT/results.jsonl" 2>> "$OUT/log.txt"
log "exit $?"
Q4=$M/random-llama3-8b-32l-q4_k_m.gguf

log "serve: Q4_K_M 8B at concurrency 1 and 16 (the first 16 warms the shapes)"
timeout 900 python3 scripts/bench_serve.py --concurrency 1,16,16 --requests 32 --max-tokens 64 "${server[@]}" \
  -- "$Q4" --target-gpus cuda:0 --max-seqs 64 --max-ctx 2048 --step-log "$OUT/serve_steps.jsonl" \
  >> "$OUT/results.jsonl" 2>> "$OUT/log.txt"
log "exit $?"

log "serve: bursts of 64 behind one 1000-token system prompt (cold, then warm)"
timeout 600 python3 scripts/bench_serve.py --burst --concurrency 1,64,1,64 --shared-prefix 1000 --max-tokens 32 \
  -- "$Q4" --target-gpus cuda:0 --max-seqs 64 --max-ctx 2048 --step-log "$OUT/burst_steps.jsonl" \
  >> "$OUT/results.jsonl" 2>> "$OUT/log.txt"
log "exit $?"
rm -rf "$M"
log "done: $OUT/results.jsonl"
