# rollbackd: the daemon and its tools in a slim image, run as an unprivileged user.
#   docker build -t rollbackd .
#   docker run --rm rollbackd validate /etc/rollbackd/rules.yaml   (mount your rules there)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package needs: no .venv, tests or local ledgers in the build context's copy.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rollbackd ./rollbackd
# Every dependency ships manylinux wheels for CPython 3.11 (confluent-kafka bundles
# librdkafka): no compiler in the image.
RUN pip install . && rm -rf /src

RUN groupadd --system --gid 10001 rollbackd \
    && useradd --system --uid 10001 --gid rollbackd --home-dir /var/lib/rollbackd --create-home \
       --shell /usr/sbin/nologin rollbackd
USER 10001:10001
WORKDIR /var/lib/rollbackd
# The ledger, checkpoint and decision log live here: mount a volume to keep them.
VOLUME ["/var/lib/rollbackd"]
# /metrics, /healthz, /readyz, /incidents when started with `run --http 0.0.0.0:9464`.
EXPOSE 9464

ENTRYPOINT ["rollbackd"]
CMD ["--help"]
