//! `--out DIR`: the run's files. `report.json` (the summary), `timeseries.csv` (one row per
//! second) and `report.html`: one self-contained page (inline SVG drawn with `plotters`, no
//! script, nothing to fetch) with the summary table, plots over time (throughput, TTFT
//! percentiles, open sockets, errors) and the latency histograms.

use std::{fmt::Write as _, path::Path};

use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde_json::{Map, Value};

use crate::{live::Row, stats::Report};

/// Writes the three files into `dir` (created if missing).
pub fn write(
    dir: &Path,
    summary: &Map<String, Value>,
    rows: &[Row],
    report: &Report,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(summary)?,
    )?;
    std::fs::write(dir.join("timeseries.csv"), csv(rows))?;
    std::fs::write(dir.join("report.html"), html(summary, rows, report)?)?;
    Ok(())
}

/// One line per second, with a header.
pub fn csv(rows: &[Row]) -> String {
    let mut out = String::from(
        "t_s,open_sockets,messages_per_s,tokens_per_s,answers_per_s,errors,ttft_p50_ms,ttft_p99_ms\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:.1},{},{:.1},{:.1},{:.1},{},{:.3},{:.3}",
            r.t,
            r.open_sockets,
            r.messages_per_s,
            r.tokens_per_s,
            r.answers_per_s,
            r.errors,
            r.ttft_p50_ms,
            r.ttft_p99_ms
        );
    }
    out
}

type Series<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

/// A line chart of `series` over the run's seconds, as SVG.
fn line_chart(title: &str, unit: &str, series: &[Series<'_>]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 280)).into_drawing_area();
        root.fill(&WHITE)?;
        let x_max = series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.0))
            .fold(1.0_f64, f64::max);
        let y_max = series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.1))
            .fold(0.0_f64, f64::max)
            .max(1e-3)
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(unit)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        for (name, points, color) in series {
            let color = *color;
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(RGBColor(200, 200, 200))
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// The distribution of a latency histogram (40 bars up to its p99.9), as SVG.
fn histogram_chart(title: &str, h: &Histogram<u64>) -> anyhow::Result<String> {
    let mut svg = String::new();
    if h.is_empty() {
        return Ok(format!("<p>{title}: no samples.</p>"));
    }
    let top = (h.value_at_quantile(0.999) as f64 / 1000.0).max(0.01) * 1.05;
    let width = top / 40.0;
    let mut bars = vec![0u64; 40];
    for v in h.iter_recorded() {
        let ms = v.value_iterated_to() as f64 / 1000.0;
        let i = ((ms / width) as usize).min(39);
        bars[i] += v.count_at_value();
    }
    let y_max = bars.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.1;
    {
        let root = SVGBackend::with_string(&mut svg, (370, 240)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 14))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..top, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("ms")
            .y_desc("count")
            .disable_x_mesh()
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        chart.draw_series(bars.iter().enumerate().map(|(i, n)| {
            let x = i as f64 * width;
            Rectangle::new(
                [(x, 0.0), (x + width * 0.9, *n as f64)],
                RGBColor(9, 105, 218).filled(),
            )
        }))?;
        root.present()?;
    }
    Ok(svg)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The summary as a table: latencies one row each, then the plain figures.
/// The report's latency histograms, in the order the tables show them.
const LATENCY_FIELDS: [&str; 6] = [
    "connect_ms",
    "ack_ms",
    "ttft_ms",
    "itl_ms",
    "e2e_ms",
    "storm_reconnect_ms",
];

fn summary_table(summary: &Map<String, Value>) -> String {
    let stats = [
        "count", "avg", "min", "p50", "p90", "p95", "p99", "p99_9", "max",
    ];
    let mut out = String::from("<table><tr><th>latency (ms)</th>");
    for s in stats {
        let _ = write!(out, "<th>{s}</th>");
    }
    out.push_str("</tr>");
    for name in LATENCY_FIELDS {
        let _ = write!(out, "<tr><td>{name}</td>");
        for s in stats {
            let v = summary
                .get(name)
                .and_then(|h| h.get(s))
                .and_then(Value::as_f64);
            let _ = write!(
                out,
                "<td>{}</td>",
                v.map_or("—".into(), |v| format!("{v:.2}"))
            );
        }
        out.push_str("</tr>");
    }
    out.push_str("</table><table><tr><th>figure</th><th>value</th></tr>");
    for (k, v) in summary {
        if !v.is_object() && k != "parameters" {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td></tr>",
                escape(k),
                escape(&v.to_string())
            );
        }
    }
    out.push_str("</table>");
    out
}

