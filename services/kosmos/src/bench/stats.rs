//! From per-request records to a run's summary: percentiles, throughput, goodput, errors by code.

use std::collections::BTreeMap;

use super::schema::{RequestRecord, Stats, Summary};

/// The service-level objectives goodput counts against (none given: every successful request is good).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Slo {
    /// Most time to first token, ms.
    pub ttft_ms: Option<f64>,
    /// Most time per output token, ms.
    pub tpot_ms: Option<f64>,
}

impl Slo {
    /// Whether a successful request meets every objective. A request without a TTFT (Score) is held to the TTFT
    /// objective by its end-to-end latency; one without a TPOT (fewer than two output tokens) meets that one.
    pub fn met_by(&self, record: &RequestRecord) -> bool {
        if record.status != "OK" {
            return false;
        }
        let first = record.ttft_ms.unwrap_or(record.e2e_ms);
        let ttft_ok = self.ttft_ms.is_none_or(|limit| first <= limit);
        let tpot_ok = match (self.tpot_ms, record.tpot_ms) {
            (Some(limit), Some(tpot)) => tpot <= limit,
            _ => true,
        };
        ttft_ok && tpot_ok
    }
}

/// The `q`-th percentile (0–100) of sorted values by linear interpolation between closest ranks (numpy's
/// default), or None for no values.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    debug_assert!(sorted.windows(2).all(|pair| pair[0] <= pair[1]));
    let last = sorted.len().checked_sub(1)?;
    let rank = q / 100.0 * last as f64;
    let below = rank.floor() as usize;
    let above = rank.ceil() as usize;
    let weight = rank - below as f64;
    Some(sorted[below] + (sorted[above] - sorted[below]) * weight)
}

/// The distribution of `values` (any order).
pub fn stats(mut values: Vec<f64>) -> Stats {
    values.sort_by(f64::total_cmp);
    let mean = (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64);
    Stats {
        count: values.len() as u64,
        mean,
        p50: percentile(&values, 50.0),
        p90: percentile(&values, 90.0),
        p99: percentile(&values, 99.0),
        max: values.last().copied(),
    }
}

/// What the records of a run add up to; `duration_seconds` is the run's wall time (first send to last
/// completion).
pub fn summarize(records: &[RequestRecord], duration_seconds: f64) -> Summary {
    let successful: Vec<&RequestRecord> = records.iter().filter(|r| r.status == "OK").collect();
    let mut errors_by_code = BTreeMap::new();
    for record in records.iter().filter(|r| r.status != "OK") {
        *errors_by_code.entry(record.status.clone()).or_insert(0) += 1;
    }
    let total_output_tokens: u64 = successful.iter().map(|r| u64::from(r.output_tokens)).sum();
    let total_prompt_tokens: u64 = successful
        .iter()
        .filter_map(|r| r.prompt_tokens)
        .map(u64::from)
        .sum();
    let ended_early = successful
        .iter()
        .filter(|r| r.max_new_tokens > 0 && r.output_tokens < r.max_new_tokens)
        .count() as u64;
    let goodput_requests = records.iter().filter(|r| r.good).count() as u64;
    let per_second = |count: u64| {
        if duration_seconds > 0.0 {
            count as f64 / duration_seconds
        } else {
            0.0
        }
    };
    Summary {
        requests: records.len() as u64,
        successful: successful.len() as u64,
        errors_by_code,
        duration_seconds,
        request_throughput: per_second(successful.len() as u64),
        output_token_throughput: per_second(total_output_tokens),
        total_prompt_tokens,
        total_output_tokens,
        ended_early,
        goodput_requests,
        goodput: per_second(goodput_requests),
        ttft_ms: stats(successful.iter().filter_map(|r| r.ttft_ms).collect()),
        tpot_ms: stats(successful.iter().filter_map(|r| r.tpot_ms).collect()),
        itl_ms: stats(
            successful
                .iter()
                .flat_map(|r| r.itl_ms.iter().copied())
                .collect(),
        ),
        e2e_ms: stats(successful.iter().map(|r| r.e2e_ms).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        status: &str,
        ttft_ms: Option<f64>,
        tpot_ms: Option<f64>,
        e2e_ms: f64,
    ) -> RequestRecord {
        RequestRecord {
            index: 0,
            sent_ms: 0.0,
            send_lag_ms: 0.0,
            status: status.into(),
            error: None,
            images: 0,
            image_bytes: 0,
            reused_images: false,
            prompt_words: 1,
            max_new_tokens: 4,
            prompt_tokens: Some(3),
            output_tokens: if status == "OK" { 4 } else { 0 },
            finish_reason: None,
            ttft_ms,
            tpot_ms,
            itl_ms: vec![],
            e2e_ms,
            good: status == "OK",
        }
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let values = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&values, 50.0), Some(2.5));
        assert_eq!(percentile(&values, 0.0), Some(1.0));
        assert_eq!(percentile(&values, 100.0), Some(4.0));
        // numpy.percentile([1, 2, 3, 4], 90) = 3.7
        assert!((percentile(&values, 90.0).expect("a test value") - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn stats_of_nothing_are_null() {
        let empty = stats(vec![]);
        assert_eq!(empty.count, 0);
        assert!(empty.mean.is_none() && empty.p50.is_none() && empty.max.is_none());
        let some = stats(vec![3.0, 1.0, 2.0]);
        assert_eq!(
            (some.mean, some.p50, some.max),
            (Some(2.0), Some(2.0), Some(3.0))
        );
    }

    #[test]
    fn slo_holds_each_request_to_each_objective() {
        let slo = Slo {
            ttft_ms: Some(100.0),
            tpot_ms: Some(10.0),
        };
        assert!(slo.met_by(&record("OK", Some(100.0), Some(10.0), 130.0)));
        assert!(!slo.met_by(&record("OK", Some(101.0), Some(5.0), 130.0)));
        assert!(!slo.met_by(&record("OK", Some(50.0), Some(11.0), 130.0)));
        assert!(
            slo.met_by(&record("OK", Some(50.0), None, 50.0)),
            "one token has no TPOT"
        );
        assert!(
            !slo.met_by(&record("OK", None, None, 150.0)),
            "Score: e2e against the TTFT objective"
        );
        assert!(!slo.met_by(&record("UNAVAILABLE", Some(1.0), Some(1.0), 2.0)));
        assert!(Slo::default().met_by(&record("OK", Some(1e9), Some(1e9), 1e9)));
    }

    #[test]
    fn summary_accounts_for_every_request() {
        let records = vec![
            record("OK", Some(10.0), Some(2.0), 16.0),
            record("OK", Some(20.0), Some(4.0), 32.0),
            record("RESOURCE_EXHAUSTED", None, None, 1.0),
            record("RESOURCE_EXHAUSTED", None, None, 1.0),
            record("UNAVAILABLE", None, None, 1.0),
        ];
        let summary = summarize(&records, 2.0);
        assert_eq!(summary.requests, 5);
        assert_eq!(summary.successful, 2);
        assert_eq!(summary.errors_by_code["RESOURCE_EXHAUSTED"], 2);
        assert_eq!(summary.errors_by_code["UNAVAILABLE"], 1);
        assert_eq!(summary.request_throughput, 1.0);
        assert_eq!(summary.total_output_tokens, 8);
        assert_eq!(summary.output_token_throughput, 4.0);
        assert_eq!(summary.ttft_ms.p50, Some(15.0));
        assert_eq!(summary.e2e_ms.max, Some(32.0), "errors are not latencies");
        assert_eq!(summary.goodput_requests, 2);
    }
}
