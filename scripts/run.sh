#!/usr/bin/env bash
# Runs the gateway. With no DATABASE_URL it starts a throwaway local PostgreSQL
# (installed first if missing) and prints a wscat + psql walk-through.
# Extra arguments go to realtime-gateway (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec cargo run --release --bin realtime-gateway -- "$@"
