//! `cargo xtask deb`: the Debian package, built by cargo-deb from vmsniff-user's
//! `[package.metadata.deb]`, then checked with lintian.
//!
//! The man pages and completions are what `vmsniff install --root` writes, so the package and
//! an installed binary ship the same files.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Where `install --root` stages the generated files; the package metadata's assets name it as
/// `target/release/deb-assets`.
const STAGE: &str = "release/deb-assets";

/// Builds the package and returns its path.
pub fn build(workspace: &Path) -> anyhow::Result<PathBuf> {
    let cargo_deb = crate::setup::cargo_bin("cargo-deb")?;
    if !cargo_deb.is_file() {
        bail!("cargo-deb is not installed ({}): run `cargo xtask setup`", cargo_deb.display());
    }
    crate::test::cargo(workspace, &["build", "--release", "-p", "vmsniff-user"])?;
    let target = crate::target_dir(workspace);
    let vmsniff = target.join("release/vmsniff");
    let stage = target.join(STAGE);
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    run(
        Command::new(&vmsniff)
            .args(["install", "--bin-dir", "/usr/sbin", "--share-dir", "/usr/share", "--root"])
            .arg(&stage)
            .env("RUST_LOG", "warn"),
        "vmsniff install --root (man pages and completions for the package)",
    )?;
    // Policy wants man pages gzipped; cargo-deb compresses only files it does not take from the
    // target directory. -n: no name or time stamp, so the same pages give the same bytes.
    let pages: Vec<PathBuf> = fs::read_dir(stage.join("usr/share/man/man8"))
        .context("reading the staged man pages")?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .context("reading the staged man pages")?;
    run(Command::new("gzip").args(["-9", "-n"]).args(&pages), "gzip of the man pages")?;
    let out = Command::new(&cargo_deb)
        .args(["-p", "vmsniff-user", "--no-build"])
        .current_dir(workspace)
        .stderr(Stdio::inherit())
        .output()
        .context("starting cargo-deb")?;
    if !out.status.success() {
        bail!("cargo-deb failed ({}): see its messages above", out.status);
    }
    // cargo-deb prints the package's path, alone, as its last line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .last()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .with_context(|| format!("cargo-deb printed no package path: {stdout:?}"))?;
    Ok(deb)
}

/// `cargo xtask deb`: build, then lintian, which must report no error and no warning that the
/// package's override file does not explain.
pub fn run_command(workspace: &Path) -> anyhow::Result<()> {
    let deb = build(workspace)?;
    lintian(&deb)?;
    println!("{}", deb.display());
    eprintln!("deb: install it with `apt install {}`", deb.display());
    Ok(())
}

pub fn lintian(deb: &Path) -> anyhow::Result<()> {
    run(
        Command::new("lintian").args(["--fail-on", "error,warning", "--info"]).arg(deb),
        "lintian (`cargo xtask setup` installs it)",
    )
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
