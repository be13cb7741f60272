//! `cargo xtask dashboard-picture`: docs/dashboard.png, the README's picture of the Grafana
//! dashboard. There is no Grafana here (Debian does not package it), so this draws the
//! dashboard's panels itself: every panel's own query (packaging/grafana/vmsniff.json, the
//! variables set as the README's scrape config names the jobs) asked of a real Prometheus
//! through `/api/v1/query_range`, after it scraped a real `vmsniff daemon --metrics` and
//! `vmsniff collect --metrics` for the length of a scene. It is not a Grafana screenshot: the
//! layout follows the panels' grid positions, titles, units and stacking, nothing more.
//!
//! The scene (as root): two VMs on their taps, each mirrored by a daemon session over VXLAN to
//! a collector namespace ("web": key 7, filter `not udp`; "db": key 9, `sample = 4`), traffic
//! whose rate changes over time, and for a stretch in the middle web's copies out diverted
//! away from the collector by a tc rule on the hypervisor's uplink (lost on the way). A panel whose query
//! answers nothing is drawn with "no data".
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail};
use plotters::{
    prelude::*,
    style::{
        FontStyle, register_font,
        text_anchor::{HPos, Pos, VPos},
    },
};
use serde_json::Value;
use vmsniff_tests::{
    frames::{self, L4, PEER_MAC, VM_MAC},
    monitored::{COLLECTOR, Monitored},
    prometheus,
    topology::{Hypervisor, TAP},
};

#[derive(clap::Args)]
pub struct DashboardArgs {
    /// How long the scene sends traffic, in seconds (at least 60).
    #[arg(long, default_value_t = 180)]
    seconds: u64,
    /// The picture (PNG), relative to the workspace.
    #[arg(long, default_value = "docs/dashboard.png")]
    out: PathBuf,
}

/// Prometheus's scrape interval in the scene, and what `$__rate_interval` stands for (Grafana
/// makes it at least four scrape intervals).
const SCRAPE_SECONDS: u64 = 2;
const RATE_INTERVAL: &str = "20s";
/// The picture's resolution: one point every STEP seconds.
const STEP: f64 = 5.0;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT_BOLD: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf";

pub fn run(args: DashboardArgs, workspace: &Path) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the scene creates network namespaces and loads eBPF programs: run it as root");
    }
    if args.seconds < 60 {
        bail!("--seconds {}: the rates need at least 60 s of scrapes to show anything", args.seconds);
    }
    if !Path::new(prometheus::BINARY).exists() {
        bail!("{} is missing: `cargo xtask setup` installs Debian's prometheus", prometheus::BINARY);
    }
    let text = std::fs::read_to_string(workspace.join("packaging/grafana/vmsniff.json"))?;
    let panels = panels(&serde_json::from_str(&text)?, args.seconds)?;
    crate::test::cargo(workspace, &["build", "-p", "vmsniff-user"])?;
    let vmsniff = crate::demo::vmsniff_binary(workspace);
    // SAFETY: no other thread runs yet; the test helpers read VMSNIFF_BIN to find the binary.
    unsafe { std::env::set_var("VMSNIFF_BIN", &vmsniff) };
    let data = scene(args.seconds, &panels);
    let out = workspace.join(&args.out);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    draw(&out, &panels, &data, args.seconds)?;
    eprintln!("dashboard-picture: wrote {}", out.display());
    Ok(())
}

/// A panel of the dashboard as drawn: its place on Grafana's 24-column grid, and its queries
/// with the variables set.
struct Panel {
    title: String,
    kind: String,
    /// x, y, w, h in grid units.
    grid: [u32; 4],
    unit: String,
    stacked: bool,
    /// (legend format, expr)
    targets: Vec<(String, String)>,
}

/// One answer's series: its legend, and (seconds since the scene's start, value) points.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

