#!/usr/bin/env bash
# On a machine with one CUDA GPU: the GPU tests, then the benchmarks that set shardrt beside
# llama.cpp on the same random-weight files, each benchmark's JSON line appended to OUT/results.jsonl,
# most wanted first, each step within what is left of a time budget.
#
#   bash scripts/gpu_suite.sh OUT [LLAMA] [TOKENIZER_GGUF] [BUDGET_S]
#
# LLAMA: a folder with llama.cpp's llama-bench and llama-server built with CUDA (bin/), or the
# folder of its build script and source (build_llama_cpp.sh), built here (under /tmp) in the
# background on all but four cores while the tests run; without it shardrt runs alone. TOKENIZER_GGUF: a GGUF whose
# tokenizer the random files take (default: the demo model, fetched once). BUDGET_S (default 3600):
# a step starts only with enough of it left, and is stopped when it runs out. TESTS_S in the environment
# (default 900) bounds the GPU tests (GPU_TESTS: their files, default all those with GPU tests), which go first, the per-type ones last (those under
# Triton's interpreter are left to the CPU runs). STEPS (default all) picks steps by name, comma-separated:
# tests, pflash, serve, moe, qwen35, 8b, burst. The files are written
# under OUT/models, beside the tests, and removed at the end (~34 GiB at most at once).
set -u
OUT=${1:?usage: gpu_suite.sh OUT [LLAMA] [TOKENIZER_GGUF] [BUDGET_S]}
LLAMA=${2:-}
TOKENIZER=${3:-}
T0=$(date +%s); END=$(( T0 + ${4:-3600} ))
cd "$(dirname "$0")/.."
M=$OUT/models; mkdir -p "$M"
export PYTHONUNBUFFERED=1
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/log.txt"; }
left() {  # a step's limit: its own, or what is left of the budget (at least a second)
  local l=$(( END - $(date +%s) - 15 )); [ $l -lt 1 ] && l=1; [ $l -lt $1 ] && echo $l || echo $1; }
# four cores for the tests and the timed runs, the rest for building llama.cpp (not on a small machine)
SOME=(); REST=()
[ "$(nproc)" -ge 8 ] && SOME=(taskset -c 0-3) && REST=(taskset -c 4-$(( $(nproc) - 1 )))
enough() { [ $(( END - $(date +%s) )) -gt $1 ] || { log "skipped: $2 (too little time left)"; return 1; }; }
chosen() { [[ ",${STEPS:-all}," == *,all,* || ",${STEPS:-all}," == *",$1,"* ]]; }
want() { chosen "$1" || { log "left out: $1 (STEPS)"; return 1; }; }
tok=(); [ -n "$TOKENIZER" ] && tok=(--tokenizer-from "$TOKENIZER")

BIN=; BUILD=
if [ -z "$LLAMA" ]; then log "no llama.cpp given: shardrt runs alone"
elif [ -x "$LLAMA/bin/llama-bench" ]; then BIN=$LLAMA/bin
elif [ -f "$LLAMA/build_llama_cpp.sh" ]; then
  BIN=/tmp/shardrt-llama/bin
  ("${REST[@]}" timeout 1200 bash "$LLAMA/build_llama_cpp.sh" /tmp/shardrt-llama > "$OUT/llama_build.txt" 2>&1
   log "llama.cpp build: exit $?") &
  BUILD=$!
else log "$LLAMA holds neither bin/llama-bench nor build_llama_cpp.sh: shardrt runs alone"
fi
peer() {  # waits for the build (if any) and says whether llama.cpp's tools are there
  [ -n "$BUILD" ] && { wait "$BUILD"; BUILD=; }
  [ -n "$BIN" ] && [ -x "$BIN/llama-bench" ]
}

Q4=$M/random-llama3-8b-32l-q4_k_m.gguf
# written beside the tests (their random numbers drawn on the GPU too: the tests are not timed)
write() { python3 scripts/make_gguf.py "$@" "${tok[@]}" > /dev/null 2>> "$OUT/log.txt"; }
(if chosen pflash; then
   write "$M/bf16.gguf" --shape llama3-8b --type bf16 --ctx 32768
   write "$M/draft.gguf" --shape smollm2-135m --type bf16 --ctx 32768; fi
 write "$Q4" --shape llama3-8b --type q4_k_m) &
