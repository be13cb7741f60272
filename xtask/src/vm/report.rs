//! Reads each test's recorded output and status, and prints the matrix of tests by kernel.
//!
//! Tests talk to the harness through lines on their stdout:
//! `vmsniff-test: attach-mode=MODE` names the tc attach path they used, and
//! `vmsniff-test: skip: REASON` marks a passing test that could not check anything on this
//! kernel (it is shown as skip, never as pass).
use std::{fs, path::Path, time::Duration};

use super::suite::TestCase;

const ATTACH_MODE: &str = "vmsniff-test: attach-mode=";
const SKIP: &str = "vmsniff-test: skip: ";

pub enum Cell {
    Pass,
    Skip(String),
    Ignored,
    Fail(String),
    NotRun,
}

pub struct CaseResult {
    pub cell: Cell,
    pub output: String,
    /// How long the test's process ran, where it was recorded.
    pub secs: Option<f64>,
}

/// All results of one target: the host or one boot of a guest kernel.
pub struct TargetRun {
    /// "host" or the guest kernel as named on the command line.
    pub target: String,
    /// What ran: the host's or the guest's kernel release.
    pub release: String,
    pub results: Vec<CaseResult>,
    /// Every attach mode the tests reported, in order of first appearance.
    pub attach_modes: Vec<String>,
    pub wall: Duration,
    /// Why the run ended before every test was run (timeout, panic, failed boot).
    pub problem: Option<String>,
}

/// Reads `N.out` and `N.rc` of every case from `results`.
pub fn collect(
    target: String,
    release: String,
    cases: &[TestCase],
    results: &Path,
    test_timeout: Duration,
    wall: Duration,
    problem: Option<String>,
) -> anyhow::Result<TargetRun> {
    let mut run = TargetRun { target, release, results: Vec::new(), attach_modes: Vec::new(), wall, problem };
    for (i, case) in cases.iter().enumerate() {
        let output = fs::read_to_string(results.join(format!("{i}.out"))).ok();
        let rc = fs::read_to_string(results.join(format!("{i}.rc"))).ok();
        let Some(output) = output else {
            run.results.push(CaseResult { cell: Cell::NotRun, output: String::new(), secs: None });
            continue;
        };
        let secs = fs::read_to_string(results.join(format!("{i}.time"))).ok().and_then(|t| duration(&t));
        for mode in output.lines().filter_map(|l| l.split_once(ATTACH_MODE)).map(|(_, m)| m.trim()) {
            if !run.attach_modes.iter().any(|m| m == mode) {
                run.attach_modes.push(mode.to_owned());
            }
        }
        let cell = match rc.map(|rc| rc.trim().parse::<i32>()) {
            None => Cell::Fail(format!(
                "did not finish: {}",
                run.problem.as_deref().unwrap_or("no status recorded")
            )),
            // timeout(1): 124 after SIGTERM, 137 when SIGKILL was needed too.
            Some(Ok(124 | 137)) => Cell::Fail(format!("timed out after {} s", test_timeout.as_secs())),
            Some(Ok(0)) => match summary(&output) {
                Some((1, _)) => match output.lines().find_map(|l| l.split_once(SKIP)) {
                    Some((_, reason)) => Cell::Skip(reason.trim().to_owned()),
                    None => Cell::Pass,
                },
                Some((0, 1)) => Cell::Ignored,
                _ => Cell::Fail(format!("libtest ran no test named exactly {}", case.name)),
            },
            // The shell reports a death by signal N as 128 + N.
            Some(Ok(code)) if code > 128 => Cell::Fail(format!("killed by signal {}", code - 128)),
            Some(Ok(code)) => Cell::Fail(format!("exit status {code}")),
            Some(Err(e)) => Cell::Fail(format!("unreadable status file: {e}")),
        };
        run.results.push(CaseResult { cell, output, secs });
    }
    Ok(run)
}

/// Seconds between the two /proc/uptime readings of `START END`.
fn duration(text: &str) -> Option<f64> {
    let mut readings = text.split_whitespace().map(|r| r.parse::<f64>().ok());
    let (start, end) = (readings.next()??, readings.next()??);
    Some(end - start)
}

