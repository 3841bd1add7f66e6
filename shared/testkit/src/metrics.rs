//! `/metrics` in tests: a tiny HTTP/1.1 scrape, the catalogue of `docs/metrics.md`, the comparison of an
//! exposition with it, sample lookups, and `promtool check metrics` when promtool is available.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

use crate::repo_root;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET http://{address}/metrics`: the body of a 200 answer.
pub async fn scrape(address: SocketAddr) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let raw = String::from_utf8(raw).context("the answer is not UTF-8")?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .context("the answer has no header end")?;
    let status = head.lines().next().unwrap_or_default();
    ensure!(status.contains(" 200 "), "GET /metrics answered `{status}`");
    let head = head.to_ascii_lowercase();
    ensure!(
        head.contains("content-type: text/plain"),
        "not Prometheus text: {head}"
    );
    if head.contains("transfer-encoding: chunked") {
        return dechunk(body);
    }
    Ok(body.to_string())
}

/// The parsed scrape of `address` once `settled` holds for it, or the last one after `limit`. A server records a
/// streamed call when its trailers pass, which may be just after the caller has its answer.
pub async fn scrape_eventually(
    address: SocketAddr,
    limit: std::time::Duration,
    settled: impl Fn(&prometheus_parse::Scrape) -> bool,
) -> Result<prometheus_parse::Scrape> {
    let started = std::time::Instant::now();
    loop {
        let scraped = parse(&scrape(address).await?)?;
        if settled(&scraped) || started.elapsed() >= limit {
            return Ok(scraped);
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("truncated chunk size")?;
        let size = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        ensure!(rest.len() >= size + 2, "truncated chunk");
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// The exposition parsed by `prometheus-parse`.
pub fn parse(text: &str) -> Result<prometheus_parse::Scrape> {
    let lines = text.lines().map(|line| Ok(line.to_string()));
    prometheus_parse::Scrape::parse(lines).context("the exposition does not parse")
}

/// One row of the catalogue table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogueRow {
    /// `all`, `gateway`, `encoder` or `decoder`.
    pub service: String,
    /// The Prometheus family name.
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    pub kind: String,
    /// The label names (scope labels aside).
    pub labels: BTreeSet<String>,
    /// The help text.
    pub help: String,
}

/// The rows of `docs/metrics.md` for `service` and for `all`.
pub fn catalogue(service: &str) -> Result<Vec<CatalogueRow>> {
    let path = repo_root().join("docs/metrics.md");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let rows = parse_catalogue(&text)?;
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|row| row.service == service || row.service == "all")
        .collect();
    ensure!(!rows.is_empty(), "docs/metrics.md has no row for {service}");
    Ok(rows)
}

/// Every row of the markdown table whose header is `service | name | type | labels | help`.
pub fn parse_catalogue(markdown: &str) -> Result<Vec<CatalogueRow>> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in markdown.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.first() == Some(&"service") && cells.get(1) == Some(&"name") {
            ensure!(
                cells == ["service", "name", "type", "labels", "help"],
                "unexpected catalogue header: {cells:?}"
            );
            in_table = true;
            continue;
        }
        if !in_table || cells.iter().all(|cell| cell.chars().all(|c| c == '-')) {
            continue;
        }
        ensure!(
            cells.len() == 5,
            "a catalogue row has {} cells: {line}",
            cells.len()
        );
        rows.push(CatalogueRow {
            service: cells[0].to_string(),
            name: cells[1].to_string(),
            kind: cells[2].to_string(),
            labels: cells[3]
                .split(',')
                .map(str::trim)
                .filter(|label| !label.is_empty())
                .map(String::from)
                .collect(),
            help: cells[4].to_string(),
        });
    }
    ensure!(!rows.is_empty(), "no catalogue table found");
    Ok(rows)
}

/// A metric family as exposed: its type, help text and the label names of its samples.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Family {
    /// From `# TYPE`.
    pub kind: String,
    /// From `# HELP` (unescaped).
    pub help: String,
    /// Label names seen on its samples, `le` and the scope labels aside.
    pub labels: BTreeSet<String>,
}

