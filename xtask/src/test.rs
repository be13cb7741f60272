//! `cargo xtask test`: the README's test command. Sets up what is missing, checks formatting and
//! clippy's lints (the gate: CI runs only this command), runs the unit tests, then the
//! privileged suite on this kernel and in each Debian kernel under QEMU.
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};
use clap::Parser;

pub fn run(workspace: &Path) -> anyhow::Result<()> {
    crate::setup::run()?;
    let started = std::time::Instant::now();
    eprintln!("\n==> formatting and lints");
    cargo(workspace, &["fmt", "--all", "--check"])
        .context("the code is not formatted as rustfmt.toml says (diff above): run `cargo fmt --all`")?;
    cargo(workspace, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]).context(
        "clippy's findings are above: fix each one; a deliberate exception is an \
         `#[expect(clippy::LINT, reason = \"...\")]` where it is made",
    )?;
    cargo(workspace, &["build", "--workspace"])?;
    eprintln!("\n==> unit tests (no root)");
    cargo(workspace, &["test", "--workspace", "--lib", "--bins"])?;
    eprintln!("\n==> privileged tests: this kernel, then Debian 5.10, 6.1 and 6.12 under QEMU");
    // In this process, not by re-running this binary: the workspace build above may have
    // replaced it on disk.
    let result =
        crate::vm::test_command(VmTestCli::try_parse_from(["vm-test", "--kernel", "all"])?.args, workspace);
    eprintln!("\n==> all tests took {:.0?}", started.elapsed());
    result.context("privileged tests failed (see the table above)")
}

#[derive(Parser)]
struct VmTestCli {
    #[command(flatten)]
    args: crate::vm::VmTestArgs,
}

pub fn cargo(workspace: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(args)
        .current_dir(workspace)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}
