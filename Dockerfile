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
# Note: today the gateway connects to PostgreSQL without TLS (tokio-postgres
# NoTls), so the database must accept plaintext connections (keep it on a
# private network; `sslmode=require` in DATABASE_URL fails). No curl: the
# health probe below uses bash's /dev/tcp. ca-certificates is deliberately not
# version-pinned: security updates should land on rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 realtime \
 && useradd --system --uid 10001 --gid realtime --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin realtime

COPY --from=builder /out/realtime-gateway /usr/local/bin/realtime-gateway

ENV PORT=4000 \
    BIND_ADDR=0.0.0.0 \
    EMBEDDED_POSTGRES=off \
    SHUTDOWN_GRACE_MS=10000 \
    RUST_LOG=info,tokio_postgres=warn \
    NO_COLOR=1

# Numeric UID/GID so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 4000

# GET /healthz over bash's /dev/tcp (the image has no curl): healthy when the
# status line says 200. Connects to loopback unless BIND_ADDR names one
# specific address. /healthz answers once the gateway serves; it does not
# probe the database (a lost database connection is retried inside the gateway).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "h=${BIND_ADDR:-127.0.0.1}; case $h in 0.0.0.0|::|'[::]') h=127.0.0.1;; esac; exec 3<>/dev/tcp/$h/${PORT:-4000} && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r -t 2 _ code _ <&3 && [ \"$code\" = 200 ]"]

# The gateway handles SIGTERM itself (stop accepting, close sockets with 1001,
# exit within SHUTDOWN_GRACE_MS), so it runs directly as PID 1. Give the
# container a stop timeout longer than SHUTDOWN_GRACE_MS (compose:
# stop_grace_period; Kubernetes: terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/realtime-gateway"]
CMD ["serve"]
