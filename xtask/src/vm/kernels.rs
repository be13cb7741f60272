//! Debian's packaged kernels, downloaded once into `target/vm/kernels/<name>/`.
//!
//! This host's kernel has no ip_gre and no openvswitch; Debian's kernels have both as modules.
//! Each suite's current package is resolved through its `linux-image-amd64` metapackage because
//! the ABI number in the package name changes and old ones drop out of the archive. apt runs with
//! a private configuration under the kernel's staging directory, so the machine's own sources and
//! package lists are never touched.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use nix::fcntl::{Flock, FlockArg};

/// The guest kernels: name on the command line, and the apt lines of the suite that ships it.
/// The security suites carry the current 5.10 and 6.1; trixie's 6.12 is updated in place.
pub const KERNELS: &[(&str, &[&str])] = &[
    (
        "5.10",
        &[
            "deb http://deb.debian.org/debian bullseye main",
            "deb http://deb.debian.org/debian-security bullseye-security main",
        ],
    ),
    (
        "6.1",
        &[
            "deb http://deb.debian.org/debian bookworm main",
            "deb http://deb.debian.org/debian-security bookworm-security main",
        ],
    ),
    ("6.12", &["deb http://deb.debian.org/debian trixie main"]),
];

/// Module subtrees kept from the package: what networking tests and the 9p root need. The rest
/// (GPU, sound, media, storage drivers) is most of the package's 400 MB and never loads in a VM
/// without such devices.
const KEPT_SUBTREES: &[&str] = &[
    "kernel/net",
    "kernel/crypto",
    "kernel/lib",
    "kernel/fs",
    "kernel/arch",
    "kernel/drivers/net",
    "kernel/drivers/virtio",
    "kernel/drivers/char",
    "kernel/drivers/block",
];

/// An unpacked kernel: `root` is the `-b`/`-d` base of depmod and modprobe, holding
/// `lib/modules/<release>` with a current modules.dep.
pub struct Kernel {
    pub name: &'static str,
    pub release: String,
    pub vmlinuz: PathBuf,
    pub root: PathBuf,
}

impl Kernel {
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// Returns the cached kernel `name`, downloading and unpacking it first if needed.
pub fn prepare(vm_dir: &Path, name: &str) -> anyhow::Result<Kernel> {
    let (name, sources) = KERNELS
        .iter()
        .find(|(n, _)| *n == name)
        .with_context(|| format!("unknown kernel {name:?}: choose one of {}", kernel_names()))?;
    let kernels_dir = vm_dir.join("kernels");
    fs::create_dir_all(&kernels_dir).with_context(|| format!("creating {}", kernels_dir.display()))?;
    // Two harness runs at once must not unpack into the same directory.
    let lock = fs::File::create(kernels_dir.join(".lock")).context("creating the kernel cache lock")?;
    let _lock =
        Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| e).context("locking the kernel cache")?;

    let dir = kernels_dir.join(name);
    if !dir.join("release").is_file() {
        download(&kernels_dir, name, sources, &dir)?;
    }
    let release = fs::read_to_string(dir.join("release"))
        .with_context(|| format!("reading {}", dir.join("release").display()))?
        .trim()
        .to_owned();
    let root = dir.join("root");
    Ok(Kernel { name, vmlinuz: root.join("boot").join(format!("vmlinuz-{release}")), release, root })
}

pub fn kernel_names() -> String {
    KERNELS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// Downloads into `<name>.partial` and renames it into place at the end, so an interrupted run
/// leaves nothing that looks complete.
fn download(kernels_dir: &Path, name: &str, sources: &[&str], dir: &Path) -> anyhow::Result<()> {
    let staging = kernels_dir.join(format!("{name}.partial"));
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    let apt_dir = staging.join("apt");
    for sub in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(apt_dir.join(sub)).with_context(|| format!("creating {}", apt_dir.display()))?;
    }
    let sources_list = apt_dir.join("sources.list");
    fs::write(&sources_list, sources.join("\n") + "\n").context("writing the private sources.list")?;
    let apt_options = [
        format!("Dir::Etc::SourceList={}", sources_list.display()),
        "Dir::Etc::SourceParts=/dev/null".to_owned(),
        format!("Dir::State::Lists={}", apt_dir.join("lists").display()),
        format!("Dir::Cache={}", apt_dir.join("cache").display()),
        // The private directories belong to root: apt's `_apt` sandbox user could not write them.
        "APT::Sandbox::User=root".to_owned(),
    ];
    let apt = |tool: &str| {
        let mut cmd = Command::new(tool);
        for option in &apt_options {
            cmd.arg("-o").arg(option);
        }
        cmd.current_dir(&staging);
        cmd
    };

    eprintln!("vm: kernel {name}: fetching Debian's package lists");
    run(apt("apt-get").args(["update", "-q"]), "apt-get update (needs network access to deb.debian.org)")?;
    let depends = output(apt("apt-cache").args(["depends", "linux-image-amd64"]), "apt-cache depends")?;
    let package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .with_context(|| format!("linux-image-amd64 names no kernel package in {sources:?}:\n{depends}"))?
        .to_owned();
    eprintln!("vm: kernel {name}: downloading {package}");
    run(apt("apt-get").args(["download", "-q", &package]), "apt-get download")?;
    let deb = fs::read_dir(&staging)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", staging.display()))?;

    let root = staging.join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root), "dpkg -x")?;
    // Trixie's package ships its modules under usr/lib/modules; depmod -b and modprobe -d of
    // this host's kmod look under lib/modules only.
    let usr_modules = root.join("usr/lib/modules");
    if usr_modules.is_dir() {
        fs::create_dir_all(root.join("lib")).context("creating lib/ in the unpacked kernel")?;
        fs::rename(&usr_modules, root.join("lib/modules"))
            .context("moving usr/lib/modules to lib/modules")?;
    }
    let release = single_entry(&root.join("lib/modules"))?;
    prune(&root.join("lib/modules").join(&release))?;
    run(Command::new("depmod").arg("-b").arg(&root).arg(&release), "depmod (package kmod)")?;

    fs::remove_dir_all(&apt_dir).context("removing the private apt state")?;
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    fs::write(staging.join("release"), format!("{release}\n")).context("writing the release marker")?;
    fs::rename(&staging, dir).with_context(|| format!("moving {} into place", staging.display()))?;
    eprintln!("vm: kernel {name}: {release} cached in {}", dir.display());
    Ok(())
}

fn single_entry(dir: &Path) -> anyhow::Result<String> {
    let names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("the kernel package has no {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one kernel release in {}, found {names:?}", dir.display()),
    }
}

fn prune(modules: &Path) -> anyhow::Result<()> {
    prune_under(modules, Path::new("kernel"))
}

/// Removes every directory under `modules/rel` that neither is, nor leads to, a kept subtree.
fn prune_under(modules: &Path, rel: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(modules.join(rel))? {
        let sub = rel.join(entry?.file_name());
        if KEPT_SUBTREES.iter().any(|k| sub.starts_with(k)) {
            continue;
        }
        if KEPT_SUBTREES.iter().any(|k| Path::new(k).starts_with(&sub)) {
            prune_under(modules, &sub)?;
        } else {
            let path = modules.join(&sub);
            if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) }
                .with_context(|| format!("pruning {}", path.display()))?;
        }
    }
    Ok(())
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
