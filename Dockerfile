# pagedserve images.
#
# CPU (default):
#   docker build -t pagedserve:0.1.0-cpu .
#   elsewhere than a machine with a local CPU wheel, take torch from PyTorch's CPU wheel index:
#   docker build --build-arg TORCH_INDEX_URL=<PyTorch CPU wheel index URL> -t pagedserve:0.1.0-cpu .
# CUDA:
#   docker build --build-arg DEVICE=cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 -t pagedserve:0.1.0-cuda .
#
# Run the built-in demo model (baked in at build time, so it starts offline):
#   docker run --rm -p 8000:8000 pagedserve:0.1.0-cpu
# Serve a Hub model (weights cached under the /data/hf volume):
#   docker run --rm -p 8000:8000 -v hf:/data/hf -e HF_TOKEN pagedserve:0.1.0-cpu \
#     Qwen/Qwen2.5-0.5B-Instruct --host 0.0.0.0 --port 8000

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- base: Python, shared by the build and the runtime stages -------------------------------
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
SHELL ["/bin/sh", "-eu", "-c"]
# CUDA base images come without Python: add the distribution's (any version the base has).
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi

# ---- build: a virtualenv with torch, pagedserve and the demo model ---------------------------
FROM base AS build
# torch requirement and an optional index for it (e.g. PyTorch's CPU wheel index, so that no
# CUDA build is pulled into a CPU image). On the CUDA path the default PyPI build carries CUDA.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The version is pinned, in TORCH_SPEC, where hadolint cannot see it.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kernels ./kernels
COPY server ./server
# The demo model is built as root and read by the runtime user: make it world-readable.
RUN pip install --no-cache-dir . \
    && pagedserve make-demo-model /opt/pagedserve/demo-model \
    && chmod -R a+rX /opt/pagedserve \
    && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

# ---- runtime ------------------------------------------------------------------------------
FROM base AS runtime
ARG DEVICE=cpu
LABEL org.opencontainers.image.title="pagedserve" \
      org.opencontainers.image.description="OpenAI-compatible LLM inference server (${DEVICE})" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 1000 pagedserve \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/pagedserve --shell /usr/sbin/nologin pagedserve \
    && mkdir -p /data/hf \
    && chown 1000:1000 /data/hf
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/pagedserve /opt/pagedserve
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/data/hf \
    PAGEDSERVE_HOME=/opt/pagedserve \
    PAGEDSERVE_IMAGE_DEVICE=${DEVICE} \
    PAGEDSERVE_HEALTHCHECK_URL=http://127.0.0.1:8000/health
VOLUME ["/data/hf"]
USER 1000:1000
WORKDIR /home/pagedserve
EXPOSE 8000
# Serving on another port? Set PAGEDSERVE_HEALTHCHECK_URL to match (Kubernetes ignores HEALTHCHECK).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['PAGEDSERVE_HEALTHCHECK_URL'], timeout=4)"]
# Exec form: the server is PID 1 and gets SIGTERM itself (it drains, then exits 0).
ENTRYPOINT ["pagedserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
