#!/usr/bin/env python3
"""Generate k8s/monitoring/dashboard.json and k8s/monitoring/prometheusrule.yaml.

    python3 k8s/monitoring/generate.py          # write both files
    python3 k8s/monitoring/generate.py --check  # exit 1 if either file differs from what would be generated

dashboard.json is built from the panel list below; prometheusrule.yaml wraps rules.yaml (the source of truth for the
rules) in a prometheus-operator PrometheusRule, text for text, so both always carry the same groups.
Standard library only. Metric names: docs/metrics.md (checked by check.sh).
"""

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
RI = "$__rate_interval"

# Dashboard filters, appended to every kosmos selector.
NS = 'namespace=~"$namespace"'
MODEL = 'gen_ai_request_model=~"$model"'
GW = 'job="kosmos-gateway"'
NOT_GRPC = 'rpc_method!~"grpc[.].*"'  # health checks and reflection
PUBLIC = f"{GW}, {NOT_GRPC}, {NS}"
# Caller errors are not server errors (the same split as kosmos:request_error_ratio:rate5m in rules.yaml).
SERVER_ERROR = 'rpc_response_status_code!~"OK|INVALID_ARGUMENT|CANCELLED"'


def by_model(vector):
    """Keep the series of targets serving $model (every service exports kosmos_build_info{model})."""
    return f'({vector} and on (namespace, job, instance) kosmos_build_info{{model=~"$model", {NS}}})'


def pool_load(pool_matcher):
    """The autoscaler signal of a pool: pending + in-flight calls, summed over gateway replicas (see README)."""
    return (
        f"sum(kosmos_gateway_pool_pending_requests{{{pool_matcher}, {NS}}})"
        f" + sum(kosmos_gateway_pool_inflight_requests{{{pool_matcher}, {NS}}})"
    )


def quantiles(metric, selector, by="", qs=(0.5, 0.95, 0.99), legend_prefix="", window=RI, model_filter=False):
    out = []
    grouping = f"{by}, le" if by else "le"
    for q in qs:
        rate = f"rate({metric}_bucket{{{selector}}}[{window}])"
        if model_filter:
            rate = by_model(rate)
        out.append(
            (
                f"histogram_quantile({q}, sum by ({grouping}) ({rate}))",
                f"{legend_prefix}p{int(round(q * 100))}",
            )
        )
    return out


def mean(metric, selector, by="", model_filter=False):
    s = f"rate({metric}_sum{{{selector}}}[{RI}])"
    c = f"rate({metric}_count{{{selector}}}[{RI}])"
    if model_filter:
        s, c = by_model(s), by_model(c)
    grp = f" by ({by})" if by else ""
    return f"sum{grp} ({s}) / sum{grp} ({c})"


