//! The latency-throughput chart of a sweep, as SVG (plotters): one point per load level, achieved requests/s
//! against p50 and p99 of time to first token and of end-to-end latency.

use std::path::Path;

use plotters::prelude::*;

use super::report::describe_load;
use super::schema::Run;

/// One line of the chart.
struct Series {
    label: &'static str,
    colour: RGBColor,
    points: Vec<(f64, f64)>,
}

/// Writes the chart of `runs` to `path` (SVG).
pub fn write_svg(path: &Path, runs: &[Run], title: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        path.extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("svg")),
        "--chart writes SVG: give a file name ending in .svg, got {}",
        path.display()
    );
    let series = series(runs);
    let x_max = runs
        .iter()
        .map(|run| run.summary.request_throughput)
        .fold(0.0, f64::max)
        .max(0.01)
        * 1.15;
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|(_, y)| *y))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    let draw_error =
        |err: &dyn std::fmt::Display| anyhow::anyhow!("cannot draw {}: {err}", path.display());
    root.fill(&WHITE).map_err(|e| draw_error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| draw_error(&e))?;
    chart
        .configure_mesh()
        .x_desc("achieved throughput (requests/s)")
        .y_desc("latency (ms)")
        .draw()
        .map_err(|e| draw_error(&e))?;
    for line in &series {
        let colour = line.colour;
        chart
            .draw_series(LineSeries::new(line.points.clone(), colour.stroke_width(2)))
            .map_err(|e| draw_error(&e))?
            .label(line.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(
                line.points
                    .iter()
                    .map(|point| Circle::new(*point, 4, colour.filled())),
            )
            .map_err(|e| draw_error(&e))?;
    }
    // Each point of the last line is labelled with its offered load.
    if let Some(line) = series.last() {
        chart
            .draw_series(line.points.iter().zip(runs).map(|(point, run)| {
                Text::new(describe_load(&run.load), *point, ("sans-serif", 12))
            }))
            .map_err(|e| draw_error(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw_error(&e))?;
    root.present().map_err(|e| draw_error(&e))?;
    Ok(())
}

/// The lines with at least one point (Score has no time to first token).
fn series(runs: &[Run]) -> Vec<Series> {
    let line = |label, colour, value: &dyn Fn(&Run) -> Option<f64>| Series {
        label,
        colour,
        points: runs
            .iter()
            .filter_map(|run| value(run).map(|y| (run.summary.request_throughput, y)))
            .collect(),
    };
    [
        line("TTFT p50", RGBColor(31, 119, 180), &|run| {
            run.summary.ttft_ms.p50
        }),
        line("TTFT p99", RGBColor(174, 199, 232), &|run| {
            run.summary.ttft_ms.p99
        }),
        line("end-to-end p50", RGBColor(214, 39, 40), &|run| {
            run.summary.e2e_ms.p50
        }),
        line("end-to-end p99", RGBColor(255, 152, 150), &|run| {
            run.summary.e2e_ms.p99
        }),
    ]
    .into_iter()
    .filter(|series| !series.points.is_empty())
    .collect()
}
