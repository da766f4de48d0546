# rollbackd: the daemon, every backend and optional extra, in a slim image, run as an
# unprivileged user under tini.
#   docker build -t rollbackd .
#   docker run --rm rollbackd validate /etc/rollbackd/rules.yaml   (mount your rules there)
# Lint: hadolint Dockerfile (tests/test_image.py runs it).
FROM python:3.11-slim-trixie

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini as PID 1: forwards SIGTERM to rollbackd (a clean checkpoint and group leave) and reaps
# the children the `command` backend leaves behind. Debian's package; the version is trixie's.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

# Every dependency at the version in constraints.txt (deploy/refresh-constraints.sh writes it:
# the extras river, parquet, report, mlflow and kubernetes; not alibi, which is under the BSL
# and brings TensorFlow). --no-deps: pip installs exactly that list and resolves nothing, so no
# version floats; `pip check` fails the build if the list misses a dependency. Wheels only
# (confluent-kafka bundles librdkafka): no compiler in the image.
WORKDIR /src
COPY constraints.txt ./
RUN pip install --no-deps --only-binary=:all: -r constraints.txt
COPY pyproject.toml README.md ./
COPY rollbackd ./rollbackd
RUN pip install --no-deps . \
    && pip check \
    && rm -rf /src

RUN groupadd --system --gid 10001 rollbackd \
    && useradd --system --uid 10001 --gid rollbackd --home-dir /var/lib/rollbackd --create-home \
       --shell /usr/sbin/nologin rollbackd
USER 10001:10001
WORKDIR /var/lib/rollbackd
# The ledger, checkpoint and decision log live here: mount a volume to keep them.
VOLUME ["/var/lib/rollbackd"]
# /metrics, /healthz, /readyz, /incidents when started with `run --http 0.0.0.0:9464`.
EXPOSE 9464

ENTRYPOINT ["tini", "--", "rollbackd"]
CMD ["--help"]