/// (passed, ignored) from libtest's `test result: ok. 1 passed; 0 failed; 0 ignored; ...`.
fn summary(output: &str) -> Option<(u32, u32)> {
    let line = output.lines().find_map(|l| l.split_once("test result: ").map(|(_, r)| r))?;
    let count = |what: &str| {
        line.split(';').find_map(|part| part.trim().strip_suffix(what)?.rsplit(' ').next()?.parse().ok())
    };
    Some((count(" passed")?, count(" ignored")?))
}

/// Prints the matrix, the skips, the failures with their output and the runs' problems.
/// Returns whether everything passed.
pub fn print(cases: &[TestCase], runs: &[TargetRun]) -> bool {
    let mut rows: Vec<Vec<String>> =
        vec![std::iter::once("test".to_owned()).chain(runs.iter().map(|r| r.target.clone())).collect()];
    for (i, case) in cases.iter().enumerate() {
        rows.push(
            std::iter::once(case.label.clone())
                .chain(runs.iter().map(|r| {
                    let result = &r.results[i];
                    match result.secs {
                        Some(secs) => format!("{:<4} {secs:>6.1}", cell_text(&result.cell)),
                        None => cell_text(&result.cell).to_owned(),
                    }
                }))
                .collect(),
        );
    }
    rows.push(
        std::iter::once("attach mode".to_owned())
            .chain(
                runs.iter().map(|r| {
                    if r.attach_modes.is_empty() { "-".to_owned() } else { r.attach_modes.join("+") }
                }),
            )
            .collect(),
    );
    rows.push(
        std::iter::once("in tests".to_owned())
            .chain(
                runs.iter().map(|r| format!("{:.1} s", r.results.iter().filter_map(|c| c.secs).sum::<f64>())),
            )
            .collect(),
    );
    rows.push(
        std::iter::once("wall time".to_owned())
            .chain(runs.iter().map(|r| format!("{:.1} s", r.wall.as_secs_f64())))
            .collect(),
    );
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    println!();
    for row in &rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
    for run in runs {
        println!("{}: {}", run.target, run.release);
    }
    print_slowest(cases, runs);

    let mut ok = true;
    for run in runs {
        for (case, result) in cases.iter().zip(&run.results) {
            match &result.cell {
                Cell::Skip(reason) => println!("skip: {} on {}: {reason}", case.label, run.target),
                Cell::Fail(why) => {
                    ok = false;
                    println!(
                        "\n==== FAIL: {} on {}: {why} ====\n{}",
                        case.label,
                        run.target,
                        result.output.trim_end()
                    );
                }
                Cell::Pass | Cell::Ignored | Cell::NotRun => {}
            }
        }
    }
    for run in runs {
        if let Some(problem) = &run.problem {
            ok = false;
            println!("\n==== {} ({}): {problem} ====", run.target, run.release);
        }
    }
    ok
}

/// How many tests the slowest list names.
const SLOWEST: usize = 12;

/// The slowest tests of all runs, where the suite's time goes.
fn print_slowest(cases: &[TestCase], runs: &[TargetRun]) {
    let mut timed: Vec<(f64, &str, &str, &'static str)> = runs
        .iter()
        .flat_map(|run| {
            cases.iter().zip(&run.results).filter_map(|(case, result)| {
                Some((result.secs?, case.label.as_str(), run.target.as_str(), cell_text(&result.cell)))
            })
        })
        .collect();
    if timed.is_empty() {
        return;
    }
    timed.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("\nslowest tests:");
    for (secs, label, target, cell) in timed.iter().take(SLOWEST) {
        println!("{secs:>8.1} s  {target:<5} {cell:<4}  {label}");
    }
}

fn cell_text(cell: &Cell) -> &'static str {
    match cell {
        Cell::Pass => "pass",
        Cell::Skip(_) => "skip",
        Cell::Ignored => "ignored",
        Cell::Fail(_) => "FAIL",
        Cell::NotRun => "-",
    }
}
