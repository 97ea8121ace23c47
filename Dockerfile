# One Dockerfile, one target per service:
#   docker build --target gateway -t charai/gateway .
# Targets: task_store, gateway, image_worker, tts_worker, webhook_sender, emulator (the same names as the
# `charai.<target>` modules they run). compose.yaml builds them all.
#
# Why this shape: each image holds one self-contained virtualenv with only its own package and
# dependencies, installed from the committed uv.lock (--frozen: the lock is never re-resolved
# here). Workspace members are installed as wheels (--no-editable), so the runtime stages need
# the venv and nothing else from the source tree. Only plain Dockerfile syntax is used (no
# BuildKit-only features), so the classic builder works too.

# The builder and the runtime must share the interpreter: the venv links to its python.
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# builder: uv plus every pyproject.toml and the lock. Dependencies are installed from these
# alone, so that layer is rebuilt only when the lock or a pyproject changes, not on code edits.
FROM ${PYTHON_IMAGE} AS builder
RUN pip install --no-cache-dir uv==0.13.9
ENV UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
WORKDIR /src
# uv reads every member's pyproject.toml to load the workspace, even for one --package.
COPY pyproject.toml uv.lock ./
COPY protos/pyproject.toml protos/
COPY libs/core/pyproject.toml libs/core/
COPY libs/worker/pyproject.toml libs/worker/
COPY services/task_store/pyproject.toml services/task_store/
COPY services/gateway/pyproject.toml services/gateway/
COPY services/image_worker/pyproject.toml services/image_worker/
COPY services/tts_worker/pyproject.toml services/tts_worker/
COPY services/webhook_sender/pyproject.toml services/webhook_sender/
COPY services/emulator/pyproject.toml services/emulator/
COPY clients/python/pyproject.toml clients/python/
COPY tools/devstack/pyproject.toml tools/devstack/

# One build stage per service, each in two steps: third-party dependencies first
# (--no-install-workspace, cached until the lock changes), then the sources it needs and the
# workspace members themselves.

FROM builder AS task_store-build
RUN uv sync --frozen --no-dev --no-editable --no-install-workspace --package charai-task-store
COPY protos/ protos/
COPY libs/core/ libs/core/
COPY services/task_store/ services/task_store/
RUN uv sync --frozen --no-dev --no-editable --package charai-task-store

FROM builder AS gateway-build
RUN uv sync --frozen --no-dev --no-editable --no-install-workspace --package charai-gateway
COPY protos/ protos/
COPY libs/core/ libs/core/
COPY services/gateway/ services/gateway/
RUN uv sync --frozen --no-dev --no-editable --package charai-gateway

FROM builder AS image_worker-build
RUN uv sync --frozen --no-dev --no-editable --no-install-workspace --package charai-image-worker
COPY protos/ protos/
COPY libs/core/ libs/core/
COPY libs/worker/ libs/worker/
COPY services/image_worker/ services/image_worker/
RUN uv sync --frozen --no-dev --no-editable --package charai-image-worker

FROM builder AS tts_worker-build
RUN uv sync --frozen --no-dev --no-editable --no-install-workspace --package charai-tts-worker
COPY protos/ protos/
COPY libs/core/ libs/core/
COPY libs/worker/ libs/worker/
COPY services/tts_worker/ services/tts_worker/
RUN uv sync --frozen --no-dev --no-editable --package charai-tts-worker

FROM builder AS webhook_sender-build
RUN uv sync --frozen --no-dev --no-editable --no-install-workspace --package charai-webhook-sender
COPY protos/ protos/
COPY libs/core/ libs/core/
COPY libs/worker/ libs/worker/
COPY services/webhook_sender/ services/webhook_sender/
RUN uv sync --frozen --no-dev --no-editable --package charai-webhook-sender

FROM builder AS emulator-build
RUN uv sync --frozen --no-dev --no-editable --no-install-workspace --package charai-emulator
COPY services/emulator/ services/emulator/
RUN uv sync --frozen --no-dev --no-editable --package charai-emulator

