//! `cargo xtask setup`: installs what building and testing vmsniff needs on a Debian 12 machine
//! of this project's kind, idempotently. Facts behind each step: ../shared/notes/ebpf-toolchain.md.
use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Debian packages, and why each is needed.
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "rustc 1.96 with LLVM 22: builds the eBPF programs where rustup has no rust-src"),
    ("cargo-web", "cargo for that rustc"),
    ("libstd-rust-web-dev-bpf", "precompiled core for bpfel-unknown-none"),
    ("llvm-22-dev", "bpf-linker links against LLVM 22"),
    ("qemu-system-x86", "the VM harness boots Debian kernels under TCG"),
    ("busybox-static", "the VM harness's initramfs"),
    ("kmod", "depmod for the guest kernels' modules"),
    ("iproute2", "tests build their topologies with ip and tc"),
    ("tcpdump", "the demo and tests decode what the collector receives; `vmsniff capture` runs it"),
    ("tshark", "tests check that Wireshark's dissectors read vmsniff's ERSPAN and GRE, and collect's pcapng"),
    ("libvirt-dev", "the virt crate links libvirt: vmsniff reads domains through libvirt's API"),
    ("pkg-config", "virt-sys finds libvirt through pkg-config"),
    ("libvirt-clients", "virsh, to check the libvirt test-driver fixtures by hand"),
    ("openvswitch-switch", "ovsdb-server and ovs-vsctl: tests run a real OVSDB for vmsniff to read"),
    ("libpcap-dev", "vmsniff compiles --filter expressions with libpcap"),
    ("netsniff-ng", "trafgen: the benchmark's VM sends small frames at a set rate or as fast as it can"),
    ("iperf3", "the benchmark's VM sends TCP bulk traffic"),
    ("fonts-dejavu-core", "the benchmark's chart and the dashboard's picture are drawn with DejaVu Sans"),
    ("dpkg-dev", "dpkg-shlibdeps: cargo-deb computes the Debian package's Depends with it"),
    ("lintian", "`cargo xtask deb` and the package test check the package with lintian"),
    ("systemd-container", "systemd-nspawn: the package test boots a real systemd to run the service"),
    ("protobuf-compiler", "etcd-client's build script compiles etcd's gRPC API with protoc"),
    ("libprotobuf-dev", "protoc's well-known types (descriptor.proto), which etcd's API imports"),
    ("etcd-server", "the fleet's tests run a real etcd on 127.0.0.1 (not started as a service)"),
    ("openssl", "the fleet's TLS test makes a CA and certificates for its etcd"),
    (
        "prometheus",
        "the PromQL test runs a real Prometheus on 127.0.0.1 (not started as a service) to check the README's and the dashboard's queries",
    ),
];

/// rustup components of the toolchain that runs xtask, and why each is needed.
const COMPONENTS: &[(&str, &str)] = &[
    ("rustfmt", "`cargo xtask test` first checks the formatting (`cargo fmt --all --check`)"),
    ("clippy", "`cargo xtask test` first runs clippy with the workspace lints"),
];

pub fn run() -> anyhow::Result<()> {
    install_components()?;
    install_packages()?;
    link_debian_toolchain()?;
    install_bpf_linker()?;
    install_cargo_deb()?;
    eprintln!("setup: every prerequisite is in place");
    Ok(())
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn install_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> =
        PACKAGES.iter().map(|(name, _)| *name).filter(|name| !package_installed(name)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!(
            "missing Debian packages {}: run `cargo xtask setup` as root to install them",
            missing.join(", ")
        );
    }
    for (name, why) in PACKAGES.iter().filter(|(n, _)| missing.contains(n)) {
        eprintln!("setup: installing {name}: {why}");
    }
    run_step(Command::new("apt-get").arg("update").arg("-q"), "apt-get update")?;
    run_step(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    )
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// For the toolchain this command runs with: rustup hands it down in RUSTUP_TOOLCHAIN (as for
/// `cargo +1.95.0 xtask setup`), else the same toolchain is the default here.
fn install_components() -> anyhow::Result<()> {
    let listed = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .context("running rustup (rustup manages the Rust toolchains here)")?;
    if !listed.status.success() {
        bail!("rustup component list failed: {}", String::from_utf8_lossy(&listed.stderr).trim());
    }
    // One component per line, with its target: `clippy-x86_64-unknown-linux-gnu`.
    let installed = String::from_utf8_lossy(&listed.stdout);
    let missing: Vec<&str> = COMPONENTS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !installed.lines().any(|l| l.split('-').next() == Some(name)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (name, why) in COMPONENTS.iter().filter(|(n, _)| missing.contains(n)) {
        eprintln!("setup: installing the {name} component: {why}");
    }
    run_step(Command::new("rustup").args(["component", "add"]).args(&missing), "rustup component add")
}

/// rustup's proxies come first on PATH, so Debian's rustc is reached as `+debian`.
fn link_debian_toolchain() -> anyhow::Result<()> {
    let listed = Command::new("rustup").args(["toolchain", "list"]).output().context("running rustup")?;
    if String::from_utf8_lossy(&listed.stdout).lines().any(|l| l.split_whitespace().next() == Some("debian"))
    {
        return Ok(());
    }
    run_step(Command::new("rustup").args(["toolchain", "link", "debian", "/usr"]), "rustup toolchain link")
}

/// Where `cargo install` puts `name`.
pub fn cargo_bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    Ok(home.join("bin").join(name))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    if cargo_bin("bpf-linker")?.is_file() {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker 0.13 against LLVM 22 (about two minutes)");
    run_step(
        Command::new("cargo")
            .args(["install", "--locked", "bpf-linker", "--version", "^0.13"])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        "cargo install bpf-linker",
    )
}

fn install_cargo_deb() -> anyhow::Result<()> {
    if cargo_bin("cargo-deb")?.is_file() {
        return Ok(());
    }
    eprintln!("setup: building cargo-deb 3, which `cargo xtask deb` packages with (about a minute)");
    run_step(
        Command::new("cargo").args(["install", "--locked", "cargo-deb", "--version", "^3.8"]),
        "cargo install cargo-deb",
    )
}

fn run_step(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
