//! Reports: a table on stdout, a JSON file, and an SVG plot next to it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::workloads::{Env, Step};

/// Formats bytes as MiB (or `n/a`).
pub fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
        .unwrap_or_else(|| "n/a".into())
}

/// A latency line: name, colour, value of a step.
type Series = (&'static str, RGBColor, fn(&Step) -> f64);

/// What to draw.
#[derive(Debug, Clone)]
pub enum Plot {
    /// Latency percentiles vs offered deliveries/s (+ the ceiling).
    Latency {
        /// Ramp steps.
        steps: Vec<Step>,
        /// Ceiling deliveries/s.
        ceiling: Option<f64>,
    },
    /// RSS (MiB) vs connections.
    RssVsConnections {
        /// (connections, MiB).
        points: Vec<(f64, f64)>,
    },
    /// Generic lines: (name, points) over a linear x axis.
    Xy {
        /// X axis label.
        x_desc: String,
        /// Y axis label.
        y_desc: String,
        /// Logarithmic y axis (values ≤ 0 are skipped).
        log_y: bool,
        /// (name, points).
        series: Vec<(String, Vec<(f64, f64)>)>,
    },
    /// RSS (MiB) over time (s), with a marker (e.g. when readers paused).
    RssOverTime {
        /// (seconds, MiB).
        points: Vec<(f64, f64)>,
        /// Vertical marker.
        marker: Option<f64>,
    },
}

/// One workload's outcome.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Workload id.
    pub workload: String,
    /// UTC start, `YYYY-MM-DDTHH:MM:SSZ`.
    pub started_utc: String,
    /// The exact command line.
    pub command: String,
    /// Machine facts.
    pub machine: Value,
    /// Server under test.
    pub target: String,
    /// Which limit capped the run.
    pub capped_by: Option<String>,
    /// Headline rows.
    pub table: Vec<(String, String)>,
    /// Ramp steps (broadcast).
    pub step_table: Vec<Step>,
    /// Workload-specific figures.
    pub results: Value,
    /// Things that went wrong or look odd.
    pub notes: Vec<String>,
    /// Sample frames/errors seen by clients.
    pub samples: Vec<String>,
    /// Plot to draw.
    #[serde(skip)]
    pub plot: Option<Plot>,
}

/// `YYYY-MM-DD`, `HH:MM:SS` (UTC) from the system clock.
pub fn utc_now() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60),
    )
}

