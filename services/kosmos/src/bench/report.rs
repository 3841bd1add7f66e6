//! The tables `kosmos bench` prints on stdout (Markdown, so they paste into docs as they are).

use std::fmt::Write as _;

use super::schema::{Load, Run, Stats, Summary};
use super::stats::Slo;

/// How a load reads in a table: `rate 2 req/s`, `rate inf`, `concurrency 4`.
pub fn describe_load(load: &Load) -> String {
    match load {
        Load::Poisson { rate: Some(rate) } => format!("rate {} req/s", trim(*rate)),
        Load::Poisson { rate: None } => "rate inf".into(),
        Load::Concurrency { concurrency } => format!("concurrency {concurrency}"),
    }
}

fn trim(value: f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn cell(value: Option<f64>) -> String {
    value.map_or_else(|| "–".into(), |v| format!("{v:.1}"))
}

fn latency_row(out: &mut String, name: &str, stats: &Stats) {
    let _ = writeln!(
        out,
        "| {name} | {} | {} | {} | {} | {} | {} |",
        stats.count,
        cell(stats.mean),
        cell(stats.p50),
        cell(stats.p90),
        cell(stats.p99),
        cell(stats.max)
    );
}

fn errors(summary: &Summary) -> String {
    if summary.errors_by_code.is_empty() {
        return "none".into();
    }
    summary
        .errors_by_code
        .iter()
        .map(|(code, count)| format!("{code} {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn slo_text(slo: &Slo) -> String {
    let mut parts = Vec::new();
    if let Some(ttft) = slo.ttft_ms {
        parts.push(format!("TTFT ≤ {} ms", trim(ttft)));
    }
    if let Some(tpot) = slo.tpot_ms {
        parts.push(format!("TPOT ≤ {} ms", trim(tpot)));
    }
    if parts.is_empty() {
        "no SLO given: every successful request".into()
    } else {
        parts.join(", ")
    }
}

/// One run: the counts, the rates and the latency table.
pub fn run_table(run: &Run, slo: &Slo) -> String {
    let s = &run.summary;
    let mut out = String::new();
    let _ = writeln!(out, "### {}\n", describe_load(&run.load));
    let _ = writeln!(
        out,
        "{} requests: {} OK, errors: {} · {:.2} s",
        s.requests,
        s.successful,
        errors(s),
        s.duration_seconds
    );
    let _ = writeln!(
        out,
        "{:.2} requests/s · {:.1} output tokens/s ({} output, {} prompt tokens; {} of {} stopped before max_new_tokens) \
         · goodput {:.2} requests/s ({} requests; {})\n",
        s.request_throughput,
        s.output_token_throughput,
        s.total_output_tokens,
        s.total_prompt_tokens,
        s.ended_early,
        s.successful,
        s.goodput,
        s.goodput_requests,
        slo_text(slo)
    );
    let _ = writeln!(out, "| latency (ms) | n | mean | p50 | p90 | p99 | max |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    latency_row(&mut out, "time to first token", &s.ttft_ms);
    latency_row(&mut out, "time per output token", &s.tpot_ms);
    latency_row(&mut out, "inter-token latency", &s.itl_ms);
    latency_row(&mut out, "end-to-end", &s.e2e_ms);
    out
}

/// A sweep: one row per load level.
pub fn sweep_table(runs: &[Run]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| load | OK | errors | req/s | output tok/s | goodput req/s | TTFT p50 | TTFT p99 | TPOT p50 | ITL p99 | E2E p50 | E2E p99 |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for run in runs {
        let s = &run.summary;
        let _ = writeln!(
            out,
            "| {} | {}/{} | {} | {:.2} | {:.1} | {:.2} | {} | {} | {} | {} | {} | {} |",
            describe_load(&run.load),
            s.successful,
            s.requests,
            errors(s),
            s.request_throughput,
            s.output_token_throughput,
            s.goodput,
            cell(s.ttft_ms.p50),
            cell(s.ttft_ms.p99),
            cell(s.tpot_ms.p50),
            cell(s.itl_ms.p99),
            cell(s.e2e_ms.p50),
            cell(s.e2e_ms.p99)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_read_plainly() {
        assert_eq!(
            describe_load(&Load::Poisson { rate: Some(2.5) }),
            "rate 2.5 req/s"
        );
        assert_eq!(
            describe_load(&Load::Poisson { rate: Some(4.0) }),
            "rate 4 req/s"
        );
        assert_eq!(describe_load(&Load::Poisson { rate: None }), "rate inf");
        assert_eq!(
            describe_load(&Load::Concurrency { concurrency: 3 }),
            "concurrency 3"
        );
    }
}