fn panels(dashboard: &Value, seconds: u64) -> anyhow::Result<Vec<Panel>> {
    let mut panels = Vec::new();
    for p in dashboard["panels"].as_array().context("the dashboard's panels")? {
        let grid = &p["gridPos"];
        let cell = |k: &str| grid[k].as_u64().and_then(|v| u32::try_from(v).ok()).context("gridPos");
        let mut targets = Vec::new();
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .context("a target's expr")?
                .replace("$hypervisor_job", "vmsniff")
                .replace("$collector_job", "vmsniff-collect")
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$__range", &format!("{seconds}s"));
            if expr.contains('$') {
                bail!("a variable dashboard-picture does not set: {expr}");
            }
            targets.push((t["legendFormat"].as_str().unwrap_or("").to_owned(), expr));
        }
        let defaults = &p["fieldConfig"]["defaults"];
        panels.push(Panel {
            title: p["title"].as_str().unwrap_or("").to_owned(),
            kind: p["type"].as_str().unwrap_or("").to_owned(),
            grid: [cell("x")?, cell("y")?, cell("w")?, cell("h")?],
            unit: defaults["unit"].as_str().unwrap_or("").to_owned(),
            stacked: defaults["custom"]["stacking"]["mode"] == "normal",
            targets,
        });
    }
    Ok(panels)
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Runs the scene, then asks Prometheus every panel's queries over its whole length.
fn scene(seconds: u64, panels: &[Panel]) -> Vec<Vec<Series>> {
    let mut hv = Hypervisor::new();
    let mut db = hv.add_vm("tapdb", 1);
    let sessions = format!(
        "[session.web]\ntap = \"{TAP}\"\nto = \"{COLLECTOR}\"\nencap = \"vxlan\"\nkey = 7\nfilter = \"not \
         udp\"\n\n[session.db]\ntap = \"tapdb\"\nto = \"{COLLECTOR}\"\nencap = \"vxlan\"\nkey = 9\nsample = 4\n"
    );
    let scene = Monitored::start(&hv, &sessions, &["web", "db"], SCRAPE_SECONDS);

    let start = unix_now();
    let began = Instant::now();
    // web's copies out (VNI 7 * 2 + 0 = 14, in the VXLAN header 4 bytes after UDP's) are lost
    // from 45 % to 60 % of the scene.
    let (loss_from, loss_to) = (seconds * 45 / 100, seconds * 60 / 100);
    let web_out =
        "match ip protocol 17 0xff match ip dport 4789 0xffff match u32 0x00000e00 0xffffff00 at 32";
    let mut seq = 0u32;
    let mut next = |n: u32| {
        seq += n;
        seq - n
    };
    eprintln!(
        "dashboard-picture: {seconds} s of traffic (web's copies out lost from {loss_from} s to {loss_to} s)"
    );
    for second in 0..seconds {
        if second == loss_from {
            scene.divert(1, web_out);
        }
        if second == loss_to {
            scene.stop_diverting();
        }
        let phase = second as f64 / 90.0 * std::f64::consts::TAU;
        let web_tcp = (30.0 + 20.0 * phase.sin()) as u32;
        let web_udp = 6 + (second % 5) as u32;
        let db_out = (20.0 + 12.0 * phase.cos()) as u32;
        let tcp = |s: u32, i: u32| {
            frames::ipv4(
                VM_MAC,
                PEER_MAC,
                [10, 1, 0, 2],
                [10, 1, 0, 1],
                L4::Tcp(40000 + (i % 8) as u16, 443),
                s,
                200,
            )
        };
        let udp =
            |s: u32| frames::ipv4(VM_MAC, PEER_MAC, [10, 1, 0, 2], [10, 1, 0, 53], L4::Udp(5353, 53), s, 120);
        let first = next(web_tcp + web_udp);
        let mut out: Vec<Vec<u8>> = (0..web_tcp).map(|i| tcp(first + i, i)).collect();
        out.extend((0..web_udp).map(|i| udp(first + web_tcp + i)));
        hv.vm_sends(&out);
        let first = next(12);
        let into: Vec<Vec<u8>> = (0..12).map(|i| frames::frame(PEER_MAC, VM_MAC, first + i, 300)).collect();
        hv.vm_receives(&into);
        let first = next(db_out);
        db.vm_sends(&(0..db_out).map(|i| tcp(first + i, i)).collect::<Vec<_>>());
        let due = Duration::from_secs(second + 1);
        if let Some(rest) = due.checked_sub(began.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    // The last scrapes.
    std::thread::sleep(Duration::from_secs(2 * SCRAPE_SECONDS + 1));
    let end = unix_now();

    let data = panels
        .iter()
        .map(|panel| {
            panel
                .targets
                .iter()
                .flat_map(|(legend, expr)| {
                    scene.prometheus.query_range(expr, start, end, STEP).into_iter().map(|s| Series {
                        name: legend_of(legend, &s["metric"]),
                        points: s["values"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|p| {
                                let t = p[0].as_f64()?;
                                let v: f64 = p[1].as_str()?.parse().ok()?;
                                Some((t - start, v)).filter(|(_, v)| v.is_finite())
                            })
                            .collect(),
                    })
                })
                .collect()
        })
        .collect();
    drop(scene);
    vmsniff_tests::vmsniff::ok(&hv.ns, &["detach", "--all"]);
    data
}

/// Grafana's legend format: `{{label}}` replaced by the series' label.
fn legend_of(format: &str, metric: &Value) -> String {
    if format.is_empty() {
        let labels: Vec<String> = metric
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| !k.starts_with("__"))
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect();
        return labels.join(", ");
    }
    let mut out = String::new();
    let mut rest = format;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find("}}") else { break };
        let name = rest[open + 2..open + close].trim();
        out.push_str(metric[name].as_str().unwrap_or(""));
        rest = &rest[open + close + 2..];
    }
    out.push_str(rest);
    out
}