/// The page.
pub fn html(summary: &Map<String, Value>, rows: &[Row], report: &Report) -> anyhow::Result<String> {
    let over = |f: fn(&Row) -> f64| rows.iter().map(|r| (r.t, f(r))).collect::<Vec<_>>();
    let blue = RGBColor(9, 105, 218);
    let green = RGBColor(31, 136, 61);
    let red = RGBColor(207, 34, 46);
    let plots = [
        line_chart(
            "Throughput",
            "per second",
            &[("tokens/s", over(|r| r.tokens_per_s), blue)],
        )?,
        line_chart(
            "Messages and answers",
            "per second",
            &[
                ("messages/s", over(|r| r.messages_per_s), blue),
                ("answers/s", over(|r| r.answers_per_s), green),
            ],
        )?,
        line_chart(
            "Time to first token",
            "ms",
            &[
                ("p50", over(|r| r.ttft_p50_ms), blue),
                ("p99", over(|r| r.ttft_p99_ms), red),
            ],
        )?,
        line_chart(
            "Open sockets",
            "sockets",
            &[("open", over(|r| r.open_sockets as f64), green)],
        )?,
        line_chart(
            "Errors",
            "per second",
            &[("errors", over(|r| r.errors as f64), red)],
        )?,
    ];
    let histograms = [
        histogram_chart("Time to first token", &report.ttft_us.histogram()?)?,
        histogram_chart("Inter-token latency", &report.itl_us.histogram()?)?,
        histogram_chart("End to end", &report.e2e_us.histogram()?)?,
        histogram_chart("Acknowledgement", &report.ack_us.histogram()?)?,
    ];
    let mut page = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Parley load report</title>\
         <style>body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1b1f24}\
         table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:right}\
         td:first-child,th:first-child{text-align:left}.plots svg{display:block;margin:8px 0}\
         .hist{display:flex;flex-wrap:wrap;gap:8px}</style></head><body><h1>Parley load report</h1>",
    );
    let partial = summary
        .get("partial")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if partial {
        let why = summary
            .get("partial_reason")
            .and_then(Value::as_str)
            .unwrap_or("");
        let _ = write!(page, "<p><strong>Partial run:</strong> {}</p>", escape(why));
    }
    page.push_str(&summary_table(summary));
    page.push_str("<h2>Over time</h2><div class=\"plots\">");
    plots.iter().for_each(|p| page.push_str(p));
    page.push_str("</div><h2>Latency distributions</h2><div class=\"hist\">");
    histograms.iter().for_each(|p| page.push_str(p));
    page.push_str("</div></body></html>");
    Ok(page)
}

/// The end-of-run summary for the terminal, as k6 prints it.
pub fn table(summary: &serde_json::Map<String, serde_json::Value>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let stat = |h: &serde_json::Value, s: &str| h.get(s).and_then(serde_json::Value::as_f64);
    for name in LATENCY_FIELDS {
        let Some(h) = summary.get(name).filter(|h| stat(h, "p50").is_some()) else {
            continue;
        };
        let _ = write!(out, "  {:<11}", name.trim_end_matches("_ms"));
        for s in ["avg", "min", "p50", "p90", "p95", "p99", "max"] {
            let _ = write!(out, " {s}={:.2}ms", stat(h, s).unwrap_or(0.0));
        }
        out.push('\n');
    }
    for key in [
        "answers",
        "tokens_per_second",
        "messages_per_second",
        "goodput",
        "errors",
        "refused",
        "reconnects",
        "storm_reconnects",
        "storm_reconnect_rate_per_s",
        "protocol_violations",
        "dropped_sends",
    ] {
        if let Some(v) = summary.get(key) {
            let _ = writeln!(out, "  {key:<20} {v}");
        }
    }
    out
}
