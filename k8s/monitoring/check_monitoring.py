#!/usr/bin/env python3
"""PromQL and metric-name checks for k8s/monitoring (run by check.sh; needs PyYAML).

    python3 k8s/monitoring/check_monitoring.py --promtool PATH [--rendered FILE]

1. Collects every PromQL expression: the `expr` of every dashboard.json target (Grafana variables replaced by
   stand-ins), every rule of rules.yaml, and the queries of the manifests under k8s/ outside k8s/monitoring
   (any `query:` string such as KEDA prometheus triggers, prometheus-adapter `metricsQuery` expanded for each series
   of its `seriesQuery`, `expr` of PrometheusRule objects); wraps them as record rules and runs `promtool check rules`.
2. Checks every metric name they use (plus dashboard variable queries and HPA External/Pods/Object metric names) is
   in docs/metrics.md (histograms: the name or its _bucket/_sum/_count), a recording rule of rules.yaml, or in
   EXTERNAL below; label names in matchers and groupings are known; `job` matchers name a job that exports the metric.
3. Checks prometheusrule.yaml carries exactly rules.yaml's groups, and (with --rendered, the `kubectl kustomize
   k8s/monitoring` output) that the rendered PrometheusRule and dashboard ConfigMap match the sources.
Exit 1 with a message per problem.
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("check_monitoring.py: PyYAML is missing (pip install pyyaml, or apt-get install python3-yaml)")

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CATALOGUE = ROOT / "docs" / "metrics.md"

# Series from outside this project, allowed in queries: kube-state-metrics, KEDA's operator, NVIDIA DCGM exporter,
# Prometheus itself. Keep the list explicit (README.md lists them too).
EXTERNAL = {
    "up": "prometheus",
    "kube_horizontalpodautoscaler_status_desired_replicas": "kube-state-metrics",
    "kube_horizontalpodautoscaler_status_current_replicas": "kube-state-metrics",
    "kube_horizontalpodautoscaler_spec_max_replicas": "kube-state-metrics",
    "kube_horizontalpodautoscaler_spec_min_replicas": "kube-state-metrics",
    "kube_deployment_status_replicas_available": "kube-state-metrics",
    "kube_deployment_status_replicas": "kube-state-metrics",
    "kube_deployment_spec_replicas": "kube-state-metrics",
    "keda_scaler_metrics_value": "KEDA operator",
    "keda_scaler_active": "KEDA operator",
    "keda_scaler_errors_total": "KEDA operator",
    "DCGM_FI_DEV_GPU_UTIL": "NVIDIA dcgm-exporter",
    "DCGM_FI_DEV_FB_USED": "NVIDIA dcgm-exporter",
    "DCGM_FI_DEV_FB_FREE": "NVIDIA dcgm-exporter",
    "DCGM_FI_DEV_POWER_USAGE": "NVIDIA dcgm-exporter",
}
for _name in EXTERNAL:
    assert _name == "up" or _name.startswith(("kube_", "keda_", "DCGM_")), _name

# Labels Prometheus / prometheus-operator attach to every scraped series, and the scope labels of
# opentelemetry-prometheus (docs/metrics.md).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint", "node",
                 "otel_scope_name", "otel_scope_version"}
# Labels of the external series above.
EXTERNAL_LABELS = {"deployment", "horizontalpodautoscaler", "scaledObject", "scaler", "metric", "triggerIndex",
                   "type", "exported_namespace", "gpu", "UUID", "Hostname", "modelName", "device"}
JOBS = {"kosmos-gateway": "gateway", "kosmos-encoder": "encoder", "kosmos-decoder": "decoder"}

# Grafana variables -> PromQL stand-ins.
GRAFANA_VARS = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
    "pool": "encoder",
    "model": "kosmos-2",
    "namespace": "kosmos",
}
# prometheus-adapter template fields -> stand-ins.
ADAPTER_VARS = {"<<.LabelMatchers>>": 'namespace="kosmos"', "<<.GroupBy>>": "namespace"}

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan", "atan2", "start", "end"}

problems = []


def problem(msg):
    problems.append(msg)


# ----------------------------------------------------------------------------------------------- catalogue
def load_catalogue():
    names = {}
    for line in CATALOGUE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[2] not in ("gauge", "counter", "histogram"):
            continue
        service, name, kind, labels = cells[0], cells[1], cells[2], cells[3]
        entry = names.setdefault(name, {"type": kind, "labels": set(), "services": set()})
        if entry["type"] != kind:
            problem(f"docs/metrics.md: {name} listed as both {entry['type']} and {kind}")
        entry["labels"] |= {l.strip() for l in labels.split(",") if l.strip()}
        entry["services"] |= {"gateway", "encoder", "decoder"} if service == "all" else {service}
    if not names:
        problem("docs/metrics.md: no metric rows found in the table")
    return names


def resolve(name, catalogue):
    """(catalogue entry, suffix) for a scraped series name, or (None, None)."""
    if name in catalogue:
        return catalogue[name], ""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and catalogue.get(base, {}).get("type") == "histogram":
            return catalogue[base], suffix
    return None, None


# ----------------------------------------------------------------------------------------------- PromQL scanning
STRING_RE = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
SELECTOR_RE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^{}]*)\}")
MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'|`[^`]*`)")
GROUPING_RE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
IDENT_RE = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])")


def scan(expr):
    """Selectors (name or None, [(label, op, value)]), bare metric names, and grouping labels of a PromQL expr."""
    expr = re.sub(r"#[^\n]*", "", expr)
    # Matchers keep their strings; everything else loses them (a regex like a{2} must not look like a selector).
    strings = []

    def keep(m):
        strings.append(m.group(0))
        return f'"\x00{len(strings) - 1}\x00"'

    masked = STRING_RE.sub(keep, expr)
    selectors = []

    def sel(m):
        body = re.sub(r'"\x00(\d+)\x00"', lambda s: strings[int(s.group(1))], m.group(2))
        matchers = [(l, op, v[1:-1]) for l, op, v in MATCHER_RE.findall(body)]
        selectors.append((m.group(1), matchers))
        return f" {m.group(1) or ''} "

    rest = SELECTOR_RE.sub(sel, masked)
    rest = re.sub(r'"\x00\d+\x00"', '""', rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    groupings = []

    def grp(m):
        groupings.extend(l.strip() for l in m.group(2).split(",") if l.strip())
        return " "

    rest = GROUPING_RE.sub(grp, rest)
    names = []
    for m in IDENT_RE.finditer(rest):
        ident = m.group(1)
        if ident.lower() in KEYWORDS:
            continue
        if re.match(r"\s*\(", rest[m.end():]):
            continue  # a function or aggregation
        names.append(ident)
    return selectors, names, groupings


def substitute_grafana(expr, where):
    def var(m):
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARS:
            problem(f"{where}: unknown Grafana variable ${name} (add a stand-in to GRAFANA_VARS)")
            return "x"
        return GRAFANA_VARS[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", var, expr)


# ----------------------------------------------------------------------------------------------- collection
def walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, path + (i,))


def dashboard_exprs(dashboard):
    exprs, var_names = [], []
    for path, node in walk(dashboard):
        if isinstance(node, dict) and isinstance(node.get("expr"), str) and node["expr"].strip():
            panel = dashboard_title(dashboard, path)
            where = f"dashboard.json panel {panel!r} target {node.get('refId', '?')}"
            exprs.append((where, substitute_grafana(node["expr"], where)))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        where = f"dashboard.json variable ${var.get('name')}"
        m = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_]\w*)\s*\)\s*", q or "")
        if not m:
            problem(f"{where}: expected label_values(metric, label), got {q!r}")
            continue
        var_names.append((where, m.group(1), m.group(2)))
    return exprs, var_names


def dashboard_title(dashboard, path):
    node = dashboard
    title = "?"
    for key in path:
        node = node[key]
        if isinstance(node, dict) and "title" in node:
            title = node["title"]
    return title


def rules_exprs(rules_doc, source):
    exprs = []
    for group in rules_doc.get("groups") or []:
        for rule in group.get("rules") or []:
            name = rule.get("record") or rule.get("alert")
            exprs.append((f"{source} group {group.get('name')!r} rule {name}", str(rule.get("expr", ""))))
    return exprs


def series_names(series_query):
    m = re.search(r'__name__\s*(=~|=)\s*"([^"]*)"', series_query)
    if m:
        return m.group(2).split("|") if m.group(1) == "=~" else [m.group(2)]
    m = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", series_query)
    return [m.group(1)] if m else []


def manifest_exprs():
    exprs, metric_refs = [], []
    files = sorted(p for ext in ("*.yaml", "*.yml") for p in (ROOT / "k8s").rglob(ext)
                   if HERE not in p.parents)
    for path in files:
        rel = path.relative_to(ROOT)
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            problem(f"{rel}: not valid YAML: {e}")
            continue
        for doc in docs:
            is_rule = isinstance(doc, dict) and doc.get("kind") == "PrometheusRule"
            if is_rule:
                exprs.extend(rules_exprs(doc.get("spec") or {}, str(rel)))
            ident = ""
            if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
                ident = f" {doc.get('kind')}/{doc['metadata'].get('name')}"
            for p, node in walk(doc):
                where = f"{rel}{ident} {'.'.join(map(str, p))}"
                if not isinstance(node, dict):
                    continue
                if isinstance(node.get("query"), str):
                    exprs.append((f"{where}.query", node["query"]))
                if isinstance(node.get("metricsQuery"), str):
                    names = series_names(str(node.get("seriesQuery", "")))
                    if not names:
                        problem(f"{where}: metricsQuery without a seriesQuery naming its series")
                    for n in names:
                        q = node["metricsQuery"].replace("<<.Series>>", n)
                        for k, v in ADAPTER_VARS.items():
                            q = q.replace(k, v)
                        exprs.append((f"{where}.metricsQuery[{n}]", q))
                        metric_refs.append((f"{where}.seriesQuery", n))
                # HPA v2 metric sources: External / Pods / Object carry metric.name
                if isinstance(doc, dict) and doc.get("kind") == "HorizontalPodAutoscaler" and \
                        isinstance(node.get("metric"), dict) and isinstance(node["metric"].get("name"), str):
                    metric_refs.append((f"{where}.metric.name", node["metric"]["name"]))
    return files, exprs, metric_refs


# ----------------------------------------------------------------------------------------------- checks
def check_names(where, expr, catalogue, recorded):
    selectors, names, groupings = scan(expr)
    known_labels = set(TARGET_LABELS) | EXTERNAL_LABELS | {"le"}
    for entry in catalogue.values():
        known_labels |= entry["labels"]
    for name in names:
        check_name(where, name, catalogue, recorded)
    for name, matchers in selectors:
        if name is None:
            if not any(l == "__name__" for l, _, _ in matchers):
                problem(f"{where}: selector without a metric name")
            continue
        entry, suffix = resolve(name, catalogue)
        for label, op, value in matchers:
            if entry is not None:
                allowed = entry["labels"] | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
                if label not in allowed:
                    problem(f"{where}: {name} has no label {label!r} (docs/metrics.md: "
                            f"{', '.join(sorted(entry['labels'])) or 'none'})")
                if label == "job" and op in ("=", "=~"):
                    alternatives = value.split("|") if op == "=~" else [value]
                    for job in alternatives:
                        if re.fullmatch(r"[\w-]+", job) is None:
                            continue  # a real regex: leave it
                        service = JOBS.get(job)
                        if service is None:
                            problem(f"{where}: job {job!r} is not a kosmos scrape job ({', '.join(JOBS)})")
                        elif service not in entry["services"]:
                            problem(f"{where}: {name} is not exported by {job} (docs/metrics.md: "
                                    f"{', '.join(sorted(entry['services']))})")
            elif name in EXTERNAL:
                if label not in TARGET_LABELS | EXTERNAL_LABELS:
                    problem(f"{where}: unexpected label {label!r} on external series {name}")
    for label in groupings:
        if label not in known_labels:
            problem(f"{where}: grouping by unknown label {label!r}")


def check_name(where, name, catalogue, recorded):
    if name in recorded or name in EXTERNAL:
        return
    entry, _ = resolve(name, catalogue)
    if entry is None:
        problem(f"{where}: metric {name!r} is neither in docs/metrics.md, nor a recording rule of rules.yaml, "
                f"nor in the external allowlist (check_monitoring.py EXTERNAL)")


def promtool_check(promtool, exprs, tmp):
    rules = [{"record": f"check:expr_{i}", "expr": e} for i, (_, e) in enumerate(exprs)]
    path = pathlib.Path(tmp) / "exprs.rules.json"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "extracted", "rules": rules}]}, indent=1))
    run = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    if run.returncode != 0:
        out = run.stdout + run.stderr
        for i, (where, e) in enumerate(exprs):
            if re.search(rf'check:expr_{i}\b|rule {i + 1}\b', out):
                problem(f"{where}: promtool rejects {e!r}")
        problem("promtool check rules on the extracted expressions failed:\n" + out.strip())
    return run.returncode == 0


def check_rule_copies(rules_doc, rendered):
    pr = yaml.safe_load((HERE / "prometheusrule.yaml").read_text())
    if pr.get("kind") != "PrometheusRule" or pr.get("apiVersion") != "monitoring.coreos.com/v1":
        problem("prometheusrule.yaml: not a monitoring.coreos.com/v1 PrometheusRule")
    if (pr.get("spec") or {}).get("groups") != rules_doc.get("groups"):
        problem("prometheusrule.yaml: spec.groups differ from rules.yaml groups (run python3 k8s/monitoring/generate.py)")
    if rendered is None:
        return
    docs = [d for d in yaml.safe_load_all(pathlib.Path(rendered).read_text()) if d]
    rules = [d for d in docs if d.get("kind") == "PrometheusRule"]
    maps = [d for d in docs if d.get("kind") == "ConfigMap"]
    if len(rules) != 1 or rules[0]["spec"].get("groups") != rules_doc.get("groups"):
        problem("kubectl kustomize k8s/monitoring: expected one PrometheusRule carrying rules.yaml's groups")
    dashboard_text = (HERE / "dashboard.json").read_text()
    ok = [m for m in maps
          if (m.get("metadata", {}).get("labels") or {}).get("grafana_dashboard") == "1"
          and dashboard_text in (m.get("data") or {}).values()
          and not re.search(r"-[a-z0-9]{10}$", m["metadata"]["name"])]
    if len(ok) != 1:
        problem("kubectl kustomize k8s/monitoring: expected one ConfigMap labelled grafana_dashboard=\"1\", "
                "without a name hash, holding dashboard.json")
    else:
        print(f"  kustomize: PrometheusRule {rules[0]['metadata']['name']}, ConfigMap {ok[0]['metadata']['name']} "
              f"(grafana_dashboard=\"1\")")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--promtool", required=True)
    ap.add_argument("--rendered", help="output of `kubectl kustomize k8s/monitoring`")
    args = ap.parse_args()

    catalogue = load_catalogue()
    rules_doc = yaml.safe_load((HERE / "rules.yaml").read_text())
    recorded = {r["record"] for g in rules_doc.get("groups") or [] for r in g.get("rules") or [] if "record" in r}
    dashboard = json.loads((HERE / "dashboard.json").read_text())

    d_exprs, var_refs = dashboard_exprs(dashboard)
    r_exprs = rules_exprs(rules_doc, "rules.yaml")
    files, m_exprs, m_refs = manifest_exprs()
    all_exprs = d_exprs + r_exprs + m_exprs
    print(f"  catalogue: {len(catalogue)} metrics in docs/metrics.md; {len(EXTERNAL)} external names allowed")
    print(f"  expressions: {len(d_exprs)} from dashboard.json, {len(r_exprs)} from rules.yaml, {len(m_exprs)} from "
          f"{len(files)} manifest files under k8s/ (outside k8s/monitoring)")
    for where, _ in m_exprs:
        print(f"    - {where}")
    print(f"  metric references in manifests (HPA metric names, adapter seriesQuery): {len(m_refs)}")

    with tempfile.TemporaryDirectory() as tmp:
        if promtool_check(args.promtool, all_exprs, tmp):
            print(f"  promtool check rules: all {len(all_exprs)} expressions parse")

    used = set()
    for where, expr in all_exprs:
        before = len(problems)
        check_names(where, expr, catalogue, recorded)
        if len(problems) == before:
            _, names, _ = scan(expr)
            used |= set(names)
            used |= {n for n, _ in scan(expr)[0] if n}
    for where, name, label in var_refs:
        check_name(where, name, catalogue, recorded)
        entry, _ = resolve(name, catalogue)
        if entry is not None and label not in entry["labels"] | TARGET_LABELS:
            problem(f"{where}: {name} has no label {label!r}")
        used.add(name)
    for where, name in m_refs:
        check_name(where, name, catalogue, recorded)
        used.add(name)
    ext = sorted(n for n in used if n in EXTERNAL)
    print(f"  metric names: {len(used)} distinct names checked ({len(ext)} external: {', '.join(ext) or 'none'})")

    before = len(problems)
    check_rule_copies(rules_doc, args.rendered)
    if len(problems) == before:
        print("  prometheusrule.yaml: spec.groups == rules.yaml groups")

    if problems:
        print(f"\ncheck_monitoring.py: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
