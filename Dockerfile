# syntax=docker/dockerfile:1
# Build the server's wheel (it ships the prefd package from clients/python) and its dependencies'
# wheels in one stage; install them into a slim, non-root runtime image that checks its own health
# through grpc.health.v1.
FROM python:3.11-slim AS build
WORKDIR /src
COPY clients/python clients/python
COPY pyproject.toml README.md ./
COPY prefd_server prefd_server
# With the `tracing` extra: OpenTelemetry stays off unless the OTEL_* settings ask for it.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[tracing]"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/prefd prefd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# The data directory: the embedded PostgreSQL and, without PREFD_JWT_SECRET / PREFD_SECRET_KEY, the
# generated signing secret and master key. Mount a volume here so they outlive the container.
VOLUME ["/var/lib/prefd"]
USER prefd
WORKDIR /var/lib/prefd
ENV PREFD_DATA_DIR=/var/lib/prefd PREFD_PORT=50051 PREFD_HOST=0.0.0.0
EXPOSE 50051
# Over TLS when PREFD_TLS_CERT_FILE is set (PREFD_HEALTHCHECK_CA_FILE, _CERT_FILE, _KEY_FILE, _SERVER_NAME).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["prefd", "healthcheck"]
ENTRYPOINT ["prefd"]
CMD ["serve"]
