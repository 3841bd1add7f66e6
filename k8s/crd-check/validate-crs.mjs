// Validates the custom resources of rendered overlays against the CRD schemas shipped in @kubernetes-models
// (generated from the KEDA, prometheus-operator and cert-manager CRDs): types, enums, patterns, required fields (the models' ajv
// validators), and unknown keys, which those validators accept: dts-keys.mjs reads the allowed keys of every nested
// object from the packages' own .d.ts files. The KEDA model (0.4.2, the newest for Node < 22) predates a few KEDA
// 2.20 fields, allowed explicitly below. Any other non-built-in kind is an error: nothing would validate it.
//
//   node k8s/crd-check/validate-crs.mjs RENDERED.yaml...
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { Certificate } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate";
import { Issuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Issuer";
import { rootType, unknownKeys } from "./dts-keys.mjs";

const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": [ScaledObject, rootType("@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject", "IScaledObject")],
  "monitoring.coreos.com/v1/ServiceMonitor": [ServiceMonitor, rootType("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor", "IServiceMonitor")],
  "monitoring.coreos.com/v1/PrometheusRule": [PrometheusRule, rootType("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule", "IPrometheusRule")],
  "cert-manager.io/v1/Certificate": [Certificate, rootType("@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate", "ICertificate")],
  "cert-manager.io/v1/Issuer": [Issuer, rootType("@kubernetes-models/cert-manager/cert-manager.io/v1/Issuer", "IIssuer")],
};

// ScaledObject fields of KEDA 2.20 (keda.sh_scaledobjects.yaml) missing from the 0.4.2 model.
const KEDA_2_20_FIELDS = [
  /^spec\.initialCooldownPeriod$/,
  /^spec\.fallback\.behavior$/,
  /^spec\.advanced\.scalingModifiers(\..*)?$/,
  /^spec\.triggers\[\d+\]\.useCachedMetrics$/,
];

const BUILT_IN = /^(v1|apps\/v1|policy\/v1|autoscaling\/v2|batch\/v1|networking\.k8s\.io\/v1|rbac\.authorization\.k8s\.io\/v1)$/;

let problems = [];
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length) {
      problems.push(`${file}: YAML error: ${doc.errors[0].message}`);
      continue;
    }
    const object = doc.toJS();
    if (!object) continue;
    const where = `${file}: ${object.kind} ${object.metadata?.name}`;
    const [Model, type] = MODELS[`${object.apiVersion}/${object.kind}`] ?? [];
    if (!Model) {
      if (!BUILT_IN.test(object.apiVersion ?? "")) problems.push(`${where}: no schema for ${object.apiVersion} ${object.kind}`);
      continue;
    }
    checked += 1;
    try {
      new Model(object).validate();
    } catch (err) {
      problems.push(`${where}: ${err.message}`);
    }
    for (const key of unknownKeys(object, type)) {
      if (object.kind === "ScaledObject" && KEDA_2_20_FIELDS.some((re) => re.test(key))) continue;
      problems.push(`${where}: unknown field ${key}`);
    }
  }
}
for (const p of problems) console.error(`FAIL ${p}`);
console.log(`custom resources: ${checked} checked, ${problems.length} problem(s)`);
process.exit(problems.length ? 1 : 0);
