#!/usr/bin/env bash
# The GPU check of lightning-sae: one script, at most 8 minutes on one H100 (every step has its own
# time limit; together they add up to 475 s). Run it as is on a machine with one CUDA GPU:
#
#     tools/gpu_check.sh                      # writes gpu_check/gpu_check.md (one markdown table)
#     tools/gpu_check.sh --out DIR            # elsewhere
#     tools/gpu_check.sh --dry-run --model PATH --dataset PATH   # the same steps on the CPU, toy sizes
#
# Steps (tools/gpu_check.py has each one):
#   prepare      the device, torch and triton versions; the embedded model converted and loaded once
#   fit VARIANT  a bf16-mixed fit on CUDA through the CLI, streamed activations, tiny budget:
#                TopK, g-SAE, BatchTopK, JSAE, a transcoder (their configs/*.yaml), with peak memory
#   bench.py     tools/bench.py --device cuda --dtype bf16 against sparsify, with its Triton decoder
#                (triton is installed first where CUDA exists) and without it (SPARSIFY_DISABLE_TRITON=1)
#   stream       a streaming TopK fit's rows/s against a bare forward truncated at its layer
#   ddp          strategy ddp on one GPU (process group, DDP wrapper, the rank's share of the stream)
# A step that fails or runs out of time is a row saying so; the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=()
OUT=gpu_check
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=(--dry-run) ;;
    --out) OUT=$2; shift ;;
    --model|--dataset) PASS+=("$1" "$2"); shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
: > "$OUT/steps.log"
# A dry run on a shared CPU is slower than an H100: its limits stretch (GPU_CHECK_LIMIT_SCALE).
SCALE=${GPU_CHECK_LIMIT_SCALE:-$([ ${#DRY[@]} -gt 0 ] && echo 10 || echo 1)}

if [ ${#DRY[@]} -eq 0 ]; then
  if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: tools/gpu_check.sh --dry-run checks the script on the CPU" >&2
    exit 2
  fi
  # sparsify uses its Triton decoder when triton imports; torch's CUDA wheels usually bring it.
  $PY -c "import triton" 2>/dev/null || $PY -m pip install -q triton || echo "triton could not be installed" >&2
fi

step() {  # step LIMIT_SECONDS ARGS...: one process per step, its failure a row of the table
  local limit=$(( $1 * SCALE )) status
  shift
  timeout "$limit" $PY tools/gpu_check.py "$@" "${DRY[@]}" --out "$OUT" "${PASS[@]}" > "$OUT/step.log" 2>&1
  status=$?
  if [ $status -ne 0 ]; then
    local why="exit $status"
    [ $status -eq 124 ] && why="stopped at its time limit of $limit s"
    $PY -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "ok": False, "error": sys.argv[2] + ": " + sys.argv[3][-300:]}))' \
      "$*" "$why" "$(grep -v "^\s*$" "$OUT/step.log" | tail -n 1)" >> "$OUT/results.jsonl"
  fi
  cat "$OUT/step.log" >> "$OUT/steps.log"
}

started=$(date +%s)
step 75 prepare
for variant in topk gsae batch_topk jsae transcoder; do
  step 45 fit "$variant"
done
step 50 bench --triton on
step 50 bench --triton off
step 45 stream
step 30 ddp
$PY tools/gpu_check.py table --out "$OUT" > "$OUT/gpu_check.md"
echo "total $(( $(date +%s) - started )) s" >> "$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
