# syntax=docker/dockerfile:1
# plantgate in a container.
#
#   docker build -t plantgate .
#   docker run -d --name plantgate --restart unless-stopped --stop-timeout 60 \
#     -v plantgate-data:/var/lib/plantgate \
#     -v /etc/plantgate/plantgate.toml:/etc/plantgate/plantgate.toml:ro \
#     -v /etc/plantgate/credentials/ingest-token:/run/secrets/ingest-token:ro \
#     -e PLANTGATE__HTTP__INGEST_TOKEN_FILE=/run/secrets/ingest-token \
#     -p 9480:9480 plantgate
#
# Give it 60 s to stop (--stop-timeout, or stop_grace_period in compose): SIGTERM
# starts the drain. Serial devices: --device /dev/ttyUSB0 (and --group-add dialout).
# The ingest token guards MES ingest and the buffer endpoints, which -p publishes beyond
# the container: create it as docs/install.md does (root-only file, a random hex string).
# Installed the same way as on an IPC (docs/install.md); tests/test_install.py replays the
# build stage's steps, the entrypoint and the healthcheck.

# --- build: install the project and its dependencies into a venv -------------------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/plantgate/.venv

WORKDIR /src
# Only what the package is built from; tests, bench and docs stay out of the image.
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY protocols ./protocols
COPY buffer ./buffer
# Every dependency ships wheels for amd64 and arm64; on 32-bit ARM some build from
# source and this stage needs build-essential (and a Rust toolchain for pydantic-core).
RUN /opt/plantgate/.venv/bin/pip install . \
 && /opt/plantgate/.venv/bin/python -m compileall -q /opt/plantgate/.venv

# --- runtime ----------------------------------------------------------------------------------
FROM python:3.11-slim

# A fixed uid/gid so a bind-mounted data directory can be chowned to it on the host.
RUN groupadd --system --gid 10001 plantgate \
 && useradd --system --uid 10001 --gid plantgate --home-dir /var/lib/plantgate \
      --no-create-home --shell /usr/sbin/nologin plantgate \
 && install -d -o plantgate -g plantgate -m 0700 /var/lib/plantgate \
 && install -d -m 0755 /etc/plantgate

# Same base image and path as the build stage, so the venv's interpreter links stay valid.
COPY --from=build /opt/plantgate/.venv /opt/plantgate/.venv

# PLANTGATE__HTTP__LISTEN: inside a container the network namespace is the boundary, so
# listen on every interface and -p 9480:9480 reaches health, metrics and MES ingest.
# PROMETHEUS_DISABLE_CREATED_SERIES: leave out the *_created series (half the series, no news).
ENV PATH=/opt/plantgate/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMETHEUS_DISABLE_CREATED_SERIES=true \
    PLANTGATE__HTTP__LISTEN=0.0.0.0:9480

USER plantgate
WORKDIR /var/lib/plantgate
VOLUME /var/lib/plantgate
EXPOSE 9480

# No curl in slim: ask /healthz with the standard library. http.client, not urllib,
# so an HTTP(S)_PROXY set for the cloud side is not used for loopback. The port
# follows PLANTGATE__HTTP__LISTEN when it is changed.
HEALTHCHECK --interval=30s --timeout=5s --start-period=2m --retries=3 \
  CMD ["python", "-c", "import http.client, os; port = int(os.environ.get('PLANTGATE__HTTP__LISTEN', ':9480').rpartition(':')[2]); c = http.client.HTTPConnection('127.0.0.1', port, timeout=4); c.request('GET', '/healthz'); raise SystemExit(0 if c.getresponse().status == 200 else 1)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["plantgate", "run", "-c", "/etc/plantgate/plantgate.toml"]