/// A value in the panel's unit, as an axis or a bar says it.
fn format_value(unit: &str, v: f64) -> String {
    let scaled = |v: f64, suffix: &str| {
        let (v, prefix) = match v.abs() {
            a if a >= 1e9 => (v / 1e9, "G"),
            a if a >= 1e6 => (v / 1e6, "M"),
            a if a >= 1e3 => (v / 1e3, "k"),
            _ => (v, ""),
        };
        let digits = if v.abs() >= 10.0 || v == 0.0 { 0 } else { 1 };
        format!("{v:.digits$} {prefix}{suffix}")
    };
    match unit {
        "pps" => scaled(v, "p/s"),
        "bps" => scaled(v, "b/s"),
        "percentunit" => format!("{:.1} %", v * 100.0),
        _ => scaled(v, ""),
    }
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(115, 191, 105),
    RGBColor(242, 204, 12),
    RGBColor(87, 148, 242),
    RGBColor(255, 120, 10),
    RGBColor(242, 73, 92),
    RGBColor(184, 119, 217),
    RGBColor(112, 219, 237),
    RGBColor(250, 100, 0),
];
const PANEL_BG: RGBColor = RGBColor(24, 27, 31);
const PAGE_BG: RGBColor = RGBColor(17, 18, 23);
const TEXT: RGBColor = RGBColor(204, 204, 220);
const DIM: RGBColor = RGBColor(130, 130, 145);
const GRID: RGBColor = RGBColor(44, 48, 54);