impl Report {
    /// An empty report for `workload`.
    pub fn new(workload: &str, env: &Env) -> Report {
        let (d, t) = utc_now();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .next()
                    .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
            })
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb as f64 / 1048576.0);
        Report {
            workload: workload.to_owned(),
            started_utc: format!("{d}T{t}Z"),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: serde_json::json!({
                "cpus": crate::sys::cpus(),
                "mem_gib": mem,
                "kernel": kernel,
                "fd_limit": env.fd,
                "ephemeral_ports": crate::sys::ephemeral_ports(),
                "quick": env.c.quick,
                "loadavg_at_start": std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_owned()).unwrap_or_default(),
            }),
            target: String::new(),
            capped_by: None,
            table: Vec::new(),
            step_table: Vec::new(),
            results: Value::Null,
            notes: Vec::new(),
            samples: Vec::new(),
            plot: None,
        }
    }

    /// Adds a headline row.
    pub fn row(&mut self, k: &str, v: String) {
        self.table.push((k.to_owned(), v));
    }

    /// Prints the table to stdout.
    pub fn print(&self) {
        println!();
        println!(
            "== realtime-bench {} — {} ==",
            self.workload, self.started_utc
        );
        println!("command: {}", self.command);
        println!("target:  {}", self.target);
        if let Some(c) = &self.capped_by {
            println!("limit:   {c}");
        }
        let w = self
            .table
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        println!();
        for (k, v) in &self.table {
            println!("  {k:<w$}  {v}");
        }
        if !self.step_table.is_empty() {
            println!();
            println!(
                "  {:>4} {:>7} {:>10} {:>10} {:>12} {:>10} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>9}  result",
                "step", "kind", "offered/s", "sent/s", "deliv/s", "readers", "lost", "dups", "p50 ms", "p95 ms", "p99 ms", "max ms", "RSS MiB", "gw CPU", "bench CPU"
            );
            for s in &self.step_table {
                println!(
                    "  {:>4} {:>7} {:>10.1} {:>10.1} {:>12.0} {:>10} {:>8} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9} {:>6} {:>9}  {}",
                    s.step,
                    s.kind,
                    s.offered_rate,
                    s.sent_rate,
                    s.offered_deliveries_per_sec,
                    s.readers,
                    s.lost,
                    s.dups,
                    s.latency.p50,
                    s.latency.p95,
                    s.latency.p99,
                    s.latency.max,
                    s.server_rss_bytes.map(|b| format!("{:.1}", b as f64 / 1048576.0)).unwrap_or_default(),
                    s.server_cpu.map(|c| format!("{c:.2}")).unwrap_or_default(),
                    s.bench_cpu.map(|c| format!("{c:.2}")).unwrap_or_default(),
                    if s.pass { "pass" } else { "FAIL" }
                );
            }
        }
        if !self.notes.is_empty() {
            println!();
            for n in &self.notes {
                println!("  note: {n}");
            }
        }
        if !self.samples.is_empty() {
            println!();
            println!("  frames/errors seen by clients (first few):");
            for s in &self.samples {
                println!("    {s}");
            }
        }
    }

    /// Writes the JSON report and the SVG plot; returns their paths.
    pub fn save(&self, json_path: &Path) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
        if let Some(dir) = json_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(json_path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", json_path.display()))?;
        let svg = json_path.with_extension("svg");
        let drawn = match &self.plot {
            Some(p) => {
                draw(
                    p,
                    &svg,
                    &format!("realtime-bench {} — {}", self.workload, self.started_utc),
                )
                .with_context(|| format!("drawing {}", svg.display()))?;
                Some(svg)
            }
            None => None,
        };
        Ok((json_path.to_path_buf(), drawn))
    }
}

fn bounds(xs: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let lo = xs
        .clone()
        .filter(|v| v.is_finite())
        .fold(f64::INFINITY, f64::min);
    let hi = xs
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi <= lo {
        return (lo - 1.0, hi + 1.0);
    }
    (lo, hi)
}

