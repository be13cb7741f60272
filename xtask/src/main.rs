//! Project commands: `cargo xtask setup | demo | test | bench | deb | vm-run | vm-test |
//! dashboard-picture`.
mod bench;
mod dashboard;
mod deb;
mod demo;
mod setup;
mod test;
mod vm;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "vmsniff's project commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install every prerequisite (idempotent): Debian's eBPF toolchain, bpf-linker, QEMU,
    /// busybox and the tools the tests use.
    Setup,
    /// The built-in demo: a VM stand-in pings its gateway while vmsniff mirrors its tap to a
    /// collector over GRE, where tcpdump shows the copies (as root).
    Demo(demo::DemoArgs),
    /// Every check: formatting and clippy, unit tests, then the privileged suite on this kernel
    /// and in Debian's 5.10, 6.1 and 6.12 under QEMU (as root).
    Test,
    /// Measure vmsniff's cost per frame with the kernel's BPF statistics and write
    /// BENCHMARKS.md (as root; not part of the tests).
    Bench(bench::BenchArgs),
    /// Build the Debian package (cargo-deb) and check it with lintian; prints its path.
    Deb,
    /// Boot a Debian kernel under QEMU and run one command inside it.
    VmRun(vm::VmRunArgs),
    /// Run the privileged test suite inside Debian kernels under QEMU (and on the host).
    VmTest(vm::VmTestArgs),
    /// Draw docs/dashboard.png: the Grafana dashboard's panels from their own queries against a
    /// real Prometheus that scraped both ends during a test scene (as root; not Grafana).
    DashboardPicture(dashboard::DashboardArgs),
}

fn main() -> anyhow::Result<()> {
    let workspace = workspace()?;
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Demo(args) => demo::run(args, &workspace),
        Command::Test => test::run(&workspace),
        Command::Bench(args) => bench::run(args, &workspace),
        Command::Deb => deb::run_command(&workspace),
        Command::VmRun(args) => vm::run_command(args, &workspace),
        Command::VmTest(args) => vm::test_command(args, &workspace),
        Command::DashboardPicture(args) => dashboard::run(args, &workspace),
    }
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (absolute, or relative to the workspace, where
/// xtask runs cargo), else the workspace's `target`.
fn target_dir(workspace: &Path) -> PathBuf {
    workspace
        .join(std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from))
}

/// The workspace root (xtask lives one level below it).
fn workspace() -> anyhow::Result<PathBuf> {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask
        .parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("{} has no parent directory", xtask.display()))
}