FILES=$!

log "GPU tests"
want tests && "${SOME[@]}" timeout "$(left "${TESTS_S:-900}")" python3 -m pytest -v -rA -p no:cacheprovider --timeout 300 -k "(gpu or graph or cuda) and not interpreter" \
  ${GPU_TESTS:-tests/test_gpu.py tests/test_qdot.py tests/test_mmq.py tests/test_moe_mmq.py tests/test_moe_qdot.py \
  tests/test_moe.py tests/test_qwen35.py tests/test_gpt_oss.py tests/test_gemma3.py tests/test_kernels.py tests/test_quant.py} \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.txt" 2>&1
log "tests: exit $? ($(grep -cE ' PASSED' "$OUT/tests.txt") passed, $(grep -cE ' FAILED| ERROR' "$OUT/tests.txt") failed)"
wait $FILES
peer; PEER=$?  # every timed step runs once the build is done: it would take their host cores

log "PFlash: a 16K prompt, bf16 8B target, a random drafter of the demo model's shape, both on cuda:0"
want pflash && enough 150 pflash && timeout "$(left 300)" python3 scripts/bench_pflash.py --model "$M/bf16.gguf" --drafter "$M/draft.gguf" \
  --target-gpus cuda:0 --pflash-gpu cuda:0 --lengths 16384 --depths 0.1,0.5,0.9 >> "$OUT/results.jsonl" 2>> "$OUT/log.txt"
log "exit $?"; rm -f "$M/bf16.gguf" "$M/draft.gguf"

server=(); [ $PEER = 0 ] && server=(--llama-server "$BIN/llama-server" --llama-slots 64)
log "serve: Q4_K_M 8B at concurrency 1 and 16 (the first 16 warms the shapes)"
want serve && enough 150 serve && timeout "$(left 600)" python3 scripts/bench_serve.py --concurrency 1,16,16 --requests 32 --max-tokens 64 \
  "${server[@]}" -- "$Q4" --target-gpus cuda:0 --max-seqs 64 --max-ctx 2048 --step-log "$OUT/serve_steps.jsonl" \
  >> "$OUT/results.jsonl" 2>> "$OUT/log.txt"
log "exit $?"

bench=(); [ $PEER = 0 ] && bench=(--llama-bench "$BIN/llama-bench")
for step in moe:qwen3-30b-a3b qwen35:qwen3.6-27b; do
  shape=${step#*:}; log "decode and prefill: $shape Q4_K_M"
  want ${step%%:*} && enough 250 "$shape" && timeout "$(left 900)" python3 scripts/bench_quant.py --shape $shape --types q4_k_m --placements one \
    --decode-tokens 64 --profile --keep "$M" "${tok[@]}" "${bench[@]}" >> "$OUT/results.jsonl" 2>> "$OUT/log.txt"
  log "exit $?"; rm -f "$M"/random-qwen3*.gguf
done

log "decode and prefill: Llama-3 8B Q4_K_M and Q8_0"
want 8b && enough 200 8B && timeout "$(left 900)" python3 scripts/bench_quant.py --types q4_k_m,q8_0 --placements one --profile --keep "$M" \
  "${tok[@]}" "${bench[@]}" >> "$OUT/results.jsonl" 2>> "$OUT/log.txt"
log "exit $?"

log "serve: bursts of 64 behind one 1000-token system prompt (cold, then warm)"
want burst && enough 120 burst && timeout "$(left 600)" python3 scripts/bench_serve.py --burst --concurrency 1,64,1,64 --shared-prefix 1000 \
  --max-tokens 32 -- "$Q4" --target-gpus cuda:0 --max-seqs 64 --max-ctx 2048 --step-log "$OUT/burst_steps.jsonl" \
  >> "$OUT/results.jsonl" 2>> "$OUT/log.txt"
log "exit $?"
rm -rf "$M"
log "done: $OUT/results.jsonl"