/// Pixels per grid column and per grid row; the header's height.
const COLUMN: u32 = 64;
const ROW: u32 = 32;
const HEADER: u32 = 56;

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(path: &Path, panels: &[Panel], data: &[Vec<Series>], seconds: u64) -> anyhow::Result<()> {
    for (style, file) in [(FontStyle::Normal, FONT), (FontStyle::Bold, FONT_BOLD)] {
        let font =
            std::fs::read(file).with_context(|| format!("reading {file} (package fonts-dejavu-core)"))?;
        // plotters keeps registered fonts for the process's lifetime.
        register_font("sans-serif", style, Box::leak(font.into_boxed_slice()))
            .map_err(|_| anyhow!("{file} is not a font plotters can read"))?;
    }
    let rows = panels.iter().map(|p| p.grid[1] + p.grid[3]).max().unwrap_or(1);
    let root = BitMapBackend::new(path, (24 * COLUMN, HEADER + rows * ROW)).into_drawing_area();
    root.fill(&PAGE_BG).map_err(|e| anyhow!("drawing: {e}"))?;
    let header = format!(
        "vmsniff (packaging/grafana/vmsniff.json): each panel's own query, asked of a real Prometheus that \
         scraped `vmsniff daemon` and `vmsniff collect` during a {seconds} s test scene"
    );
    let note = "Drawn by `cargo xtask dashboard-picture`, not a Grafana screenshot. x: seconds since the \
                scene began; $__rate_interval = 20s, $__range = the scene.";
    root.draw(&Text::new(header, (12, 10), ("sans-serif", 18).into_font().color(&TEXT)))
        .map_err(|e| anyhow!("drawing: {e}"))?;
    root.draw(&Text::new(note, (12, 34), ("sans-serif", 14).into_font().color(&DIM)))
        .map_err(|e| anyhow!("drawing: {e}"))?;
    for (panel, series) in panels.iter().zip(data) {
        let [x, y, w, h] = panel.grid;
        let area = root.clone().shrink(
            (x * COLUMN + 4, HEADER + y * ROW + 4),
            ((w * COLUMN).saturating_sub(8), (h * ROW).saturating_sub(8)),
        );
        let drawn = match panel.kind.as_str() {
            "row" => row(&area, panel),
            "timeseries" => timeseries(&area, panel, series, seconds),
            "bargauge" => bargauge(&area, panel, series),
            _ => table(&area, panel, series),
        };
        drawn.map_err(|e| anyhow!("drawing panel {:?}: {e}", panel.title))?;
    }
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

fn row(area: &Area, panel: &Panel) -> DrawResult {
    area.draw(&Text::new(
        panel.title.clone(),
        (0, 4),
        ("sans-serif", 18, FontStyle::Bold).into_font().color(&TEXT),
    ))?;
    Ok(())
}

/// The panel's box and title; returns the area below the title.
fn frame<'a>(area: &Area<'a>, panel: &Panel) -> Result<Area<'a>, Box<dyn std::error::Error>> {
    area.fill(&PANEL_BG)?;
    let (w, h) = area.dim_in_pixel();
    let w = i32::try_from(w)?;
    let h = i32::try_from(h)?;
    area.draw(&Rectangle::new([(0, 0), (w - 1, h - 1)], GRID))?;
    area.draw(&Text::new(
        panel.title.clone(),
        (10, 8),
        ("sans-serif", 15, FontStyle::Bold).into_font().color(&TEXT),
    ))?;
    Ok(area.margin(30, 6, 8, 8))
}

/// `color` at `share` over `background`, opaque.
fn blend(color: RGBColor, background: RGBColor, share: f64) -> RGBColor {
    let mix = |a: u8, b: u8| (f64::from(a) * share + f64::from(b) * (1.0 - share)).round() as u8;
    RGBColor(mix(color.0, background.0), mix(color.1, background.1), mix(color.2, background.2))
}

fn no_data(area: &Area) -> DrawResult {
    let (w, h) = area.dim_in_pixel();
    let style = ("sans-serif", 20).into_font().color(&DIM).pos(Pos::new(HPos::Center, VPos::Center));
    area.draw(&Text::new("no data", (i32::try_from(w / 2)?, i32::try_from(h / 2)?), style))?;
    Ok(())
}

fn short(name: &str, at_most: usize) -> String {
    if name.chars().count() <= at_most {
        return name.to_owned();
    }
    let cut: String = name.chars().take(at_most.saturating_sub(1)).collect();
    format!("{cut}…")
}

