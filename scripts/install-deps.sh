#!/usr/bin/env bash
# Installs what realtime-gateway needs beyond the Rust toolchain, if missing:
#   - PostgreSQL server binaries (initdb, pg_ctl) for the embedded database and the tests
#   - Node.js + npm, nginx, nats-server and Chromium (only with --node: the protocol
#     tests use supabase-js, the shipped nginx config, a NATS cluster and the inspector
#     page in a browser)
# Debian/Ubuntu (apt-get). Safe to run repeatedly: it only installs what is absent.
set -euo pipefail

want_node=0
want_validators=0
for arg in "$@"; do
  case "$arg" in
    --node) want_node=1 ;;
    --validators) want_validators=1 ;;
  esac
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
fi

apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: apt-get not found; please install: $*" >&2
    return 1
  fi
  if [ "$apt_updated" -eq 0 ]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

have_postgres() {
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
    { command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; }
}

if ! have_postgres; then
  echo "install-deps: installing the PostgreSQL server"
  apt_install postgresql postgresql-contrib
fi
# change-ingest's TLS test makes its certificates with the openssl command.
if ! command -v openssl >/dev/null 2>&1; then
  echo "install-deps: installing openssl (crates/change-ingest/tests/tls.rs)"
  apt_install openssl
fi
# The embedded server runs as the unprivileged `postgres` user when we are root.
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
fi

if [ "$want_node" -eq 1 ]; then
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "install-deps: installing Node.js and npm"
    apt_install nodejs npm
  fi
  # The protocol tests run a real nginx in front of the gateway.
  if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    echo "install-deps: installing nginx (protocol-tests/test/nginx.test.mjs)"
    apt_install nginx
  fi
  # The cluster tests (Broadcast/Presence across replicas) run real NATS servers.
  if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    echo "install-deps: installing nats-server (protocol-tests/test/cluster*.test.mjs)"
    apt_install nats-server
  fi
  # The inspector's browser test drives Debian's Chromium with playwright-core
  # (package.json); never `npx playwright install` (no downloads but packages).
  if [ ! -x /usr/bin/chromium ]; then
    echo "install-deps: installing chromium (protocol-tests/test/inspector.test.mjs)"
    apt_install --no-install-recommends chromium fonts-liberation
  fi
  # npm test uses --test-concurrency, --test-timeout and --test-force-exit (Node 20.14+).
  if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 14) ? 0 : 1)'; then
    echo "install-deps: Node.js >= 20.14 is required by protocol-tests (found $(node --version))" >&2
    exit 1
  fi
fi

# Offline validators for the deployment files (scripts/validate-deploy.sh).
if [ "$want_validators" -eq 1 ]; then
  missing=()
  command -v yamllint >/dev/null 2>&1 || missing+=(yamllint)
  command -v kubernetes-validate >/dev/null 2>&1 || missing+=(kubernetes-validate)
  command -v check-jsonschema >/dev/null 2>&1 || missing+=(check-jsonschema)
  python3 -c 'import yaml' >/dev/null 2>&1 || missing+=(PyYAML)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: installing validators: ${missing[*]}"
    python3 -m pip install --quiet --disable-pip-version-check "${missing[@]}" || \
      echo "install-deps: could not install ${missing[*]}; those checks will be skipped" >&2
  fi
fi
