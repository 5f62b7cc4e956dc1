#!/usr/bin/env bash
# Runs every test: formatting, lints, Rust unit + integration tests (real
# PostgreSQL), the end-to-end protocol tests (real supabase-js against the real
# binary) and a benchmark smoke run. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

step "dependencies"
bash scripts/install-deps.sh --node --validators

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (unit + integration, real PostgreSQL)"
cargo test --workspace --locked

# The fuzz targets' seeds and 2,000 deterministic mutants each run in `cargo test`
# above (crates/gateway/tests/fuzz_replay.rs). Coverage-guided fuzzing needs nightly
# and cargo-fuzz (a few minutes of ASAN build): opt in with FUZZ_SECS=<seconds per target>.
if [ -n "${FUZZ_SECS:-}" ]; then
  step "fuzzing (cargo-fuzz, nightly): ${FUZZ_SECS} s per target"
  (cd crates/phoenix-channel/fuzz && cargo +nightly fuzz run decode corpus/decode seeds/decode -- -max_total_time="$FUZZ_SECS")
  for t in filter rest_body; do
    (cd crates/gateway/fuzz && cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$FUZZ_SECS")
  done
fi

step "deployment files (offline validation: nginx -t, compose, k8s schemas where available)"
bash scripts/validate-deploy.sh

step "build the gateway and bench binaries"
# Whole workspace, like `cargo test` above, so dependencies are built once with
# the same features (`-p` would resolve features anew and rebuild some).
cargo build --workspace --bins --locked

step "benchmark smoke run (checks the tool works, not the figures)"
"$root/target/debug/realtime-bench" broadcast --quick \
  --gateway-bin "$root/target/debug/realtime-gateway" --out "$root/target/bench-smoke/broadcast.json"
# RLS: ~30 s; fails on any leaked row (the tool errors if nothing joins or is delivered).
"$root/target/debug/realtime-bench" rls --quick \
  --gateway-bin "$root/target/debug/realtime-gateway" --out "$root/target/bench-smoke/rls.json"

# Flood: ~15 s; fails only when nothing joins (figures are not checked here).
"$root/target/debug/realtime-bench" flood --quick \
  --gateway-bin "$root/target/debug/realtime-gateway" --out "$root/target/bench-smoke/flood.json"

step "protocol tests (supabase-js 2.119.0 + raw frames against the real binary)"
cd protocol-tests
npm ci --no-audit --no-fund --loglevel=error
GATEWAY_BIN="$root/target/debug/realtime-gateway" npm test
