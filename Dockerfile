# syntax=docker/dockerfile:1
# mq9 broker image.
#
#   docker build -t mq9 .
#   docker run -d -p 4222:4222 -v mq9-data:/data mq9
#
# NATS clients on 4222, Prometheus /metrics, /healthz and /readyz on 9090, and (only in
# cluster mode: --advertise / --join) the Raft port 6222 with the data ports after it
# (6222+1+i for shard i, 6222+1+shards+j for gateway j; see docs/CLUSTER.md).
# Every `mq9 node` flag can be appended to `docker run ... mq9` or set as an MQ9_* variable.

# ---- build: a wheel of mq9 and of every dependency -------------------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# setup.py keeps the *_test.py modules out of the wheel, so out of the image
COPY pyproject.toml setup.py README.md LICENSE ./
COPY mq9 ./mq9
COPY cluster ./cluster
RUN pip wheel --wheel-dir /wheels .

# ---- runtime ----------------------------------------------------------------------------
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels mq9 \
 && groupadd --system --gid 10001 mq9 \
 && useradd --system --uid 10001 --gid mq9 --home-dir /data --no-create-home --shell /usr/sbin/nologin mq9 \
 && mkdir -p /data \
 && chown mq9:mq9 /data
# /data is created and owned by mq9 before VOLUME, so a new named volume (-v mq9-data:/data)
# starts out writable by the non-root user. A bind mount must be writable by uid 10001.
USER 10001:10001
WORKDIR /data
VOLUME /data
EXPOSE 4222 9090 6222
# `mq9 health` finds the node's ports in /data/run/node.json, so it follows --metrics-port
# and --port however they were set, and asks /healthz (or, with --metrics-port 0, checks
# the NATS port sends INFO). Exit 0 healthy, 1 not, one line why (`docker inspect`).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["mq9", "health", "--data-dir", "/data"]
# Exec form: mq9 is PID 1 and gets SIGTERM from `docker stop`; it drains and stops its
# children in order (give it time: `docker stop -t 30`).
ENTRYPOINT ["mq9", "node", "--data-dir", "/data"]
CMD []
