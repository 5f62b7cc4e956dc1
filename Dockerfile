# syntax=docker/dockerfile:1
#
# realtime-gateway container image.
#
#   docker build -t realtime-gateway .
#   docker run --rm -p 4000:4000 -e DATABASE_URL=postgres://user:pass@db:5432/postgres realtime-gateway
#
# Two stages: the official Rust image builds the release binary from the
# committed Cargo.lock (`--locked`), and a slim Debian image of the same release
# (bookworm, so glibc matches) runs it as an unprivileged user. The runtime image
# has no PostgreSQL binaries, so EMBEDDED_POSTGRES is off: give it a database
# with DATABASE_URL (or DB_HOST/DB_PORT/DB_USER/DB_PASSWORD/DB_NAME), or it
# serves Broadcast and Presence only. The binary exits if the configured
# database cannot be reached at startup, so run it under a restart policy
# (docker-compose.yml and k8s/ do).

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# Only what the workspace build reads, so edits elsewhere (docs, deploy files,
# protocol-tests) do not invalidate the build layer.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
# BuildKit cache mounts keep the registry and target dir between builds; the
# binary is copied out of the cached target dir because cache mounts are not
# part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p gateway \
 && install -D -m 0755 target/release/realtime-gateway /out/realtime-gateway

FROM debian:bookworm-slim AS runtime
# ca-certificates: the trust store for anything that verifies certificates.
# curl: Supabase's self-hosted docker-compose.yml probes its `realtime` service
# with `curl -sSfL --head ... http://localhost:4000/api/tenants/realtime-dev/health`;
# carrying curl lets this image replace that service with the compose file
# unchanged. Our own HEALTHCHECK below needs no curl: the binary probes itself
# (`realtime-gateway healthcheck`).
# Note: today the gateway connects to PostgreSQL without TLS (tokio-postgres
# NoTls), so the database must accept plaintext connections (keep it on a
# private network; `sslmode=require` in DATABASE_URL fails). Packages are
# deliberately not version-pinned: security updates should land on rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 realtime \
 && useradd --system --uid 10001 --gid realtime --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin realtime

COPY --from=builder /out/realtime-gateway /usr/local/bin/realtime-gateway

# LOG_LEVEL takes Supabase's level names (info, warning, error, ...); RUST_LOG,
# when set, overrides it with a full tracing filter. LOG_FORMAT=json for one
# JSON object per line.
ENV PORT=4000 \
    BIND_ADDR=0.0.0.0 \
    EMBEDDED_POSTGRES=off \
    SHUTDOWN_GRACE_MS=10000 \
    DRAIN_DELAY_MS=0 \
    LOG_LEVEL=info \
    LOG_FORMAT=text \
    NO_COLOR=1

# Numeric UID/GID so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 4000

# `realtime-gateway healthcheck` sends GET /healthz to PORT on loopback (or on
# BIND_ADDR when it names one address) and exits 0 on 2xx. /healthz answers
# while the process serves, draining included; use `healthcheck --path /readyz`
# for "ready for new clients" (change feed live, not draining).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["realtime-gateway", "healthcheck"]

# The gateway handles SIGTERM itself: /readyz fails and new upgrades get 503 at
# once, sockets close with 1001 after DRAIN_DELAY_MS, and it exits within
# SHUTDOWN_GRACE_MS. So it runs directly as PID 1. Give the container a stop
# timeout longer than SHUTDOWN_GRACE_MS (compose: stop_grace_period;
# Kubernetes: terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/realtime-gateway"]
CMD ["serve"]
