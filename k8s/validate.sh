#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests (no cluster needed):
#   1. render every overlay (and prod + each optional component: scale-to-zero, gateway-clients) with
#      `kubectl kustomize`;
#   2. validate the built-in kinds with `kubernetes-validate --strict` (unknown fields are errors) against every
#      supported Kubernetes version;
#   3. validate the KEDA, prometheus-operator and cert-manager objects against their CRD schemas (k8s/crd-check);
#   4. the semantic checks: `cargo test -p kosmos-manifests` (unless KOSMOS_VALIDATE_SKIP_CARGO=1), among them
#      the security ones (tests/manifests/src/network_policies.rs, security.rs): default-deny NetworkPolicies, the
#      pools reachable only from the gateway, /metrics only from the monitoring namespace, TLS files from
#      cert-manager Certificates mounted without subPath, probes on the plaintext health port, API keys never in
#      the manifests, and every service's config (ConfigMap + envFrom + env) loaded by its own loader.
# Installs what it needs itself: a Python venv in .venv-k8s/ and node_modules in k8s/crd-check/ (both ignored by
# git), from PyPI and npm. Needs kubectl (kustomize v5), python3 with venv, node >= 18 and npm.
#
#   k8s/validate.sh                 # from anywhere; prints a summary, exits non-zero on any failure
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# preStop `sleep` needs >= 1.30 (PodLifecycleSleepAction: beta, on by default, in 1.30).
KUBE_VERSIONS=(1.30.0 1.31.0 1.32.0 1.33.0 1.34.0 1.35.0 1.36.0 1.37.0)
OVERLAYS=(dev prod prod-hpa)
OPTIONAL_COMPONENTS=(scale-to-zero gateway-clients)
KUBERNETES_VALIDATE_VERSION=1.37.0
OUT=target/k8s
VENV=.venv-k8s

failures=()
summary=()
fail() { failures+=("$1"); summary+=("FAIL  $1"); }
pass() { summary+=("ok    $1"); }

command -v kubectl >/dev/null 2>&1 || { echo "validate.sh: kubectl is required (kubectl kustomize)" >&2; exit 1; }
command -v python3 >/dev/null 2>&1 || { echo "validate.sh: python3 is required" >&2; exit 1; }
if ! command -v npm >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing nodejs and npm (Debian)"
  apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm >/dev/null
fi
command -v npm >/dev/null 2>&1 || { echo "validate.sh: node and npm are required (k8s/crd-check)" >&2; exit 1; }

echo "== tools"
if [[ ! -x "$VENV/bin/kubernetes-validate" ]] \
  || [[ "$("$VENV/bin/pip" show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p')" != "$KUBERNETES_VALIDATE_VERSION" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "PyYAML>=6"
fi
(cd k8s/crd-check && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
echo "kubectl $(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p' | sed 's/^/kustomize /'), kubernetes-validate $("$VENV/bin/pip" show kubernetes-validate | sed -n 's/^Version: //p'), node $(node --version)"

rm -rf "$OUT" && mkdir -p "$OUT"
render_targets=()
for overlay in "${OVERLAYS[@]}"; do render_targets+=("$overlay=k8s/overlays/$overlay"); done
# prod with each optional component, so that the components are rendered and validated too.
for component in "${OPTIONAL_COMPONENTS[@]}"; do
  mkdir -p "$OUT/overlays/prod-$component"
  cat > "$OUT/overlays/prod-$component/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../../../../k8s/overlays/prod]
components: [../../../../k8s/components/$component]
YAML
  render_targets+=("prod-$component=$OUT/overlays/prod-$component")
done

rendered=()
for target in "${render_targets[@]}"; do
  name="${target%%=*}" dir="${target#*=}"
  echo "== render $name"
  if kubectl kustomize "$dir" > "$OUT/$name.yaml" 2> "$OUT/$name.render.log"; then
    pass "render $name ($(grep -c '^kind:' "$OUT/$name.yaml") objects)"
    rendered+=("$name")
  else
    cat "$OUT/$name.render.log" >&2
    fail "render $name"
  fi
done

# Built-in kinds to one file, custom resources to another (kubernetes-validate only warns on CRDs).
for name in "${rendered[@]}"; do
  "$VENV/bin/python" - "$OUT/$name.yaml" "$OUT/$name.builtin.yaml" "$OUT/$name.custom.yaml" <<'PY'
import sys, yaml
src, builtin, custom = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(src)) if d]
core = ("v1", "apps/v1", "policy/v1", "autoscaling/v2", "batch/v1", "networking.k8s.io/v1", "rbac.authorization.k8s.io/v1")
yaml.safe_dump_all([d for d in docs if d["apiVersion"] in core], open(builtin, "w"), sort_keys=False)
yaml.safe_dump_all([d for d in docs if d["apiVersion"] not in core], open(custom, "w"), sort_keys=False)
PY
done

for name in "${rendered[@]}"; do
  for version in "${KUBE_VERSIONS[@]}"; do
    if "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "$OUT/$name.builtin.yaml" > "$OUT/$name.$version.log" 2>&1; then
      pass "kubernetes-validate --strict -k $version $name"
    else
      echo "== kubernetes-validate --strict -k $version $name" >&2
      cat "$OUT/$name.$version.log" >&2
      fail "kubernetes-validate --strict -k $version $name"
    fi
  done
  if node k8s/crd-check/validate-crs.mjs "$OUT/$name.custom.yaml" > "$OUT/$name.crd.log" 2>&1; then
    pass "custom resources $name: $(tail -n1 "$OUT/$name.crd.log")"
  else
    cat "$OUT/$name.crd.log" >&2
    fail "custom resources $name"
  fi
done

if [[ "${KOSMOS_VALIDATE_SKIP_CARGO:-0}" != 1 ]]; then
  echo "== cargo test -p kosmos-manifests"
  set +e
  cargo test -p kosmos-manifests --locked > "$OUT/cargo.log" 2>&1
  rc=$?
  set -e
  grep -E '^test result:|^test .* FAILED|panicked' "$OUT/cargo.log" || true
  if [[ "$rc" == 0 ]]; then
    pass "cargo test -p kosmos-manifests ($(grep -E '^test result:' "$OUT/cargo.log" | awk '{p+=$4} END {print p}') passed)"
  else
    tail -n 40 "$OUT/cargo.log" >&2
    fail "cargo test -p kosmos-manifests"
  fi
fi

echo
echo "== summary (Kubernetes ${KUBE_VERSIONS[0]%.0} .. ${KUBE_VERSIONS[-1]%.0}; rendered YAML in $OUT/)"
printf '%s\n' "${summary[@]}"
if ((${#failures[@]})); then
  echo "${#failures[@]} check(s) failed"
  exit 1
fi
echo "all ${#summary[@]} checks passed"
