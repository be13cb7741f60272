//! BENCHMARKS.png: the VM's throughput per configuration relative to no mirror, and the
//! delivery ratio against offered load, per part. Drawn with plotters' bitmap backend and
//! DejaVu Sans from Debian (pure Rust: no font server, no C library, the same pixels everywhere).
use std::path::Path;

use anyhow::{Context as _, anyhow};
use plotters::{
    prelude::*,
    style::{
        FontStyle, register_font,
        text_anchor::{HPos, Pos, VPos},
    },
};

use super::{
    configs::{self, Config},
    measure::{Metric, Part},
    report::Stats,
};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn color(config: Config) -> RGBColor {
    match config {
        Config::None => RGBColor(140, 140, 140),
        Config::Vmsniff => RGBColor(31, 119, 180),
        Config::VmsniffVxlan => RGBColor(148, 103, 189),
        Config::Mirred => RGBColor(255, 127, 14),
        Config::Ovs => RGBColor(44, 160, 44),
        Config::Relay => RGBColor(214, 39, 40),
    }
}

/// `parts`: (short name for labels, part).
pub fn draw(path: &Path, parts: &[(&str, &Part)]) -> anyhow::Result<()> {
    let font = std::fs::read(FONT).with_context(|| format!("reading {FONT} (package fonts-dejavu-core)"))?;
    // plotters keeps registered fonts for the process's lifetime.
    register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow!("{FONT} is not a font plotters can read"))?;
    let root = BitMapBackend::new(path, (560 * (1 + parts.len() as u32), 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("drawing the chart: {e}"))?;
    let panels = root.split_evenly((1, 1 + parts.len()));
    throughput(&panels[0], parts).map_err(|e| anyhow!("drawing the throughput panel: {e}"))?;
    for (panel, (name, part)) in panels[1..].iter().zip(parts) {
        delivery(panel, name, part).map_err(|e| anyhow!("drawing the delivery panel of {name}: {e}"))?;
    }
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Grouped bars: for each part, small frames and TCP, each configuration's median ratio to (a).
fn throughput(area: &Area, parts: &[(&str, &Part)]) -> DrawResult {
    let mut groups: Vec<(String, Vec<(Config, f64)>)> = Vec::new();
    for (name, part) in parts {
        let metrics: [(&str, Metric); 2] = [("frames", |s| s.max_pps), ("TCP", |s| s.tcp_gbps)];
        for (metric, f) in metrics {
            groups.push((format!("{metric}, {name}"), ratios(part, f)));
        }
    }
    let n = groups.len();
    let mut chart = ChartBuilder::on(area)
        .caption("VM throughput relative to (a) no mirror", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        // Head room above 100 % for the legend.
        .build_cartesian_2d(0f64..n as f64, 0f64..1.45)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_label_formatter(&|y| format!("{:.0} %", y * 100.0))
        .label_style(("sans-serif", 15))
        .draw()?;
    // Group names under the axis, centred on each group (plotters places axis labels at round
    // numbers, not at categories of a float axis).
    let base = area.get_base_pixel();
    for (g, (label, _)) in groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        let style = TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        area.draw(&Text::new(label.clone(), (x - base.0, y - base.1 + 8), style))?;
    }
    for config in configs::ALL {
        let width = 0.8 / configs::ALL.len() as f64;
        let slot = configs::ALL.iter().position(|c| *c == config).unwrap_or(0) as f64;
        let bars: Vec<Rectangle<(f64, f64)>> = groups
            .iter()
            .enumerate()
            .filter_map(|(g, (_, values))| {
                let (_, value) = values.iter().find(|(c, _)| *c == config)?;
                let x0 = g as f64 + 0.1 + slot * width;
                Some(Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *value)], color(config).filled()))
            })
            .collect();
        if bars.is_empty() {
            continue;
        }
        chart
            .draw_series(bars)?
            .label(config.label())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color(config).filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Each configuration's median ratio to (a), paired by round.
fn ratios(part: &Part, f: Metric) -> Vec<(Config, f64)> {
    let Some(baseline) = part.configs.iter().find(|c| c.config == Config::None.key()) else {
        return Vec::new();
    };
    part.configs
        .iter()
        .filter_map(|c| {
            let paired: Vec<f64> = c.rounds.iter().zip(&baseline.rounds).map(|(s, b)| f(s) / f(b)).collect();
            Some((Config::from_key(&c.config)?, Stats::of(&paired).median))
        })
        .collect()
}

/// Lines: delivery ratio (median over rounds) against offered load in % of (a)'s maximum.
fn delivery(area: &Area, name: &str, part: &Part) -> DrawResult {
    let series: Vec<(Config, Vec<(f64, f64)>)> = part
        .configs
        .iter()
        .filter_map(|c| {
            let config = Config::from_key(&c.config).filter(|c| *c != Config::None)?;
            let points = (0..part.loads.len() + 1)
                .map(|i| {
                    let at = |f: fn(&(f64, f64)) -> f64| {
                        Stats::of(
                            &c.rounds.iter().filter_map(|s| s.delivery.get(i).map(f)).collect::<Vec<_>>(),
                        )
                        .median
                    };
                    (at(|d| d.0) / part.calibrated_pps * 100.0, at(|d| d.1) * 100.0)
                })
                .collect();
            Some((config, points))
        })
        .collect();
    let x_max = series.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x)).fold(100.0, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("Copies delivered, {name}"), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..x_max, 0f64..105.0)?;
    chart
        .configure_mesh()
        .x_desc("offered load, % of (a)'s highest frame rate")
        .y_desc("copies received / frames sent")
        .x_label_formatter(&|x| format!("{x:.0} %"))
        .y_label_formatter(&|y| format!("{y:.0} %"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for (i, (config, points)) in series.into_iter().enumerate() {
        // Each line thinner than the one before, so that lines on top of each other (every
        // copy delivered) all stay visible.
        let width = 6u32.saturating_sub(2 * i as u32).max(2);
        let style = color(config).stroke_width(width);
        chart
            .draw_series(LineSeries::new(points.clone(), style))?
            .label(config.label())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color(config).stroke_width(3)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color(config).filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
