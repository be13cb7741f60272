//! The privileged test suite: built once on the host, then run on the host and in one boot of
//! each guest kernel.
//!
//! Every test runs in its own process (`--exact NAME`), listed beforehand on the host: a test
//! that crashes or hangs costs only itself, and its output and status land in files of their own
//! instead of being carved out of libtest's interleaved `--nocapture` stream.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::{
    kernels,
    qemu::{self, Ended, GuestCommand, Outcome, RunDir, Supervised, quote},
    report::{self, TargetRun},
};

/// A test executable: cargo's name of its target (`datapath` for tests/datapath.rs) and its
/// package's directory, the working directory `cargo test` gives it.
pub struct TestExecutable {
    pub path: PathBuf,
    pub target: String,
    pub cwd: PathBuf,
}

/// One test of one test executable.
pub struct TestCase {
    pub executable: PathBuf,
    pub cwd: PathBuf,
    /// The name libtest knows it by, for `--exact`.
    pub name: String,
    /// `target/name`: test names alone repeat across executables.
    pub label: String,
}

/// What every run needs beside the test list.
pub struct Plan<'a> {
    pub vm_dir: &'a Path,
    pub workspace: &'a Path,
    pub cases: &'a [TestCase],
    pub env: &'a [(String, String)],
    pub test_timeout: Duration,
    pub timeout: Duration,
}

/// Builds vmsniff and the test executables; returns the vmsniff binary and the executables.
pub fn build(workspace: &Path) -> anyhow::Result<(PathBuf, Vec<TestExecutable>)> {
    let vmsniff = cargo_artifacts(workspace, &["build", "-p", "vmsniff-user"])?
        .iter()
        .find(|a| a["target"]["name"] == "vmsniff")
        .and_then(|a| a["executable"].as_str())
        .map(PathBuf::from)
        .context("cargo build -p vmsniff-user reported no vmsniff executable")?;
    let tests = cargo_artifacts(workspace, &["test", "-p", "vmsniff-tests", "--no-run"])?
        .iter()
        .filter(|a| a["profile"]["test"] == true)
        // The test crate's library has unit tests of its own helpers: they ran with the unit
        // tests and need neither root nor a particular kernel.
        .filter(|a| a["target"]["kind"].as_array().is_some_and(|kinds| kinds.iter().any(|k| k == "test")))
        .filter_map(|a| {
            Some(TestExecutable {
                path: PathBuf::from(a["executable"].as_str()?),
                target: a["target"]["name"].as_str()?.to_owned(),
                cwd: Path::new(a["manifest_path"].as_str()?).parent()?.to_path_buf(),
            })
        })
        .collect();
    Ok((vmsniff, tests))
}

fn cargo_artifacts(workspace: &Path, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let what = format!("cargo {}", args.join(" "));
    let out = Command::new(cargo)
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(workspace)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): see the compiler's messages above", out.status);
    }
    let messages = String::from_utf8_lossy(&out.stdout);
    Ok(messages
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .collect())
}

/// The tests of every executable whose `target/name` label contains `filter`.
pub fn list(executables: &[TestExecutable], filter: Option<&str>) -> anyhow::Result<Vec<TestCase>> {
    let mut cases = Vec::new();
    for executable in executables {
        let out = Command::new(&executable.path)
            .args(["--list", "--format=terse"])
            .current_dir(&executable.cwd)
            .output()
            .with_context(|| format!("listing the tests of {}", executable.path.display()))?;
        if !out.status.success() {
            bail!("{} --list failed ({})", executable.path.display(), out.status);
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.strip_suffix(": test") else { continue };
            let label = format!("{}/{name}", executable.target);
            if filter.is_none_or(|f| label.contains(f)) {
                cases.push(TestCase {
                    executable: executable.path.clone(),
                    cwd: executable.cwd.clone(),
                    name: name.to_owned(),
                    label,
                });
            }
        }
    }
    Ok(cases)
}

/// Runs every case on `target` ("host" or a guest kernel) and collects the results.
pub fn run(plan: &Plan, target: &str) -> anyhow::Result<TargetRun> {
    // Downloading a kernel is not part of its run's wall time.
    let kernel = (target != "host").then(|| kernels::prepare(plan.vm_dir, target)).transpose()?;
    let run = RunDir::create(plan.vm_dir)?;
    let results = run.path().join("results");
    fs::create_dir(&results).with_context(|| format!("creating {}", results.display()))?;
    let script = run.path().join("tests.sh");
    qemu::write_script(&script, &test_script(plan, &results))?;

    let started = Instant::now();
    let problem = match &kernel {
        None => {
            eprintln!("vm-test: host: running {} tests", plan.cases.len());
            let mut sh = Command::new("sh");
            sh.arg(&script).envs(plan.env.iter().cloned()).current_dir(plan.workspace).stdin(Stdio::null());
            let mut sh = Supervised::spawn(&mut sh, "sh")?;
            match sh.wait(plan.timeout)? {
                Ended::Exited => None,
                Ended::TimedOut => Some(format!("timed out after {} s", plan.timeout.as_secs())),
                Ended::Interrupted => bail!("interrupted"),
            }
        }
        Some(kernel) => {
            eprintln!("vm-test: {target}: booting {} for {} tests", kernel.release, plan.cases.len());
            let mut env = plan.env.to_vec();
            env.push((vmsniff_tests::GUEST_KERNEL_VAR.to_owned(), target.to_owned()));
            let command = GuestCommand {
                argv: vec!["sh".to_owned(), script.to_string_lossy().into_owned()],
                env,
                cwd: plan.workspace.to_path_buf(),
            };
            match qemu::boot(kernel, &run, &command, plan.timeout)? {
                Outcome::Exited(_) => None,
                Outcome::TimedOut => Some(format!("timed out after {} s", plan.timeout.as_secs())),
                Outcome::Failed(reason) => Some(reason),
                Outcome::Interrupted => bail!("interrupted"),
            }
        }
    };
    let wall = started.elapsed();
    let release = match &kernel {
        None => host_release(),
        Some(kernel) => kernel.release.clone(),
    };
    report::collect(target.to_owned(), release, plan.cases, &results, plan.test_timeout, wall, problem)
}

/// A shell script that runs each case with a time limit and records `N.out`, `N.rc` and
/// `N.time` (seconds since boot before and after, from /proc/uptime: it reads the same on the host
/// and in a guest, with no tool whose options differ between them).
fn test_script(plan: &Plan, results: &Path) -> String {
    let mut script = format!(
        "# Generated by `cargo xtask vm-test`.\nresults={}\ntimeout={}\n",
        quote(&results.to_string_lossy()),
        plan.test_timeout.as_secs()
    );
    script.push_str(
        r#"t() {
    echo "vmsniff-vm: test $4"
    read -r start _ < /proc/uptime
    { cd "$3" && timeout -k 10 "$timeout" "$2" --exact "$4" --nocapture --test-threads=1; echo $? > "$results/$1.rc"; } 2>&1 \
        | tee "$results/$1.out"
    read -r end _ < /proc/uptime
    echo "$start $end" > "$results/$1.time"
}
"#,
    );
    for (i, case) in plan.cases.iter().enumerate() {
        script.push_str(&format!(
            "t {i} {} {} {}\n",
            quote(&case.executable.to_string_lossy()),
            quote(&case.cwd.to_string_lossy()),
            quote(&case.name)
        ));
    }
    script
}

fn host_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|e| format!("unknown ({e})"), |r| r.trim().to_owned())
}