# ---------------------------------------------------------------------------------------------
# runtime: the bare interpreter and an unprivileged user. The venv is copied in as root-owned,
# so the service cannot modify its own code; it may write only to CHARAI_DATA_DIR.
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 charai \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin charai \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/charai
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHARAI_DATA_DIR=/var/lib/charai
WORKDIR /app
USER 10001:10001

# ---------------------------------------------------------------------------------------------
# Health checks read the port from the same CHARAI_* variable the service listens on, so they
# keep working when compose changes the address. They call 127.0.0.1: fine for 0.0.0.0 binds.

FROM runtime AS task_store
COPY --from=task_store-build /app/.venv /app/.venv
EXPOSE 50052
# gRPC health (grpc.health.v1 needs no internal token).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
port = os.environ.get('CHARAI_TASK_STORE_ADDR', ':50052').rpartition(':')[2]; \
reply = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + port)).Check(h.HealthCheckRequest(), timeout=3); \
raise SystemExit(reply.status != h.HealthCheckResponse.SERVING)"]
CMD ["python", "-m", "charai.task_store"]

FROM runtime AS gateway
COPY --from=gateway-build /app/.venv /app/.venv
# 50051: gRPC (HTTP/2). 8080: gRPC-web, REST, /media, /healthz (HTTP/1.1).
EXPOSE 50051 8080
# Both ports: gRPC health on the gRPC port, and /healthz (503 while NATS is disconnected).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, grpc, urllib.request; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
port = lambda name, default: os.environ.get(name, default).rpartition(':')[2]; \
reply = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + port('CHARAI_GATEWAY_GRPC_ADDR', ':50051'))).Check(h.HealthCheckRequest(), timeout=3); \
urllib.request.urlopen('http://127.0.0.1:' + port('CHARAI_GATEWAY_HTTP_ADDR', ':8080') + '/healthz', timeout=3); \
raise SystemExit(reply.status != h.HealthCheckResponse.SERVING)"]
CMD ["python", "-m", "charai.gateway"]

# The workers listen on no port, so the only check they offer is that the process is alive.
# That is weak (PID 1 exiting stops the container anyway) but keeps `docker ps` uniform; a real
# readiness probe needs a health endpoint in the worker (not built yet).

FROM runtime AS image_worker
COPY --from=image_worker-build /app/.venv /app/.venv
HEALTHCHECK --interval=30s --timeout=5s --retries=3 CMD ["python", "-c", "import os; os.kill(1, 0)"]
CMD ["python", "-m", "charai.image_worker"]

FROM runtime AS tts_worker
COPY --from=tts_worker-build /app/.venv /app/.venv
HEALTHCHECK --interval=30s --timeout=5s --retries=3 CMD ["python", "-c", "import os; os.kill(1, 0)"]
CMD ["python", "-m", "charai.tts_worker"]

FROM runtime AS webhook_sender
COPY --from=webhook_sender-build /app/.venv /app/.venv
HEALTHCHECK --interval=30s --timeout=5s --retries=3 CMD ["python", "-c", "import os; os.kill(1, 0)"]
CMD ["python", "-m", "charai.webhook_sender"]

# The provider emulator (a local Zhipu look-alike for demos and load tests, never production).
FROM runtime AS emulator
COPY --from=emulator-build /app/.venv /app/.venv
# Its own default is 127.0.0.1 and a random port, which nothing outside the container can reach.
ENV CHARAI_EMULATOR_ADDR=0.0.0.0:8090
EXPOSE 8090
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; \
port = os.environ.get('CHARAI_EMULATOR_ADDR', ':8090').rpartition(':')[2]; \
urllib.request.urlopen('http://127.0.0.1:' + port + '/healthz', timeout=3)"]
CMD ["python", "-m", "charai.emulator"]
