//! Builds vmsniff's eBPF programs and leaves the object in OUT_DIR for `include_bytes`.
//!
//! Two toolchains can build them: rustup's nightly with rust-src (`-Z build-std=core`, the
//! usual aya path), or Debian's rustc-web with its precompiled `core` for bpfel, linked into
//! rustup as `debian` (what `cargo xtask setup` installs on machines without rust-src). A
//! missing piece stops the build with the command that installs it, never a stub object.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};

const SETUP: &str = "cargo xtask setup";

/// Crates that need unstable features, unlocked one by one: with `RUSTC_BOOTSTRAP=1` aya-build
/// would ask for build-std, which needs the rust-src that Debian's toolchain lacks.
const DEBIAN_BOOTSTRAP_CRATES: &str = "aya_ebpf,aya_ebpf_bindings,aya_ebpf_cty,aya_ebpf_macros";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=VMSNIFF_EBPF_TOOLCHAIN");
    find_on_path("bpf-linker").with_context(|| {
        format!(
            "bpf-linker is not installed; `{SETUP}` installs it (or: LLVM_PREFIX=/usr/lib/llvm-22 \
             cargo install bpf-linker --no-default-features --features llvm-22)"
        )
    })?;

    let toolchain = pick_toolchain()?;
    if toolchain == "debian" {
        // SAFETY: build scripts are single-threaded; the variable is inherited by the child
        // cargo that aya-build starts.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", DEBIAN_BOOTSTRAP_CRATES) };
    }

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../vmsniff-ebpf").canonicalize()?;
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to vmsniff-ebpf")?;
    let chain = if toolchain == "nightly" { Toolchain::Nightly } else { Toolchain::Custom(&toolchain) };
    aya_build::build_ebpf([Package { name: "vmsniff-ebpf", root_dir: ebpf_dir, ..Default::default() }], chain)
        .with_context(|| format!("building the eBPF programs with the `{toolchain}` toolchain failed"))
}

/// `VMSNIFF_EBPF_TOOLCHAIN` if set; else nightly when it has rust-src; else Debian's.
fn pick_toolchain() -> anyhow::Result<String> {
    if let Ok(chosen) = env::var("VMSNIFF_EBPF_TOOLCHAIN") {
        return Ok(chosen);
    }
    if let Some(sysroot) = sysroot("nightly")
        && sysroot.join("lib/rustlib/src/rust/library/Cargo.lock").exists()
    {
        return Ok("nightly".into());
    }
    match sysroot("debian") {
        Some(sysroot) if sysroot.join("lib/rustlib/bpfel-unknown-none").is_dir() => Ok("debian".into()),
        Some(sysroot) => bail!(
            "the `debian` toolchain ({}) has no precompiled core for bpfel-unknown-none; `{SETUP}` \
             installs it (apt-get install libstd-rust-web-dev-bpf)",
            sysroot.display()
        ),
        None => bail!(
            "no toolchain can build eBPF here: rustup's nightly has no rust-src and no `debian` \
             toolchain is linked; run `{SETUP}` (it installs Debian's rustc-web with a bpfel core \
             and runs `rustup toolchain link debian /usr`), or `rustup component add rust-src \
             --toolchain nightly` where rustup can download"
        ),
    }
}

fn sysroot(toolchain: &str) -> Option<PathBuf> {
    let out = Command::new("rustup").args(["run", toolchain, "rustc", "--print", "sysroot"]).output().ok()?;
    out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let home_bin = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|p| p.join("bin"));
    env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(home_bin)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}