fn timeseries(area: &Area, panel: &Panel, series: &[Series], seconds: u64) -> DrawResult {
    let inner = frame(area, panel)?;
    let mut series: Vec<&Series> = series.iter().filter(|s| !s.points.is_empty()).collect();
    if series.is_empty() {
        return no_data(&inner);
    }
    series.sort_by(|a, b| a.name.cmp(&b.name));
    // Stacked panels: each series drawn on top of the ones before it.
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut below: BTreeMap<i64, f64> = BTreeMap::new();
    for s in &series {
        let points = if panel.stacked {
            s.points
                .iter()
                .map(|(t, v)| {
                    let sum = below.entry(t.round() as i64).or_insert(0.0);
                    *sum += v;
                    (*t, *sum)
                })
                .collect()
        } else {
            s.points.clone()
        };
        lines.push((s.name.clone(), points));
    }
    let top = lines.iter().flat_map(|(_, p)| p.iter().map(|(_, v)| *v)).fold(0.0, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let (w, _) = inner.dim_in_pixel();
    // Legend to the right, as the dashboard's table legends.
    let legend_width = (w / 3).min(340);
    let (plot, legend) = inner.split_horizontally(w - legend_width);
    let mut chart = ChartBuilder::on(&plot)
        .margin_right(10)
        .x_label_area_size(20)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..seconds as f64 + 10.0, 0f64..top)?;
    let unit = panel.unit.clone();
    chart
        .configure_mesh()
        .x_labels(7)
        .y_labels(5)
        .x_label_formatter(&|x| format!("{x:.0} s"))
        .y_label_formatter(&|y| format_value(&unit, *y))
        .label_style(("sans-serif", 12).into_font().color(&DIM))
        .axis_style(GRID)
        .bold_line_style(GRID)
        .light_line_style(PANEL_BG)
        .draw()?;
    for (i, (_, points)) in lines.iter().enumerate().rev() {
        let color = PALETTE[i % PALETTE.len()];
        if panel.stacked {
            // Opaque fills, the highest first: each lower band covers the one above it exactly
            // where it should, and a series that is 0 throughout adds no band.
            if series[i].points.iter().all(|p| p.1 == 0.0) {
                continue;
            }
            let fill = blend(color, PANEL_BG, 0.45);
            chart.draw_series(
                AreaSeries::new(points.clone(), 0.0, fill).border_style(color.stroke_width(2)),
            )?;
        } else {
            chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
        }
    }
    // The legend: one line per series, its last value after the name.
    let shown = lines.len().min(usize::try_from(legend.dim_in_pixel().1 / 16)?.max(1));
    for (i, s) in series.iter().enumerate().take(shown) {
        let y = i32::try_from(i)? * 16 + 2;
        let color = PALETTE[i % PALETTE.len()];
        legend.draw(&Rectangle::new([(0, y + 4), (10, y + 10)], color.filled()))?;
        let last = s.points.last().map_or(0.0, |p| p.1);
        let text = format!("{}  {}", short(&s.name, 34), format_value(&panel.unit, last));
        legend.draw(&Text::new(text, (16, y), ("sans-serif", 12).into_font().color(&TEXT)))?;
    }
    if shown < lines.len() {
        let y = i32::try_from(shown)? * 16 + 2;
        let more = format!("and {} more", lines.len() - shown);
        legend.draw(&Text::new(more, (16, y), ("sans-serif", 12).into_font().color(&DIM)))?;
    }
    Ok(())
}

/// Horizontal bars of each series' last value (the dashboard's bar gauge, 0 to 1).
fn bargauge(area: &Area, panel: &Panel, series: &[Series]) -> DrawResult {
    let inner = frame(area, panel)?;
    let mut bars: Vec<(String, f64)> =
        series.iter().filter_map(|s| Some((s.name.clone(), s.points.last()?.1))).collect();
    if bars.is_empty() {
        return no_data(&inner);
    }
    bars.sort_by(|a, b| a.0.cmp(&b.0));
    let (w, h) = inner.dim_in_pixel();
    let (w, h) = (i32::try_from(w)?, i32::try_from(h)?);
    let n = i32::try_from(bars.len())?;
    let pitch = (h / n).min(56);
    for (i, (name, value)) in bars.iter().enumerate() {
        let y = i32::try_from(i)? * pitch;
        let color = PALETTE[i % PALETTE.len()];
        inner.draw(&Text::new(name.clone(), (4, y + 2), ("sans-serif", 13).into_font().color(&TEXT)))?;
        let bar_y = y + 20;
        let full = w - 90;
        inner.draw(&Rectangle::new([(4, bar_y), (4 + full, bar_y + pitch - 28)], GRID.filled()))?;
        let filled = (f64::from(full) * value.clamp(0.0, 1.0)) as i32;
        inner.draw(&Rectangle::new([(4, bar_y), (4 + filled, bar_y + pitch - 28)], color.filled()))?;
        let style = ("sans-serif", 15).into_font().color(&color);
        inner.draw(&Text::new(format_value(&panel.unit, *value), (full + 12, bar_y), style))?;
    }
    Ok(())
}

