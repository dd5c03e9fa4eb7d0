#!/usr/bin/env bash
# The prepared GPU check, under 8 minutes on one H100 or H200 (README, "GPUs"):
#   1. the GPU-marked tests, the attention kernel compiled (not interpreted);
#   2. tools/bench_gpu.py: decode throughput at 1, 64 and 256 streams on a random Llama-3-8B-shaped
#      model in bfloat16 as fractions of the HBM and bf16 matmul bounds measured in the same run,
#      TTFT of a 2k-token prompt, the kernel against the XLA gather (time, max abs difference);
#   3. tools/gpu_serve_check.py: a server started and one chat completion over HTTP;
#   and with several GPUs, 2 and 3 again at --tp over all of them.
# Python packages the machine lacks come from .whl/ (tools/gpu_wheels.sh, run where PyPI is).
# Exits non-zero when any part fails; every part still runs.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLASERVE_CACHE=${XLASERVE_CACHE:-/tmp/xlaserve-cache}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xlaserve-site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/xlaserve-site:$PWD
else
  export PYTHONPATH=$PWD
fi
status=0
part() { echo; echo "== $1 ($(date +%T))"; }
step() { "$@" || { echo "FAILED ($?): $*"; status=1; }; }

part "devices"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1
gpus=$($PY -c "import jax; print(len(jax.devices()))")

part "GPU-marked tests, the kernel compiled"
step env JAX_PLATFORMS=cuda timeout 180 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_kernel.py

part "decode throughput, TTFT, kernel against the XLA gather (one GPU)"
step timeout 300 $PY tools/bench_gpu.py

part "served end to end (one GPU)"
step timeout 240 $PY tools/gpu_serve_check.py

if [ "$gpus" -gt 1 ]; then
  part "the same at --tp $gpus"
  step timeout 300 $PY tools/bench_gpu.py --tp "$gpus"
  step timeout 240 $PY tools/gpu_serve_check.py --tp "$gpus"
fi
part "done: $([ $status = 0 ] && echo all passed || echo some parts FAILED)"
exit $status