fn draw(plot: &Plot, path: &Path, title: &str) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let err = |e: DrawingAreaErrorKind<std::io::Error>| anyhow::anyhow!("{e:?}");
    match plot {
        Plot::Latency { steps, ceiling } => {
            let xs = steps
                .iter()
                .map(|s| s.offered_deliveries_per_sec)
                .chain(ceiling.iter().copied());
            let (_, xmax) = bounds(xs);
            let ys = steps
                .iter()
                .flat_map(|s| [s.latency.p50, s.latency.max])
                .filter(|v| v.is_finite() && *v > 0.0);
            let ymin = ys.clone().fold(1.0f64, f64::min).max(0.01);
            let ymax = ys.fold(1.0f64, f64::max) * 1.5;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 20))
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..xmax * 1.08, (ymin..ymax).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("offered deliveries/s (msgs/s × subscribers)")
                .x_label_formatter(&|x| format!("{:.0}k", x / 1000.0))
                .y_desc("latency, ms (log)")
                .draw()
                .map_err(err)?;
            let mut ramp: Vec<&Step> = steps.iter().collect();
            ramp.sort_by(|a, b| {
                a.offered_deliveries_per_sec
                    .total_cmp(&b.offered_deliveries_per_sec)
            });
            let series: [Series; 4] = [
                ("p50", BLUE, |s| s.latency.p50),
                ("p95", GREEN, |s| s.latency.p95),
                ("p99", RED, |s| s.latency.p99),
                ("max", BLACK, |s| s.latency.max),
            ];
            for (name, color, f) in series {
                let pts: Vec<(f64, f64)> = ramp
                    .iter()
                    .map(|s| (s.offered_deliveries_per_sec, f(s)))
                    .filter(|p| p.1.is_finite() && p.1 > 0.0)
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(err)?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
                    .map_err(err)?;
            }
            let limit = [(0.0, 100.0), (xmax * 1.08, 100.0)];
            chart
                .draw_series(LineSeries::new(
                    limit,
                    RGBColor(150, 150, 150).stroke_width(1),
                ))
                .map_err(err)?
                .label("p99 limit 100 ms")
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(150, 150, 150))
                });
            if let Some(c) = ceiling {
                let c = *c;
                chart
                    .draw_series(LineSeries::new(
                        [(c, ymin), (c, ymax)],
                        MAGENTA.stroke_width(2),
                    ))
                    .map_err(err)?
                    .label(format!("ceiling {c:.0}/s"))
                    .legend(|(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(err)?;
        }
        Plot::Xy {
            x_desc,
            y_desc,
            log_y,
            series,
        } => {
            let pts = || {
                series
                    .iter()
                    .flat_map(|(_, p)| p.iter().copied())
                    .filter(|p| p.0.is_finite() && p.1.is_finite() && (!*log_y || p.1 > 0.0))
            };
            let (x0, x1) = bounds(pts().map(|p| p.0));
            let (y0, y1) = bounds(pts().map(|p| p.1));
            let x0 = x0.min(0.0);
            let x1 = x1 + (x1 - x0).abs() * 0.05;
            let colors = [BLUE, GREEN, RED, BLACK, MAGENTA, CYAN];
            macro_rules! lines {
                ($chart:expr) => {{
                    let mut chart = $chart;
                    chart
                        .configure_mesh()
                        .x_desc(x_desc.as_str())
                        .y_desc(y_desc.as_str())
                        .draw()
                        .map_err(err)?;
                    for (i, (name, p)) in series.iter().enumerate() {
                        let color = colors[i % colors.len()];
                        let p: Vec<(f64, f64)> = p
                            .iter()
                            .copied()
                            .filter(|p| {
                                p.0.is_finite() && p.1.is_finite() && (!*log_y || p.1 > 0.0)
                            })
                            .collect();
                        chart
                            .draw_series(LineSeries::new(p.clone(), color.stroke_width(2)))
                            .map_err(err)?
                            .label(name.as_str())
                            .legend(move |(x, y)| {
                                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                            });
                        chart
                            .draw_series(p.iter().map(|q| Circle::new(*q, 3, color.filled())))
                            .map_err(err)?;
                    }
                    chart
                        .configure_series_labels()
                        .background_style(WHITE.mix(0.8))
                        .border_style(BLACK)
                        .position(SeriesLabelPosition::UpperLeft)
                        .draw()
                        .map_err(err)?;
                }};
            }
            if *log_y {
                let lo = (y0 * 0.7).max(0.001);
                lines!(ChartBuilder::on(&root)
                    .caption(title, ("sans-serif", 20))
                    .margin(15)
                    .x_label_area_size(45)
                    .y_label_area_size(60)
                    .build_cartesian_2d(x0..x1, (lo..y1 * 1.5).log_scale())
                    .map_err(err)?);
            } else {
                lines!(ChartBuilder::on(&root)
                    .caption(title, ("sans-serif", 20))
                    .margin(15)
                    .x_label_area_size(45)
                    .y_label_area_size(60)
                    .build_cartesian_2d(x0..x1, y0.min(0.0)..y1 * 1.15)
                    .map_err(err)?);
            }
        }
        Plot::RssVsConnections { points } | Plot::RssOverTime { points, .. } => {
            let over_time = matches!(plot, Plot::RssOverTime { .. });
            let (x0, x1) = bounds(points.iter().map(|p| p.0));
            let (_, y1) = bounds(points.iter().map(|p| p.1));
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 20))
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(60)
                .build_cartesian_2d(x0.min(0.0)..x1 * 1.05, 0f64..y1 * 1.15)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc(if over_time {
                    "seconds"
                } else {
                    "joined connections"
                })
                .y_desc("server RSS, MiB")
                .draw()
                .map_err(err)?;
            chart
                .draw_series(LineSeries::new(points.clone(), BLUE.stroke_width(2)))
                .map_err(err)?
                .label("server RSS")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
            if let Plot::RssOverTime {
                marker: Some(m), ..
            } = plot
            {
                let m = *m;
                chart
                    .draw_series(LineSeries::new(
                        [(m, 0.0), (m, y1 * 1.15)],
                        RED.stroke_width(2),
                    ))
                    .map_err(err)?
                    .label("slow readers stop reading")
                    .legend(|(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(err)?;
        }
    }
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}
