# syntax=docker/dockerfile:1
# egressd container image.
#
#   docker build -t egressd:0.1.0 .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9901:9901 \
#     -e PAYPAL_CLIENT_ID -e PAYPAL_CLIENT_SECRET -e MAILGUN_API_KEY \
#     -v "$PWD/policies:/etc/egressd/policies:ro" egressd:0.1.0
# (the example policies' failover targets read egressd's own PayPal and Mailgun credentials)
#
# Listeners (see docs/operations.md, "Probes and signals"):
#   EGRESSD_LISTEN=0.0.0.0:8080  the proxy. In a pod the sidecar form overrides it to
#                                127.0.0.1:8080 (the Helm chart does), so only the app reaches it.
#   EGRESSD_ADMIN=0.0.0.0:9901   /healthz /readyz /metrics /status. Not loopback, because the
#                                kubelet's probes and Prometheus connect to the pod IP; it carries
#                                no secrets, but fence it with a NetworkPolicy (egressd logs a
#                                warning at start-up for a non-loopback admin address).
# tests/test_deploy.py lints this file with hadolint and runs its build and entrypoint steps in a
# fresh venv.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the egressd wheel and the wheels of its dependencies -------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# The product only: fakes/ and demo/ (the fake providers and `egressd demo`) stay out of the
# image; setup.py discovers the packages that are present, so the wheel is built without them.
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
COPY plugins ./plugins
COPY policies ./policies
RUN pip wheel --wheel-dir /wheels .

# ---- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="egressd" \
      org.opencontainers.image.description="A sidecar reverse proxy for outbound API calls" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Only the wheels cross over from the build stage: no compiler, no sources, no pip cache.
# uvloop (a dependency on Linux) comes in here and egressd uses it automatically.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/egressd-*.whl \
    && python -c "import uvloop, proxy" \
    && groupadd --system --gid 10001 egressd \
    && useradd --system --uid 10001 --gid egressd --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin egressd
COPY --chown=root:root policies /etc/egressd/policies
ENV EGRESSD_POLICIES=/etc/egressd/policies \
    EGRESSD_LISTEN=0.0.0.0:8080 \
    EGRESSD_ADMIN=0.0.0.0:9901 \
    EGRESSD_LOG_FORMAT=json \
    EGRESSD_LOG_LEVEL=info \
    EGRESSD_DRAIN=20 \
    EGRESSD_DATA_DIR=/var/lib/egressd
# The durable store (docs/durable-store.md): mount a volume here to keep it across containers.
RUN mkdir -p /var/lib/egressd && chown 10001:10001 /var/lib/egressd
VOLUME ["/var/lib/egressd"]
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
# No curl in slim images: python asks /healthz on the admin port of EGRESSD_ADMIN
# (a wildcard bind address is asked on loopback; proxies from the environment are ignored).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request as u;h,_,p=os.environ.get('EGRESSD_ADMIN','127.0.0.1:9901').rpartition(':');h=h.strip('[]');h={'':'127.0.0.1','0.0.0.0':'127.0.0.1','::':'::1'}.get(h,h);h='['+h+']' if ':' in h else h;u.build_opener(u.ProxyHandler({})).open('http://'+h+':'+p+'/healthz',timeout=2)"]
ENTRYPOINT ["egressd"]
CMD ["run"]
