//! Just enough PromQL to find the series selectors of an expression: every metric name with its label matchers.
//! Functions, aggregations, keywords, label lists after `by`/`on`/…, strings, numbers, durations and ranges are
//! skipped. A name it cannot read is reported as an error rather than ignored.

use anyhow::{Context as _, bail};

/// One label matcher, e.g. `pool="encoder"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    /// Label name.
    pub label: String,
    /// `=`, `!=`, `=~` or `!~`.
    pub op: String,
    /// The value, unquoted.
    pub value: String,
}

/// A vector selector: a metric name (possibly given as `__name__`) and its other matchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// The metric name.
    pub name: String,
    /// The matchers other than `__name__`.
    pub matchers: Vec<Matcher>,
}

impl Selector {
    /// The value of an equality matcher on `label`, if any.
    pub fn equal(&self, label: &str) -> Option<&str> {
        self.matchers
            .iter()
            .find(|m| m.label == label && m.op == "=")
            .map(|m| m.value.as_str())
    }
}

const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
    // aggregation operators, which may stand before `by (…)` instead of their `(`
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
];
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A metric name as Prometheus accepts it.
pub fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(is_ident_start) && chars.all(is_ident)
}

/// The series selectors of `expr`.
pub fn selectors(expr: &str) -> anyhow::Result<Vec<Selector>> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i)?;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            // A selector without a name before it: `{__name__="x", …}`.
            let (matchers, next) = parse_matchers(&chars, i)?;
            i = next;
            out.extend(named_by_matchers(matchers)?);
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let next = chars.get(j).copied();
            if LABEL_LIST_KEYWORDS.contains(&word.as_str()) {
                if next == Some('(') {
                    while j < chars.len() && chars[j] != ')' {
                        j += 1;
                    }
                    i = j + 1;
                }
            } else if KEYWORDS.contains(&word.as_str()) || next == Some('(') {
                // a keyword, a function or an aggregation
            } else if next == Some('{') {
                let (matchers, after) = parse_matchers(&chars, j)?;
                i = after;
                out.push(Selector {
                    name: word,
                    matchers,
                });
            } else {
                out.push(Selector {
                    name: word,
                    matchers: Vec::new(),
                });
            }
        } else {
            i += 1;
        }
    }
    Ok(out)
}

fn skip_string(chars: &[char], start: usize) -> anyhow::Result<usize> {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        if chars[i] == '\\' && quote != '`' {
            i += 2;
            continue;
        }
        if chars[i] == quote {
            return Ok(i + 1);
        }
        i += 1;
    }
    bail!("unterminated string starting at {start}")
}

/// Parses `{a="b", c=~"d"}` starting at the `{`; returns the matchers and the index after `}`.
fn parse_matchers(chars: &[char], start: usize) -> anyhow::Result<(Vec<Matcher>, usize)> {
    let mut i = start + 1;
    let mut matchers = Vec::new();
    loop {
        while i < chars.len() && (chars[i].is_whitespace() || chars[i] == ',') {
            i += 1;
        }
        match chars.get(i) {
            None => bail!("unterminated label matchers starting at {start}"),
            Some('}') => return Ok((matchers, i + 1)),
            Some(_) => {}
        }
        let label_start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let label: String = chars[label_start..i].iter().collect();
        if label.is_empty() {
            bail!("expected a label name at {i}");
        }
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let op_start = i;
        while i < chars.len() && matches!(chars[i], '=' | '!' | '~') {
            i += 1;
        }
        let op: String = chars[op_start..i].iter().collect();
        if !matches!(op.as_str(), "=" | "!=" | "=~" | "!~") {
            bail!("unknown matcher operator `{op}` after `{label}`");
        }
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if !matches!(chars.get(i), Some('"' | '\'' | '`')) {
            bail!("expected a quoted value after `{label}{op}`");
        }
        let end = skip_string(chars, i)?;
        let raw: String = chars[i + 1..end - 1].iter().collect();
        let value = raw
            .replace("\\\\", "\u{0}")
            .replace('\\', "")
            .replace('\u{0}', "\\");
        matchers.push(Matcher { label, op, value });
        i = end;
    }
}

fn named_by_matchers(matchers: Vec<Matcher>) -> anyhow::Result<Vec<Selector>> {
    let name = matchers
        .iter()
        .find(|m| m.label == "__name__")
        .context("a selector without a metric name or `__name__` matcher")?
        .clone();
    let rest: Vec<Matcher> = matchers
        .into_iter()
        .filter(|m| m.label != "__name__")
        .collect();
    let names = match name.op.as_str() {
        "=" => vec![name.value],
        "=~" => alternatives(&name.value)?,
        op => bail!("`__name__{op}` cannot be checked against the catalogue"),
    };
    Ok(names
        .into_iter()
        .map(|name| Selector {
            name,
            matchers: rest.clone(),
        })
        .collect())
}

/// The names of a regex that is a plain alternation of metric names, optionally in one group: `(a|b|c)` or `a|b`.
pub fn alternatives(regex: &str) -> anyhow::Result<Vec<String>> {
    let inner = regex
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or(regex);
    let names: Vec<String> = inner.split('|').map(str::to_string).collect();
    if let Some(bad) = names.iter().find(|n| !is_metric_name(n)) {
        bail!(
            "`{regex}`: `{bad}` is not a plain metric name, so it cannot be checked against the catalogue"
        );
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        selectors(expr)
            .expect("parses")
            .into_iter()
            .map(|s| s.name)
            .collect()
    }

    #[test]
    fn finds_the_metrics_of_an_autoscaling_query() {
        let expr = r#"(histogram_quantile(0.95, sum by (le) (rate(gen_ai_server_time_to_first_token_seconds_bucket{job="kosmos-decoder",namespace="kosmos"}[2m]))) >= 0) or vector(0)"#;
        let found = selectors(expr).expect("parses");
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].name,
            "gen_ai_server_time_to_first_token_seconds_bucket"
        );
        assert_eq!(found[0].equal("job"), Some("kosmos-decoder"));
        assert_eq!(found[0].equal("namespace"), Some("kosmos"));
    }

    #[test]
    fn skips_keywords_label_lists_strings_and_durations() {
        let expr = r#"sum by (namespace, pool) (a_total{x!~"grpc[.].*"}) + on (namespace, pool) group_left (y) b offset 5m
            / ignoring(le) clamp_min(kosmos:c:max, 1) unless absent(d{pool="e"}) and 0 * e == bool 1.5e3"#;
        assert_eq!(names(expr), ["a_total", "b", "kosmos:c:max", "d", "e"]);
    }

    #[test]
    fn reads_name_matchers() {
        assert_eq!(names(r#"{__name__=~"(a|b)",pool="x"}"#), ["a", "b"]);
        assert!(selectors(r#"{__name__=~"a.*"}"#).is_err());
        assert!(selectors(r#"{pool="x"}"#).is_err());
    }
}
