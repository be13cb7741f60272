//! The VM harness: Debian's kernels under QEMU (TCG), for what this host's kernel lacks (ip_gre,
//! erspan, openvswitch). Everything it downloads or builds lives under `target/vm/`.
//!
//! - `cargo xtask vm-run [--kernel 6.1] [--timeout SECS] [--env K[=V]]... -- CMD [ARGS...]`
//!   boots one kernel, runs CMD in the current directory and exits with CMD's status
//!   (124 when the timeout killed the guest).
//! - `cargo xtask vm-test [--kernel host,5.10,6.1,6.12|all] [FILTER]` builds the privileged tests
//!   once, runs them on the host and in one boot per kernel, and prints a matrix.
mod initramfs;
mod kernels;
mod qemu;
mod report;
mod suite;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;

#[derive(Args)]
pub struct VmRunArgs {
    /// Guest kernel: 5.10 (bullseye), 6.1 (bookworm) or 6.12 (trixie).
    #[arg(long, default_value = "6.1")]
    kernel: String,
    /// Seconds before the guest is killed.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// A variable for the command: K=V, or K alone to pass this process's value.
    #[arg(long = "env", value_name = "K[=V]")]
    env: Vec<String>,
    /// The command and its arguments, run in the current directory.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args)]
pub struct VmTestArgs {
    /// Where to run: host, 5.10, 6.1, 6.12 or all; repeat or separate with commas.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    kernel: Vec<String>,
    /// Seconds one test may take before it is killed and counted as failed.
    #[arg(long, default_value_t = 300)]
    test_timeout: u64,
    /// Seconds one kernel's boot with all its tests may take before the guest is killed.
    #[arg(long, default_value_t = 1500)]
    timeout: u64,
    /// A variable for the tests: K=V, or K alone to pass this process's value. RUST_LOG,
    /// RUST_BACKTRACE and VMSNIFF_* pass through by themselves.
    #[arg(long = "env", value_name = "K[=V]")]
    env: Vec<String>,
    /// Run only the tests whose FILE/NAME (as the table shows them) contains FILTER: `gre/`
    /// selects tests/gre.rs, `sigterm` every test with that in its name.
    filter: Option<String>,
}

#[expect(clippy::exit, reason = "vm-run exits with the guest command's status, after every guard is dropped")]
pub fn run_command(args: VmRunArgs, workspace: &Path) -> anyhow::Result<()> {
    let code = run_in_guest(args, workspace)?;
    // Every guard (QEMU, the run directory) is dropped by now: exit skips destructors.
    std::process::exit(code)
}

fn run_in_guest(args: VmRunArgs, workspace: &Path) -> anyhow::Result<i32> {
    qemu::catch_interrupts()?;
    let vm_dir = vm_dir(workspace);
    let kernel = kernels::prepare(&vm_dir, &args.kernel)?;
    let cwd = std::env::current_dir().context("reading the current directory")?;
    check_visible(&cwd)?;
    let command = qemu::GuestCommand { argv: args.command, env: parse_env(&args.env)?, cwd };
    let run = qemu::RunDir::create(&vm_dir)?;
    eprintln!("vm: booting {} ({}) under QEMU", kernel.name, kernel.release);
    let started = Instant::now();
    let outcome = qemu::boot(&kernel, &run, &command, Duration::from_secs(args.timeout))?;
    let secs = started.elapsed().as_secs_f64();
    match outcome {
        qemu::Outcome::Exited(code) => {
            eprintln!("vm: {} exited with status {code} after {secs:.1} s", command.argv[0]);
            Ok(code)
        }
        qemu::Outcome::TimedOut => {
            eprintln!(
                "vm: timed out after {} s: QEMU killed (raise --timeout if the command needs longer)",
                args.timeout
            );
            Ok(124)
        }
        qemu::Outcome::Interrupted => {
            eprintln!("vm: interrupted: QEMU killed");
            Ok(130)
        }
        qemu::Outcome::Failed(reason) => bail!("kernel {}: {reason}", kernel.name),
    }
}

pub fn test_command(args: VmTestArgs, workspace: &Path) -> anyhow::Result<()> {
    qemu::catch_interrupts()?;
    let targets = targets(&args.kernel)?;
    let vm_dir = vm_dir(workspace);
    let (vmsniff, executables) = suite::build(workspace)?;
    let cases = suite::list(&executables, args.filter.as_deref())?;
    if cases.is_empty() {
        bail!("no test to run: {} test executables, filter {:?}", executables.len(), args.filter);
    }
    for path in executables.iter().map(|e| &e.path).chain([&vmsniff]) {
        check_visible(path)?;
    }
    let mut env = vec![("VMSNIFF_BIN".to_owned(), vmsniff.to_string_lossy().into_owned())];
    env.extend(
        std::env::vars()
            .filter(|(k, _)| k == "RUST_LOG" || k == "RUST_BACKTRACE" || k.starts_with("VMSNIFF_")),
    );
    env.extend(parse_env(&args.env)?);
    // The package test installs what `cargo xtask deb` builds: build it from these sources, not
    // whatever an earlier run left (a release build, so only when that test is selected).
    if cases.iter().any(|c| c.label.starts_with("package/")) {
        let deb = crate::deb::build(workspace)?;
        env.push(("VMSNIFF_DEB".to_owned(), deb.to_string_lossy().into_owned()));
    }
    let plan = suite::Plan {
        vm_dir: &vm_dir,
        workspace,
        cases: &cases,
        env: &env,
        test_timeout: Duration::from_secs(args.test_timeout),
        timeout: Duration::from_secs(args.timeout),
    };
    let mut runs = Vec::new();
    for target in targets {
        let run = suite::run(&plan, target)?;
        eprintln!("vm-test: {target}: done in {:.0} s", run.wall.as_secs_f64());
        runs.push(run);
    }
    if !report::print(&cases, &runs) {
        bail!("some tests failed (details above)");
    }
    Ok(())
}

/// The targets in a fixed order (host first: it is the quickest to fail), without repeats.
fn targets(wanted: &[String]) -> anyhow::Result<Vec<&'static str>> {
    let all: Vec<&'static str> =
        std::iter::once("host").chain(kernels::KERNELS.iter().map(|(n, _)| *n)).collect();
    for w in wanted {
        if w != "all" && !all.contains(&w.as_str()) {
            bail!("unknown --kernel {w:?}: choose host, {} or all", kernels::kernel_names());
        }
    }
    Ok(all.into_iter().filter(|t| wanted.iter().any(|w| w == "all" || w == t)).collect())
}

/// `K=V` as given, `K` from this process's environment.
fn parse_env(specs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    specs
        .iter()
        .map(|spec| {
            let (key, value) = match spec.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (
                    spec.clone(),
                    std::env::var(spec).with_context(|| format!("--env {spec}: not set here"))?,
                ),
            };
            let valid = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                bail!("--env {spec}: {key:?} is not a variable name");
            }
            Ok((key, value))
        })
        .collect()
}

/// The guest mounts tmpfs over some paths: what the host keeps there does not exist inside.
fn check_visible(path: &Path) -> anyhow::Result<()> {
    if let Some(tmpfs) = qemu::GUEST_TMPFS.iter().find(|t| path.starts_with(t)) {
        bail!(
            "{} is under {tmpfs}, which the guest replaces with its own tmpfs: work from elsewhere (the workspace, /var/tmp)",
            path.display()
        );
    }
    Ok(())
}

/// The harness's cache and scratch space in cargo's target directory (`CARGO_TARGET_DIR`, else
/// the workspace's `target/`), so that worktrees sharing a target directory share the kernels.
fn vm_dir(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), |dir| workspace.join(PathBuf::from(dir)))
        .join("vm")
}