class Dashboard:
    def __init__(self):
        self.panels = []
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self):
        i = self.next_id
        self.next_id += 1
        return i

    def row(self, title, repeat=None):
        self._newline()
        panel = {
            "type": "row",
            "id": self._id(),
            "title": title,
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
            "panels": [],
        }
        if repeat:
            panel["repeat"] = repeat
        self.panels.append(panel)
        self.y += 1

    def _newline(self):
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def _place(self, w, h):
        if self.x + w > 24:
            self._newline()
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        if self.x >= 24:
            self._newline()
        return pos

    @staticmethod
    def _targets(targets):
        out = []
        for i, (expr, legend) in enumerate(targets):
            out.append(
                {
                    "datasource": DS,
                    "refId": chr(ord("A") + i),
                    "expr": expr,
                    "legendFormat": legend,
                    "range": True,
                    "editorMode": "code",
                }
            )
        return out

    def timeseries(self, title, targets, unit="short", description="", w=12, h=8, min_=None, max_=None,
                   thresholds=None, stack=False, right_axis=None):
        """right_axis: {legend: unit} for series drawn on a right-hand axis with their own unit."""
        defaults = {
            "unit": unit,
            "custom": {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 10,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                "thresholdsStyle": {"mode": "line" if thresholds else "off"},
            },
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "green", "value": None}]
                + [{"color": "red", "value": t} for t in (thresholds or [])],
            },
        }
        if min_ is not None:
            defaults["min"] = min_
        if max_ is not None:
            defaults["max"] = max_
        self.panels.append(
            {
                "type": "timeseries",
                "id": self._id(),
                "title": title,
                "description": description,
                "datasource": DS,
                "gridPos": self._place(w, h),
                "fieldConfig": {"defaults": defaults, "overrides": [
                    {
                        "matcher": {"id": "byRegexp", "options": legend[1:-1]} if legend.startswith("/")
                        else {"id": "byName", "options": legend},
                        "properties": [
                            {"id": "unit", "value": axis_unit},
                            {"id": "custom.axisPlacement", "value": "right"},
                        ],
                    }
                    for legend, axis_unit in (right_axis or {}).items()
                ]},
                "options": {
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"},
                },
                "targets": self._targets(targets),
            }
        )

    def stat(self, title, targets, unit, steps, description="", w=6, h=5):
        self.panels.append(
            {
                "type": "stat",
                "id": self._id(),
                "title": title,
                "description": description,
                "datasource": DS,
                "gridPos": self._place(w, h),
                "fieldConfig": {
                    "defaults": {
                        "unit": unit,
                        "thresholds": {
                            "mode": "absolute",
                            "steps": [{"color": c, "value": v} for c, v in steps],
                        },
                    },
                    "overrides": [],
                },
                "options": {
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value",
                    "graphMode": "area",
                    "textMode": "auto",
                    "justifyMode": "auto",
                    "orientation": "auto",
                },
                "targets": self._targets(targets),
            }
        )


def query_variable(name, label, query, all_value=None, description=""):
    v = {
        "type": "query",
        "name": name,
        "label": label,
        "description": description,
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-query"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": True,
        "includeAll": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
        "regex": "",
    }
    if all_value is not None:
        v["allValue"] = all_value
    return v


