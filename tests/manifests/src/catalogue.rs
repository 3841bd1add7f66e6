//! The metrics catalogue, docs/metrics.md: the names the services export, by service.

use anyhow::Context as _;
use kosmos_testkit::metrics::parse_catalogue;

/// One row of the catalogue table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    /// `all`, `gateway`, `encoder` or `decoder`.
    pub service: String,
    /// The Prometheus name as scraped.
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    pub kind: String,
}

/// The catalogue.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    /// Its rows.
    pub metrics: Vec<Metric>,
}

impl Catalogue {
    /// Parses the markdown table of docs/metrics.md (with the parser the services' metrics tests use).
    pub fn parse(markdown: &str) -> anyhow::Result<Self> {
        let metrics = parse_catalogue(markdown)?
            .into_iter()
            .map(|row| Metric {
                service: row.service,
                name: row.name,
                kind: row.kind,
            })
            .collect();
        Ok(Self { metrics })
    }

    /// Reads `docs/metrics.md` of the repository.
    pub fn load(repo: &std::path::Path) -> anyhow::Result<Self> {
        let path = repo.join("docs/metrics.md");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Whether a series named `series` is exported, by the service behind scrape job `job` when given
    /// (`kosmos-<service>`). Histograms export `_bucket`, `_sum` and `_count` series.
    pub fn exports(&self, series: &str, job: Option<&str>) -> bool {
        self.metrics.iter().any(|m| {
            let name_ok = m.name == series
                || (m.kind == "histogram"
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| series.strip_suffix(suffix) == Some(m.name.as_str())));
            let job_ok = match job {
                None => true,
                Some(job) => m.service == "all" || job == format!("kosmos-{}", m.service),
            };
            name_ok && job_ok
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "| service | name | type | labels | help |\n|---|---|---|---|---|\n\
        | all | kosmos_build_info | gauge | service | x |\n\
        | decoder | gen_ai_server_time_to_first_token_seconds | histogram | | x |\n\
        | gateway | kosmos_gateway_pool_pending_requests | gauge | pool | x |\n";

    #[test]
    fn names_suffixes_and_jobs() {
        let catalogue = Catalogue::parse(TABLE).expect("parses");
        assert_eq!(catalogue.metrics.len(), 3);
        assert!(catalogue.exports(
            "gen_ai_server_time_to_first_token_seconds_bucket",
            Some("kosmos-decoder")
        ));
        assert!(!catalogue.exports(
            "gen_ai_server_time_to_first_token_seconds_bucket",
            Some("kosmos-encoder")
        ));
        assert!(!catalogue.exports("kosmos_gateway_pool_pending_requests_bucket", None));
        assert!(catalogue.exports("kosmos_build_info", Some("kosmos-encoder")));
        assert!(!catalogue.exports("kosmos_gateway_pool_pending", None));
    }
}