/// The families of an exposition, by name.
pub fn families(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_string()).or_default().help =
                help.replace("\\n", "\n").replace("\\\\", "\\");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_string()).or_default().kind = kind.trim().to_string();
        }
    }
    let names: Vec<String> = families.keys().cloned().collect();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let series = line.split_whitespace().next().unwrap_or_default();
        let (metric, labels) = match series.split_once('{') {
            Some((metric, labels)) => (metric, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = names.iter().find(|name| {
            metric == name.as_str()
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| metric.strip_suffix(suffix) == Some(name.as_str()))
        });
        let Some(family) = family.and_then(|name| families.get_mut(name)) else {
            continue;
        };
        for pair in split_labels(labels) {
            if let Some((key, _)) = pair.split_once('=') {
                let key = key.trim();
                if ![
                    "le",
                    "otel_scope_name",
                    "otel_scope_version",
                    "otel_scope_schema_url",
                ]
                .contains(&key)
                {
                    family.labels.insert(key.to_string());
                }
            }
        }
    }
    families
}

/// `a="x",b="y, z"` → its pairs (commas inside quoted values kept).
fn split_labels(labels: &str) -> Vec<&str> {
    let mut pairs = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (index, character) in labels.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match character {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                pairs.push(&labels[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    if start < labels.len() {
        pairs.push(&labels[start..]);
    }
    pairs
}

/// Checks that the families of `text` are exactly the catalogue rows of `service` (and `all`): same names,
/// types and help texts, and no label the catalogue does not list.
pub fn assert_matches_catalogue(text: &str, service: &str) -> Result<()> {
    let rows = catalogue(service)?;
    let exposed = families(text);
    let expected: BTreeSet<&str> = rows.iter().map(|row| row.name.as_str()).collect();
    let found: BTreeSet<&str> = exposed.keys().map(String::as_str).collect();
    let mut problems = Vec::new();
    for missing in expected.difference(&found) {
        problems.push(format!("in docs/metrics.md but not exported: {missing}"));
    }
    for extra in found.difference(&expected) {
        problems.push(format!("exported but not in docs/metrics.md: {extra}"));
    }
    for row in &rows {
        let Some(family) = exposed.get(&row.name) else {
            continue;
        };
        if family.kind != row.kind {
            problems.push(format!(
                "{}: type {} exported, {} in the catalogue",
                row.name, family.kind, row.kind
            ));
        }
        if family.help != row.help {
            problems.push(format!(
                "{}: help `{}` exported, `{}` in the catalogue",
                row.name, family.help, row.help
            ));
        }
        for label in family.labels.difference(&row.labels) {
            problems.push(format!(
                "{}: label `{label}` exported but not in the catalogue",
                row.name
            ));
        }
    }
    if !problems.is_empty() {
        bail!(
            "/metrics of the {service} differs from docs/metrics.md:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// The sum of the samples named `metric` whose labels include `labels` (counters, gauges, `_count`, `_sum`).
pub fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == metric)
        .filter(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// Where promtool is: on `PATH`, or where `k8s/monitoring/check.sh` installs it (`.tools/promtool`).
pub fn promtool() -> Option<PathBuf> {
    let local = repo_root().join(".tools/promtool/usr/bin/promtool");
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("promtool"))
            .find(|path| path.is_file())
    })
}

/// The variable that skips `promtool check metrics` explicitly when promtool is not installed.
pub const SKIP_PROMTOOL_ENV: &str = "KOSMOS_SKIP_PROMTOOL";

/// `promtool check metrics` on `text` (lint included). Without promtool it fails (as a missing `kubectl` fails the
/// manifest checks), unless `KOSMOS_SKIP_PROMTOOL=1` says to skip it: then a note and `Ok`.
pub fn promtool_check(text: &str) -> Result<()> {
    let Some(promtool) = promtool() else {
        if std::env::var(SKIP_PROMTOOL_ENV).is_ok_and(|value| value == "1") {
            eprintln!(
                "note: promtool not found, skipping `promtool check metrics` ({SKIP_PROMTOOL_ENV}=1)"
            );
            return Ok(());
        }
        bail!(
            "promtool not found (PATH or .tools/promtool; `k8s/monitoring/check.sh` installs it); set \
             {SKIP_PROMTOOL_ENV}=1 to skip `promtool check metrics`"
        );
    };
    run_promtool(&promtool, text)
}

fn run_promtool(promtool: &Path, text: &str) -> Result<()> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", promtool.display()))?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
