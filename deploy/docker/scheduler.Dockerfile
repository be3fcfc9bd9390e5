# syntax=docker/dockerfile:1
# The scheduler image: CPU only and torch-free (`pip install .` takes the core dependencies, none of
# which is torch). Build from the repository root:
#   docker build -f deploy/docker/scheduler.Dockerfile -t layerkv/scheduler:0.1.0 .
# Every setting is a flag or a LAYERKV_* environment variable (docs/cli-contract.md).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY scheduler_svc ./scheduler_svc
COPY worker_svc ./worker_svc
COPY layerkv ./layerkv
# Core dependencies only (no [worker] extra); fail the build if anything dragged torch in.
RUN pip install . \
 && python -c "import importlib.util, sys; sys.exit('torch must not be in the scheduler image' if importlib.util.find_spec('torch') else 0)"

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 layerkv \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin layerkv
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/layerkv/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LAYERKV_PORT=50051
# Numeric user, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "/opt/layerkv/healthcheck.py"]
ENTRYPOINT ["layerkv", "scheduler"]
CMD []
