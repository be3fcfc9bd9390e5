# syntax=docker/dockerfile:1
# The worker image: CUDA base, a pinned torch and the [worker] extra; flash-attn only when built with
# --build-arg WITH_FLASH_ATTN=1 (it compiles from source, hence the devel build stage; without it the
# engine uses SDPA). Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t layerkv/worker:0.1.0 .
#   docker build -f deploy/docker/worker.Dockerfile --build-arg WITH_FLASH_ATTN=1 -t layerkv/worker:0.1.0-fa .
# Every setting is a flag or a LAYERKV_* environment variable (docs/cli-contract.md).
ARG CUDA_VERSION=12.8.1
ARG BASE_OS=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${BASE_OS} AS build
# Pinned: an unpinned torch may resolve to a build for another CUDA or a different engine ABI.
ARG TORCH_VERSION=2.13.0
ARG WITH_FLASH_ATTN=0
ARG FLASH_ATTN_SPEC="flash-attn>=2.5"
# Compute capabilities compiled into flash-attn (A100, H100); fewer is faster to build.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
ARG MAX_JOBS=4
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY scheduler_svc ./scheduler_svc
COPY worker_svc ./worker_svc
COPY layerkv ./layerkv
# One resolver run, so the pin also satisfies the [worker] extra's torch requirement.
RUN pip install "torch==${TORCH_VERSION}" ".[worker]"
RUN if [ "${WITH_FLASH_ATTN}" = "1" ]; then \
      pip install setuptools wheel ninja packaging psutil \
      && TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS="${MAX_JOBS}" \
         pip install --no-build-isolation "${FLASH_ATTN_SPEC}"; \
    fi

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${BASE_OS}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 layerkv \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin layerkv
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/layerkv/healthcheck.py
# HOME=/tmp: torch/triton caches go to the writable /tmp volume (the root filesystem is read-only
# under the Helm chart).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LAYERKV_PORT=50061 \
    LAYERKV_DEVICE=cuda
USER 10001:10001
EXPOSE 50061 9091
# Loading a large model takes minutes: a long start period before failures count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "/opt/layerkv/healthcheck.py"]
ENTRYPOINT ["layerkv", "worker"]
CMD []
