#!/usr/bin/env bash
# Offline checks of the monitoring files (dashboard, rules, PrometheusRule) and of every PromQL query under k8s/.
#
#   k8s/monitoring/check.sh            # from the repository root (or anywhere: it cds there)
#
# Needs: bash, python3 with PyYAML, jq (optional: python3 checks the JSON too), kubectl (optional: renders
# k8s/monitoring with `kubectl kustomize`; skipped with a note when absent), and promtool: taken from $PROMTOOL, PATH,
# or .tools/promtool/ (ignored by git); if none, installed there from Debian's `prometheus` package with
# `apt-get download` + `dpkg-deb -x` (no root needed), or with `apt-get install -y prometheus` as root.
# Exits non-zero, naming the problem, on the first failing step.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
MON=k8s/monitoring
TOOLS="$ROOT/.tools/promtool"

step() { printf '\n== %s\n' "$*"; }
fail() { printf '\ncheck.sh: FAILED: %s\n' "$*" >&2; exit 1; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# ------------------------------------------------------------------------------------------------ promtool
find_promtool() {
  if [[ -n "${PROMTOOL:-}" ]]; then
    [[ -x "$PROMTOOL" ]] || fail "PROMTOOL=$PROMTOOL is not executable"
    return
  fi
  if command -v promtool >/dev/null 2>&1; then PROMTOOL="$(command -v promtool)"; return; fi
  if [[ -x "$TOOLS/usr/bin/promtool" ]]; then PROMTOOL="$TOOLS/usr/bin/promtool"; return; fi

  echo "promtool not found: installing Debian's prometheus package into .tools/promtool/"
  mkdir -p "$TOOLS"
  local deb_dir="$TMP/deb"
  mkdir -p "$deb_dir"
  download() { (cd "$deb_dir" && apt-get download prometheus >/dev/null 2>"$TMP/apt.log"); }
  if ! download && [[ "$(id -u)" == 0 ]]; then
    apt-get update >/dev/null 2>&1 || true
    download || true
  fi
  local deb
  deb="$(ls "$deb_dir"/prometheus_*.deb 2>/dev/null | head -n1 || true)"
  if [[ -n "$deb" ]]; then
    dpkg-deb -x "$deb" "$TOOLS"
    PROMTOOL="$TOOLS/usr/bin/promtool"
  elif [[ "$(id -u)" == 0 ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null \
      || fail "could not install promtool (apt-get download and apt-get install prometheus both failed)"
    PROMTOOL="$(command -v promtool)"
  else
    cat "$TMP/apt.log" >&2 || true
    fail "could not download Debian's prometheus package (apt-get download prometheus); set PROMTOOL=/path/to/promtool"
  fi
  [[ -x "$PROMTOOL" ]] || fail "promtool not found after installing"
}

step "promtool"
find_promtool
echo "$PROMTOOL: $("$PROMTOOL" --version 2>&1 | head -n1)"

# ------------------------------------------------------------------------------------------------ python + yaml
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import yaml' 2>/dev/null; then
  if [[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import yaml' 2>/dev/null; then
    PYTHON=/usr/bin/python3
  else
    fail "python3 with PyYAML is needed (apt-get install python3-yaml, or pip install pyyaml; or set PYTHON=)"
  fi
fi

# ------------------------------------------------------------------------------------------------ dashboard JSON
step "dashboard.json is valid JSON"
if command -v jq >/dev/null 2>&1; then
  jq empty "$MON/dashboard.json" || fail "$MON/dashboard.json: jq cannot parse it"
fi
"$PYTHON" - "$MON/dashboard.json" <<'EOF' || fail "$MON/dashboard.json: not a valid Grafana dashboard"
import json, sys
d = json.load(open(sys.argv[1]))
vars_ = {v["name"] for v in d["templating"]["list"]}
missing = {"DS_PROMETHEUS", "pool", "model"} - vars_
assert not missing, f"missing template variables: {missing}"
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), "duplicate panel ids"
rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
print(f"ok: schemaVersion {d['schemaVersion']}, {len(d['panels']) - len(rows)} panels in {len(rows)} rows, "
      f"variables {sorted(vars_)}")
EOF

# ------------------------------------------------------------------------------------------------ rules
step "promtool check rules $MON/rules.yaml"
"$PROMTOOL" check rules "$MON/rules.yaml" || fail "promtool check rules $MON/rules.yaml"

step "promtool test rules $MON/rules_test.yaml"
"$PROMTOOL" test rules "$MON/rules_test.yaml" || fail "promtool test rules $MON/rules_test.yaml"

# ------------------------------------------------------------------------------------------------ kustomize
RENDERED=()
step "kubectl kustomize $MON"
if command -v kubectl >/dev/null 2>&1; then
  kubectl kustomize "$MON" >"$TMP/rendered.yaml" || fail "kubectl kustomize $MON"
  RENDERED=(--rendered "$TMP/rendered.yaml")
  echo "ok: rendered $(grep -c '^kind:' "$TMP/rendered.yaml") objects"
else
  echo "kubectl not on PATH: rendering skipped"
fi

# ------------------------------------------------------------------------------------------------ PromQL + names
step "PromQL of the dashboard, the rules and the k8s/ manifests; metric names against docs/metrics.md"
"$PYTHON" "$MON/check_monitoring.py" --promtool "$PROMTOOL" "${RENDERED[@]}" \
  || fail "PromQL / metric name / PrometheusRule checks (see the problems above)"

# ------------------------------------------------------------------------------------------------ generated files
step "generated files are up to date (generate.py --check)"
"$PYTHON" "$MON/generate.py" --check || fail "dashboard.json / prometheusrule.yaml are stale"
echo "ok: dashboard.json and prometheusrule.yaml match generate.py and rules.yaml"

printf '\ncheck.sh: all monitoring checks passed\n'