/// A table of the series that are there now (each one's labels), or "no data".
fn table(area: &Area, panel: &Panel, series: &[Series]) -> DrawResult {
    let inner = frame(area, panel)?;
    let now: Vec<&Series> = series
        .iter()
        .filter(|s| s.points.last().is_some_and(|(t, _)| *t >= series_end(series) - STEP))
        .collect();
    if now.is_empty() {
        return no_data(&inner);
    }
    for (i, s) in now.iter().enumerate() {
        let y = i32::try_from(i)? * 18;
        inner.draw(&Text::new(s.name.clone(), (6, y), ("sans-serif", 13).into_font().color(&TEXT)))?;
    }
    Ok(())
}

fn series_end(series: &[Series]) -> f64 {
    series.iter().filter_map(|s| s.points.last().map(|p| p.0)).fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dashboard() -> Vec<Panel> {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana/vmsniff.json"),
        )
        .unwrap();
        panels(&serde_json::from_str(&text).unwrap(), 180).unwrap()
    }

    #[test]
    fn every_panel_is_read_with_its_variables_set() {
        let panels = dashboard();
        assert_eq!(panels.len(), 13);
        let queries: Vec<&str> = panels.iter().flat_map(|p| &p.targets).map(|(_, e)| e.as_str()).collect();
        assert!(queries.len() >= 10, "{queries:?}");
        assert!(queries.iter().all(|e| !e.contains('$')), "{queries:?}");
        assert!(queries.iter().any(|e| e.contains("[20s]")) && queries.iter().any(|e| e.contains("[180s]")));
        let budget = &panels[1];
        assert_eq!((budget.kind.as_str(), budget.unit.as_str(), budget.stacked), ("timeseries", "pps", true));
    }

    #[test]
    fn panels_whose_queries_answer_nothing_are_drawn_too() {
        let panels = dashboard();
        let dir = std::env::temp_dir().join(format!("vmsniff-dashboard-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Nothing at all, then one series where each panel has one.
        let empty: Vec<Vec<Series>> = panels.iter().map(|_| Vec::new()).collect();
        draw(&dir.join("empty.png"), &panels, &empty, 180).unwrap();
        let one: Vec<Vec<Series>> = panels
            .iter()
            .map(|_| vec![Series { name: "a".into(), points: vec![(10.0, 0.25), (20.0, 0.5)] }])
            .collect();
        draw(&dir.join("one.png"), &panels, &one, 180).unwrap();
        for file in ["empty.png", "one.png"] {
            assert!(std::fs::metadata(dir.join(file)).unwrap().len() > 10_000, "{file}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn legends_take_the_series_labels() {
        let metric = serde_json::json!({"sender": "192.0.2.1", "key": "7", "direction": "out"});
        assert_eq!(legend_of("{{sender}} key {{key}} {{ direction }}", &metric), "192.0.2.1 key 7 out");
        assert_eq!(legend_of("", &metric), "direction=out, key=7, sender=192.0.2.1");
        assert_eq!(format_value("percentunit", 0.2), "20.0 %");
        assert_eq!(format_value("pps", 1500.0), "1.5 kp/s");
        assert_eq!(format_value("bps", 80_000.0), "80 kb/s");
    }
}
