#!/usr/bin/env bash
# Run here (where PyPI is reachable), before a GPU check: the wheels of what xlaserve needs and
# the GPU machine's image lacks (it has JAX with CUDA, flax, orbax, tokenizers, safetensors,
# jinja2, prometheus-client, httpx and pytest), for its Python 3.12, into .whl/ (git-ignored
# locally). tools/gpu_check.sh installs them from there. About 10 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
mkdir -p .whl
for p in gguf litestar litestar-htmx msgspec multipart polyfactory faker rich-click sniffio uvicorn \
         swagger-ui-bundle llguidance; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$p"
done
du -sh .whl
