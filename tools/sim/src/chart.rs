//! The comparison as an SVG chart: offered load on top, GPUs (replicas asked for) of each deployment over time
//! below. Plain SVG text, written by hand: two panels of step lines need no plotting library.

use std::fmt::Write as _;

use crate::compare::Comparison;
use crate::keda::PoolKind;

const WIDTH: f64 = 960.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 200.0;
const TOP_PANEL: (f64, f64) = (40.0, 180.0);
const BOTTOM_PANEL: (f64, f64) = (230.0, 520.0);
const HEIGHT: f64 = 570.0;

/// One polyline of the chart.
struct Series {
    label: String,
    colour: &'static str,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// Renders the chart of a comparison.
pub fn render_svg(comparison: &Comparison) -> String {
    let horizon = comparison.horizon_seconds;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="20" font-size="14">kosmos-sim: {} requests, calibration {}, seed {}</text>"#,
        comparison.requests,
        escape(&comparison.calibration),
        comparison.seed
    );

    let load = Series {
        label: "requests/s".to_owned(),
        colour: "#444444",
        dashed: false,
        points: comparison
            .traffic
            .iter()
            .map(|s| (s.time, s.rate))
            .collect(),
    };
    let max_rate = load.points.iter().map(|p| p.1).fold(0.0, f64::max);
    let share = Series {
        label: "image-heavy share (x max rate)".to_owned(),
        colour: "#d62728",
        dashed: true,
        points: comparison
            .traffic
            .iter()
            .map(|s| (s.time, s.image_heavy_share * max_rate))
            .collect(),
    };
    panel(
        &mut svg,
        TOP_PANEL,
        horizon,
        max_rate,
        "offered load (req/s)",
        &[load, share],
    );

    let mut lines = Vec::new();
    let colours = ["#1f77b4", "#ff7f0e", "#2ca02c"];
    for (deployment, colour) in comparison.deployments.iter().zip(colours) {
        let Some(first) = deployment.pools.first() else {
            continue;
        };
        let total: Vec<(f64, f64)> = first
            .timeline
            .iter()
            .enumerate()
            .map(|(index, sample)| {
                let sum: u32 = deployment
                    .pools
                    .iter()
                    .filter_map(|pool| pool.timeline.get(index).map(|s| s.desired))
                    .sum();
                (sample.time, f64::from(sum))
            })
            .collect();
        lines.push(Series {
            label: format!(
                "{} total ({:.1} GPU-h)",
                deployment.name, deployment.gpu_hours
            ),
            colour,
            dashed: false,
            points: total,
        });
        if deployment.name == "split" {
            for pool in &deployment.pools {
                let label = match pool.kind {
                    PoolKind::Encoder => "split encoders",
                    PoolKind::Decoder => "split decoders",
                    PoolKind::Monolith => "monolith pods",
                };
                lines.push(Series {
                    label: label.to_owned(),
                    colour: if pool.kind == PoolKind::Encoder {
                        "#9467bd"
                    } else {
                        "#8c564b"
                    },
                    dashed: true,
                    points: pool
                        .timeline
                        .iter()
                        .map(|s| (s.time, f64::from(s.desired)))
                        .collect(),
                });
            }
        }
    }
    let max_replicas = lines
        .iter()
        .flat_map(|series| series.points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    panel(
        &mut svg,
        BOTTOM_PANEL,
        horizon,
        max_replicas,
        "GPUs (replicas)",
        &lines,
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">hours</text>"#,
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        HEIGHT - 10.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn panel(
    svg: &mut String,
    (top, bottom): (f64, f64),
    horizon: f64,
    max_y: f64,
    title: &str,
    series: &[Series],
) {
    let right = WIDTH - RIGHT;
    let max_y = nice_ceiling(max_y);
    let x = |time: f64| LEFT + (right - LEFT) * time / horizon;
    let y = |value: f64| bottom - (bottom - top) * value / max_y;
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#,
        top - 8.0,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{top}" width="{}" height="{}" fill="none" stroke="#999999"/>"##,
        right - LEFT,
        bottom - top
    );
    for step in 0..=4 {
        let value = max_y * f64::from(step) / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#eeeeee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT - 6.0,
            y(value) + 4.0,
            trim(value),
            y = y(value),
        );
    }
    let hours = (horizon / 3600.0).ceil().max(1.0) as u32;
    let tick_every = (hours / 12).max(1);
    for hour in (0..=hours).step_by(tick_every as usize) {
        let time = f64::from(hour) * 3600.0;
        if time > horizon {
            break;
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{hour}</text>"#,
            x(time),
            bottom + 16.0
        );
    }
    for (index, line) in series.iter().enumerate() {
        let mut path = String::new();
        let mut previous: Option<f64> = None;
        for &(time, value) in &line.points {
            // Step line: hold the previous value until this sample.
            if let Some(prev) = previous {
                let _ = write!(path, " L{:.1},{:.1}", x(time), y(prev));
            }
            let command = if previous.is_none() { 'M' } else { 'L' };
            let _ = write!(path, " {command}{:.1},{:.1}", x(time), y(value));
            previous = Some(value);
        }
        let dash = if line.dashed {
            r#" stroke-dasharray="5,3""#
        } else {
            ""
        };
        let _ = writeln!(
            svg,
            r#"<path d="{}" fill="none" stroke="{}" stroke-width="1.6"{dash}/>"#,
            path.trim(),
            line.colour
        );
        let legend_y = top + 14.0 + 18.0 * index as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{}" y1="{legend_y}" x2="{}" y2="{legend_y}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            right + 10.0,
            right + 34.0,
            line.colour,
            right + 40.0,
            legend_y + 4.0,
            escape(&line.label)
        );
    }
}

fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    for factor in [1.0, 2.0, 2.5, 4.0, 5.0, 8.0, 10.0] {
        if value <= factor * magnitude {
            return factor * magnitude;
        }
    }
    10.0 * magnitude
}

fn trim(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