def build_dashboard():
    d = Dashboard()

    # ------------------------------------------------------------------ Overview
    d.row("Overview")
    d.stat(
        "Requests/s (public API)",
        [(f"sum(rate(rpc_server_call_duration_seconds_count{{{PUBLIC}}}[{RI}]))", "requests/s")],
        "reqps",
        [("green", None)],
        "Calls the gateway answered per second, health checks excluded.",
    )
    d.stat(
        "Server error ratio (gateway)",
        [
            (
                f"(sum(rate(rpc_server_call_duration_seconds_count{{{PUBLIC}, {SERVER_ERROR}}}[{RI}])) or vector(0))"
                f" / sum(rate(rpc_server_call_duration_seconds_count{{{PUBLIC}}}[{RI}]))",
                "errors",
            )
        ],
        "percentunit",
        [("green", None), ("orange", 0.01), ("red", 0.05)],
        "Share of public calls ending in a status other than OK, INVALID_ARGUMENT or CANCELLED "
        "(alert KosmosHighErrorRatio above 5%).",
    )
    d.stat(
        "p95 time to first token (gateway)",
        quantiles("gen_ai_server_time_to_first_token_seconds", f"{GW}, {MODEL}, {NS}", qs=(0.95,)),
        "s",
        [("green", None), ("orange", 1), ("red", 2)],
        "What callers see (alert KosmosHighTimeToFirstToken above 2s for 10m).",
    )
    d.stat(
        "Ready replicas per pool (gateway view)",
        [(f'max by (pool) (kosmos_gateway_pool_ready_replicas{{pool=~"$pool", {NS}}})', "{{pool}}")],
        "short",
        [("red", None), ("green", 1)],
        "Replicas whose last health probe or call succeeded, as the gateways see them (best gateway view).",
    )
    d.timeseries(
        "Non-OK calls by status code (gateway, share of calls)",
        [
            (
                f"sum by (rpc_response_status_code) (rate(rpc_server_call_duration_seconds_count"
                f'{{{PUBLIC}, rpc_response_status_code!="OK"}}[{RI}]))'
                f" / ignoring (rpc_response_status_code) group_left"
                f" sum(rate(rpc_server_call_duration_seconds_count{{{PUBLIC}}}[{RI}]))",
                "{{rpc_response_status_code}}",
            )
        ],
        unit="percentunit",
        min_=0,
        stack=True,
        description="INVALID_ARGUMENT and CANCELLED are the callers' errors; the others count as server errors.",
    )
    d.timeseries(
        "Requests/s by method and status (gateway)",
        [
            (
                f"sum by (rpc_method, rpc_response_status_code) "
                f"(rate(rpc_server_call_duration_seconds_count{{{PUBLIC}}}[{RI}]))",
                "{{rpc_method}} {{rpc_response_status_code}}",
            )
        ],
        unit="reqps",
        min_=0,
    )

    # ------------------------------------------------------------------ Latency
    both = f'job=~"kosmos-gateway|kosmos-decoder", {MODEL}, {NS}'
    d.row("Latency (gateway = what callers see, decoder = queue + prefill + decode)")
    d.timeseries(
        "Time to first token",
        quantiles("gen_ai_server_time_to_first_token_seconds", both, by="job", legend_prefix="{{job}} "),
        unit="s",
        min_=0,
        thresholds=[2],
        description="Gateway: arrival to first token (validation, encode calls, decoder). Decoder: queue + prefill.",
    )
    d.timeseries(
        "Time per output token",
        quantiles("gen_ai_server_time_per_output_token_seconds", both, by="job", legend_prefix="{{job}} "),
        unit="s",
        min_=0,
        description="Mean time per generated token after the first, per request.",
    )
    d.timeseries(
        "Request duration",
        quantiles(
            "gen_ai_server_request_duration_seconds",
            both,
            by="job, gen_ai_operation_name",
            qs=(0.5, 0.95),
            legend_prefix="{{job}} {{gen_ai_operation_name}} ",
        ),
        unit="s",
        min_=0,
        description="Arrival to last token (text_completion) or score (score).",
    )
    d.timeseries(
        "Mean latencies",
        [
            (mean("gen_ai_server_time_to_first_token_seconds", both, by="job"), "{{job}} time to first token"),
            (mean("gen_ai_server_request_duration_seconds", both, by="job"), "{{job}} request duration"),
        ],
        unit="s",
        min_=0,
    )

    # ------------------------------------------------------------------ Throughput
    d.row("Throughput")
    d.timeseries(
        "Tokens/s by type (gateway)",
        [
            (
                f"sum by (gen_ai_token_type) (rate(gen_ai_server_token_usage_sum{{{GW}, {MODEL}, {NS}}}[{RI}]))",
                "{{gen_ai_token_type}}",
            )
        ],
        unit="short",
        min_=0,
        description="input: text prompt tokens; image: image positions; output: generated tokens.",
    )
    d.timeseries(
        "Images/s",
        [
            (f"sum({by_model(f'rate(kosmos_encoder_images_encoded_total{{{NS}}}[{RI}])')})", "encoded"),
            (f"sum(rate(kosmos_gateway_embedding_cache_hits_total{{{NS}}}[{RI}]))", "served from the embedding cache"),
            (f"sum({by_model(f'rate(kosmos_encoder_images_rejected_total{{{NS}}}[{RI}])')})", "rejected"),
        ],
        unit="short",
        min_=0,
    )
    d.timeseries(
        "Requests/s by operation and error type (gateway)",
        [
            (
                f"sum by (gen_ai_operation_name, error_type) "
                f"(rate(gen_ai_server_request_duration_seconds_count{{{GW}, {MODEL}, {NS}}}[{RI}]))",
                "{{gen_ai_operation_name}} {{error_type}}",
            )
        ],
        unit="reqps",
        min_=0,
        description="error_type is empty on success.",
    )
    d.timeseries(
        "Embedding cache hit ratio",
        [
            (
                f"sum(rate(kosmos_gateway_embedding_cache_hits_total{{{NS}}}[{RI}]))"
                f" / sum(rate(kosmos_gateway_embedding_cache_queries_total{{{NS}}}[{RI}]))",
                "hit ratio",
            )
        ],
        unit="percentunit",
        min_=0,
        max_=1,
    )
    d.timeseries(
        "Embedding cache size",
        [(f"sum(kosmos_gateway_embedding_cache_bytes{{{NS}}})", "bytes")],
        unit="bytes",
        min_=0,
    )
    d.timeseries(
        "Embedding cache entries and evictions/s",
        [
            (f"sum(kosmos_gateway_embedding_cache_entries{{{NS}}})", "entries"),
            (f"sum(rate(kosmos_gateway_embedding_cache_evictions_total{{{NS}}}[{RI}]))", "evictions/s"),
        ],
        unit="short",
        min_=0,
    )

    # ------------------------------------------------------------------ Queues & autoscaling, one row per pool
    pool = f'{GW}, pool="$pool"'
    hpa = f'horizontalpodautoscaler=~"(keda-hpa-)?(.*-)?$pool", {NS}'
    dep = f'deployment=~"(.*-)?$pool", {NS}'
    d.row("Queues & autoscaling: $pool pool", repeat="pool")
    d.timeseries(
        "Autoscaler signal: pending + in-flight calls",
        [
            (pool_load(pool), "pending + in-flight (autoscaler query)"),
            (f"sum(kosmos_gateway_pool_pending_requests{{{pool}, {NS}}})", "pending"),
            (f"sum(kosmos_gateway_pool_inflight_requests{{{pool}, {NS}}})", "in-flight"),
            (f"sum(kosmos_gateway_pool_pending_images{{{pool}, {NS}}})", "pending images (encoder)"),
        ],
        # pending images is the encoder pool's second autoscaler query
        unit="short",
        min_=0,
        description="The same expressions the pool's ScaledObject / HPA queries (summed over gateway replicas). "
        "Recorded as kosmos:gateway_pool_load:sum and kosmos:gateway_encoder_images:sum.",
    )
    d.timeseries(
        "Replicas: desired vs current vs available vs ready",
        [
            (f"max(kube_horizontalpodautoscaler_status_desired_replicas{{{hpa}}})", "desired (HPA)"),
            (f"max(kube_horizontalpodautoscaler_status_current_replicas{{{hpa}}})", "current (HPA)"),
            (f"max(kube_horizontalpodautoscaler_spec_max_replicas{{{hpa}}})", "max (HPA)"),
            (f"sum(kube_deployment_status_replicas_available{{{dep}}})", "available (Deployment)"),
            (f"max(kosmos_gateway_pool_replicas{{{pool}, {NS}}})", "known (gateway)"),
            (f"max(kosmos_gateway_pool_ready_replicas{{{pool}, {NS}}})", "ready (gateway)"),
        ],
        unit="short",
        min_=0,
        description="kube-state-metrics series (external); KEDA names its HPA keda-hpa-<ScaledObject>. Deployment "
        "and HPA names are matched as '<prefix>-<pool>'.",
    )
    d.timeseries(
        "Load per ready replica",
        [
            (
                f"({pool_load(pool)}) / clamp_min(max(kosmos_gateway_pool_ready_replicas{{{pool}, {NS}}}), 1)",
                "pending + in-flight per ready replica",
            )
        ],
        unit="short",
        min_=0,
        description="KosmosPoolSaturated fires above 1.5 x the autoscaling target per replica for 15m: 24 calls "
        "(decoder), 96 calls or 48 pending images (encoder).",
    )
    d.timeseries(
        "KEDA scaler metric",
        [('keda_scaler_metrics_value{scaledObject=~"(.*-)?$pool"}', "{{scaledObject}} {{metric}}")],
        unit="short",
        min_=0,
        description="The value KEDA read for each trigger of the pool's ScaledObject (KEDA operator metrics, external).",
    )
    d.timeseries(
        "Calls, failures and retries/s to the pool",
        [
            (f"sum(rate(kosmos_gateway_pool_calls_total{{{pool}, {NS}}}[{RI}]))", "calls"),
            (f"sum(rate(kosmos_gateway_pool_failures_total{{{pool}, {NS}}}[{RI}]))", "failures"),
            (f"sum(rate(kosmos_gateway_pool_retries_total{{{pool}, {NS}}}[{RI}]))", "retries"),
        ],
        unit="reqps",
        min_=0,
    )
    d.timeseries(
        "GPU utilisation and memory (DCGM)",
        [
            (f'avg by (pod) (DCGM_FI_DEV_GPU_UTIL{{pod=~".*$pool.*", {NS}}})', "{{pod}} util %"),
            (f'sum by (pod) (DCGM_FI_DEV_FB_USED{{pod=~".*$pool.*", {NS}}})', "{{pod}} memory used"),
        ],
        unit="percent",
        right_axis={"/.* memory used$/": "mbytes"},  # DCGM reports MiB
        min_=0,
        description="NVIDIA DCGM exporter series (external), matched to the pool's pods by name.",
    )
    d.timeseries(
        "Calls waiting for a replica",
        [(f"sum(kosmos_gateway_pool_waiting_requests{{{pool}, {NS}}})", "waiting for a replica")],
        unit="short",
        min_=0,
        w=8,
        description="Calls held by the gateways because no replica of the pool serves their model build (scaled to "
        "zero, or every replica gone), each for at most limits.max_waiting_for_replica_seconds. Also counted as "
        "pending, so they wake the autoscaler.",
    )
    d.timeseries(
        "Ejected replicas",
        [
            (f"max(kosmos_gateway_pool_ejected_replicas{{{pool}, {NS}}})", "ejected (most by one gateway)"),
            (f"sum(rate(kosmos_gateway_pool_ejections_total{{{pool}, {NS}}}[{RI}]))", "ejections/s"),
        ],
        unit="short",
        min_=0,
        w=8,
        right_axis={"ejections/s": "short"},
        description="Replicas out of rotation because their calls failed eject_after_failures times in a row (30s, "
        "doubled at each ejection, at most 300s, until a call succeeds). KosmosPoolReplicaEjected: ejected for 10m.",
    )
    d.timeseries(
        "Retries refused/s (retry budget spent)",
        [(f"sum(rate(kosmos_gateway_pool_retries_refused_total{{{pool}, {NS}}}[{RI}]))", "retries refused")],
        unit="reqps",
        min_=0,
        w=8,
        description="Retries not made because the pool's retry budget (retry_budget_percent of its calls, default "
        "20%, plus 10 a second) was spent: those failures reach the callers. KosmosPoolRetryBudgetSpent: above 0 "
        "for 5m.",
    )

    # ------------------------------------------------------------------ Vision encoder
    d.row("Vision encoder")
    d.timeseries(
        "Batch size",
        [
            (
                f"sum({by_model(f'rate(kosmos_encoder_images_encoded_total{{{NS}}}[{RI}])')})"
                f" / sum({by_model(f'rate(kosmos_encoder_batch_executions_total{{{NS}}}[{RI}])')})",
                "mean (images / batches)",
            ),
        ]
        + quantiles("kosmos_encoder_batch_size", NS, qs=(0.95,), model_filter=True),
        unit="short",
        min_=0,
        description="Mean images per executed batch = rate(images_encoded) / rate(batch_executions).",
    )
    d.timeseries(
        "Queue time and queued images",
        quantiles("kosmos_encoder_queue_time_seconds", NS, qs=(0.5, 0.95), model_filter=True)
        + [(f"sum({by_model(f'kosmos_encoder_queue_images{{{NS}}}')})", "images queued")],
        unit="s",
        min_=0,
        right_axis={"images queued": "short"},
        description="Time an image waited in the engine queue before its batch started (left, seconds); images "
        "waiting in the engine queues of the pool (right).",
    )
    d.timeseries(
        "Image decode and preprocess time",
        quantiles("kosmos_encoder_image_decode_time_seconds", NS, qs=(0.5, 0.95), legend_prefix="decode ",
                  model_filter=True)
        + quantiles("kosmos_encoder_image_preprocess_time_seconds", NS, qs=(0.5, 0.95), legend_prefix="preprocess ",
                    model_filter=True),
        unit="s",
        min_=0,
        description="Per image: file to pixels (decode), resize and normalise (preprocess).",
    )
    d.timeseries(
        "Encode time per batch",
        quantiles("kosmos_encoder_encode_time_seconds", NS, qs=(0.5, 0.95, 0.99), model_filter=True),
        unit="s",
        min_=0,
        description="Engine time of one batch (vision tower + connector).",
    )
    d.timeseries(
        "Images rejected/s by reason",
        [
            (
                f"sum by (reason) ({by_model(f'rate(kosmos_encoder_images_rejected_total{{{NS}}}[{RI}])')})",
                "{{reason}}",
            )
        ],
        unit="short",
        min_=0,
        stack=True,
        description="Images refused by a limit (bytes, width, height, pixels) or as undecodable (format, decode).",
    )
    d.timeseries(
        "Batches/s",
        [(f"sum({by_model(f'rate(kosmos_encoder_batch_executions_total{{{NS}}}[{RI}])')})", "batches/s")],
        unit="short",
        min_=0,
    )

    # ------------------------------------------------------------------ Decoder
    d.row("Decoder")
    d.timeseries(
        "Running and waiting sequences",
        [
            (f"sum({by_model(f'kosmos_decoder_num_requests_running{{{NS}}}')})", "running"),
            (f"sum({by_model(f'kosmos_decoder_num_requests_waiting{{{NS}}}')})", "waiting"),
        ],
        unit="short",
        min_=0,
    )
    d.timeseries(
        "KV cache usage per replica",
        [
            (f"max by (instance) ({by_model(f'kosmos_decoder_kv_cache_usage_perc{{{NS}}}')})", "{{instance}}"),
            (f"avg({by_model(f'kosmos_decoder_kv_cache_usage_perc{{{NS}}}')})", "pool mean"),
        ],
        unit="percentunit",
        min_=0,
        max_=1,
        thresholds=[0.9],
        description="Share of the KV token budget reserved by admitted sequences. KosmosDecoderKvCacheSaturated: "
        "pool mean above 90% with requests waiting, for 10m.",
    )
    d.timeseries(
        "Batch occupancy",
        [(mean("kosmos_decoder_batch_occupancy", NS, model_filter=True), "mean")]
        + quantiles("kosmos_decoder_batch_occupancy", NS, qs=(0.5, 0.95), model_filter=True),
        unit="percentunit",
        min_=0,
        max_=1,
        description="Sequences in an engine step over max_running_sequences, per step.",
    )
    d.timeseries(
        "Queue, prefill and decode time",
        quantiles("kosmos_decoder_queue_time_seconds", NS, qs=(0.5, 0.95), legend_prefix="queue ", model_filter=True)
        + quantiles("kosmos_decoder_prefill_time_seconds", NS, qs=(0.5, 0.95), legend_prefix="prefill ",
                    model_filter=True)
        + quantiles("kosmos_decoder_decode_time_seconds", NS, qs=(0.5, 0.95), legend_prefix="decode ",
                    model_filter=True),
        unit="s",
        min_=0,
    )
    d.timeseries(
        "Finished requests/s by reason",
        [
            (
                f"sum by (finish_reason) ({by_model(f'rate(kosmos_decoder_finished_requests_total{{{NS}}}[{RI}])')})",
                "{{finish_reason}}",
            )
        ],
        unit="reqps",
        min_=0,
        stack=True,
    )
    d.timeseries(
        "Decoder p95 time to first token (autoscaling guard)",
        quantiles(
            "gen_ai_server_time_to_first_token_seconds",
            f'job="kosmos-decoder", {MODEL}, {NS}',
            qs=(0.95,),
            window="2m",
        ),
        unit="s",
        min_=0,
        thresholds=[2],
        description="Over a fixed 2m window, as recorded in kosmos:ttft_seconds:p95{job=\"kosmos-decoder\"} and "
        "used by the decoder pool's autoscaler guard.",
    )

    # ------------------------------------------------------------------ gRPC
    kosmos_jobs = f'job=~"kosmos-gateway|kosmos-encoder|kosmos-decoder", {NOT_GRPC}, {NS}'
    d.row("gRPC")
    d.timeseries(
        "Calls/s by service, method and status",
        [
            (
                f"sum by (job, rpc_method, rpc_response_status_code) "
                f"(rate(rpc_server_call_duration_seconds_count{{{kosmos_jobs}}}[{RI}]))",
                "{{job}} {{rpc_method}} {{rpc_response_status_code}}",
            )
        ],
        unit="reqps",
        min_=0,
    )
    d.timeseries(
        "p95 call duration by method",
        quantiles("rpc_server_call_duration_seconds", kosmos_jobs, by="job, rpc_method", qs=(0.95,),
                  legend_prefix="{{job}} {{rpc_method}} "),
        unit="s",
        min_=0,
        description="Streams are timed until their last message.",
    )
    d.timeseries(
        "Non-OK calls/s by service and status code",
        [
            (
                f"sum by (job, rpc_response_status_code) (rate(rpc_server_call_duration_seconds_count"
                f'{{{kosmos_jobs}, rpc_response_status_code!="OK"}}[{RI}]))',
                "{{job}} {{rpc_response_status_code}}",
            )
        ],
        unit="reqps",
        min_=0,
        stack=True,
    )
    d.timeseries(
        "Gateway in-flight and rejected requests",
        [
            (f"sum(kosmos_gateway_requests_in_flight{{{NS}}})", "in flight"),
            (f"sum(rate(kosmos_gateway_requests_rejected_total{{{NS}}}[{RI}]))", "rejected/s (concurrency limit)"),
        ],
        unit="short",
        min_=0,
    )

    return {
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.4.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
            {"type": "panel", "id": "stat", "name": "Stat", "version": ""},
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "kosmos-serve: gateway, vision-encoder pool and decoder pool (metrics: docs/metrics.md).",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "liveNow": False,
        "panels": d.panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["kosmos", "llm", "grpc"],
        "templating": {
            "list": [
                {
                    "type": "datasource",
                    "name": "DS_PROMETHEUS",
                    "label": "Prometheus",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "options": [],
                    "refresh": 1,
                    "regex": "",
                },
                query_variable("namespace", "Namespace", "label_values(kosmos_build_info, namespace)", ".*"),
                query_variable(
                    "pool",
                    "Pool",
                    "label_values(kosmos_gateway_pool_inflight_requests, pool)",
                    None,
                    "GPU pool (encoder, decoder); one Queues & autoscaling row per selected pool.",
                ),
                query_variable("model", "Model", "label_values(kosmos_build_info, model)", ".*"),
            ]
        },
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "utc",
        "title": "kosmos-serve",
        "uid": "kosmos-serve",
        "version": 1,
        "weekStart": "",
    }


PROMETHEUS_RULE_HEADER = """\
# GENERATED by k8s/monitoring/generate.py from k8s/monitoring/rules.yaml: do not edit (edit rules.yaml and rerun).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: kosmos-serve
  labels:
    app.kubernetes.io/name: kosmos-serve
    app.kubernetes.io/component: monitoring
spec:
"""


def build_prometheus_rule(rules_text):
    lines = rules_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("groups:")), None)
    if start is None:
        raise SystemExit("rules.yaml: no top-level 'groups:' line")
    body = "\n".join(("  " + line) if line.strip() else "" for line in lines[start:])
    return PROMETHEUS_RULE_HEADER + body + "\n"


def main(argv):
    check = "--check" in argv[1:]
    outputs = {
        HERE / "dashboard.json": json.dumps(build_dashboard(), indent=2) + "\n",
        HERE / "prometheusrule.yaml": build_prometheus_rule((HERE / "rules.yaml").read_text()),
    }
    stale = []
    for path, text in outputs.items():
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(HERE.parent.parent)}")
    if stale:
        print(
            f"generate.py --check: {', '.join(stale)} out of date; run `python3 k8s/monitoring/generate.py`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
