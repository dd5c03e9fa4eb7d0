#!/usr/bin/env bash
# The prepared GPU check, in one command of at most 9 minutes (README, "GPUs"):
#
#   tools/gpu_check.sh --quick    # smoke, then 1-stream decode on the 8B-shaped model (about 4 min)
#   tools/gpu_check.sh --full     # smoke, GPU tests, decode at 1/64/256 streams + TTFT, one served chat
#   tools/gpu_check.sh --full --shape tiny   # the same steps on a CPU (kernel interpreted): the script's own check
#
# Each step has its own time budget (the sum under 540 s) and its output goes to the terminal
# and to $OUT/<step>.log as it runs (OUT defaults to /tmp/gpu-check), so a step that runs out
# of time still leaves every figure printed before it. The smoke comes first and takes
# seconds: devices, versions, and the attention kernel against the XLA gather at the model's
# attention shapes, decode and prefill. The last line lists each step's time against its budget.
# Python packages the machine lacks come from .whl/ (tools/gpu_wheels.py, run where PyPI is;
# carry .whl with the working tree).
set -u
cd "$(dirname "$0")/.."
mode=full shape=8b
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) mode=quick ;;
    --full) mode=full ;;
    --shape) shift; shape=${1:?--shape needs 8b or tiny} ;;
    *) echo "usage: $0 [--quick|--full] [--shape 8b|tiny]" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 XLASERVE_CACHE=${XLASERVE_CACHE:-/tmp/xlaserve-cache}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xlaserve-site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/xlaserve-site:$PWD
else
  export PYTHONPATH=$PWD
fi
platform_env=()
[ "$shape" = tiny ] && platform_env=(JAX_PLATFORMS=cpu)
status=0 summary=""
start=$(date +%s)

# step NAME BUDGET_SECONDS COMMAND...: run it under its budget, its output teed to $OUT/NAME.log.
step() {
  local name=$1 budget=$2; shift 2
  echo; echo "== $name (budget ${budget}s, $(date +%T))"
  local t0=$(date +%s)
  env "${platform_env[@]}" timeout "$budget" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]} took=$(( $(date +%s) - t0 ))
  local how=ok
  if [ "$rc" = 124 ]; then how="TIMED OUT"; status=1; elif [ "$rc" != 0 ]; then how="FAILED ($rc)"; status=1; fi
  echo "-- $name: $how in ${took}s"
  summary="$summary $name=${took}s/${budget}s:${how// /_}"
}

echo "== gpu_check --$mode --shape $shape ($(date -u +%FT%TZ))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step smoke 60 $PY tools/bench_gpu.py --shape "$shape" --parts versions,kernel
if [ "$mode" = quick ]; then
  step decode1 150 $PY tools/bench_gpu.py --shape "$shape" --parts bounds,decode --streams 1
else
  tests_env=()
  [ "$shape" = 8b ] && tests_env=(JAX_PLATFORMS=cuda)
  step tests 120 env "${tests_env[@]}" $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_kernel.py
  step bench 200 $PY tools/bench_gpu.py --shape "$shape" --parts bounds,decode,ttft
  step serve 150 $PY tools/gpu_serve_check.py --max-batch-size 4 --session-len 512
fi
echo
echo "== done in $(( $(date +%s) - start ))s: $([ $status = 0 ] && echo all passed || echo some steps FAILED)"
echo "steps:$summary"
exit $status
