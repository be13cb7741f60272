//! The guest's initramfs: busybox, the modules that reach the host's root over 9p, and an init
//! that mounts that root and hands over to the run's stage two (see qemu.rs).
//!
//! Everything else (ip_gre, openvswitch, ...) loads later from the cached kernel tree through
//! the 9p root, with the host's kmod, so the initramfs stays a few megabytes and is rebuilt for
//! every boot instead of being cached and invalidated.
use std::{collections::HashMap, fs, path::Path};

use anyhow::{Context as _, bail};

use super::kernels::Kernel;

/// The modules the init needs before the host root is mounted. virtio_pci is a module in
/// Debian's kernels and the 9p transport finds no device until it is loaded.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// The host's statically linked busybox (package busybox-static).
const BUSYBOX: &str = "/bin/busybox";

/// PID 1 in the initramfs. The run directory's host path comes on the kernel command line, and
/// the run's share is mounted at that same path so that every path means the same on both sides.
/// The host's root is read-only; switch_root (rather than a chroot of the command) makes it the
/// root of PID 1 and of the kernel's own helpers, so the kernel's module autoloading runs the
/// modprobe wrapper that stage two installs.
const INIT: &str = r#"#!/bin/busybox sh
export PATH=/bin
/bin/busybox --install -s /bin
fail() {
    echo "vmsniff-vm: error: initramfs: $*"
    poweroff -f
}
mount -t proc proc /proc && mount -t sysfs sys /sys && mount -t devtmpfs dev /dev || fail "mounting proc, sys, dev"
while read -r module; do
    insmod "/modules/$module" || fail "insmod $module"
done < /modules/order
for arg in $(cat /proc/cmdline); do
    case "$arg" in vmsniff.run=*) run="${arg#vmsniff.run=}" ;; esac
done
[ -n "$run" ] || fail "no vmsniff.run= on the kernel command line"
opts=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$opts,ro,cache=loose" hostroot /newroot || fail "mounting the host root over 9p"
mount -t 9p -o "$opts" vmrun "/newroot$run" || fail "mounting the run directory over 9p"
for fs in proc sys dev; do
    mount --move "/$fs" "/newroot/$fs" || fail "moving /$fs"
done
exec switch_root /newroot /bin/sh "$run/init.sh"
"#;

/// Writes the initramfs of `kernel` to `out` as an uncompressed newc cpio archive (the kernel
/// unpacks it without a decompressor, and it is small).
pub fn build(kernel: &Kernel, out: &Path) -> anyhow::Result<()> {
    let modules = boot_modules(&kernel.modules_dir())?;
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdin and stdout before devtmpfs is mounted.
    cpio.char_device("dev/console", 5, 1);
    cpio.file("init", 0o755, INIT.as_bytes());
    let busybox = fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}: run `cargo xtask setup`"))?;
    cpio.file("bin/busybox", 0o755, &busybox);
    let mut order = String::new();
    for rel in &modules {
        let file_name = Path::new(rel).file_name().context("module path without a file name")?;
        let file_name = file_name.to_string_lossy();
        let path = kernel.modules_dir().join(rel);
        let data = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        cpio.file(&format!("modules/{file_name}"), 0o644, &data);
        order.push_str(&file_name);
        order.push('\n');
    }
    cpio.file("modules/order", 0o644, order.as_bytes());
    fs::write(out, cpio.finish()).with_context(|| format!("writing {}", out.display()))
}

/// The boot modules and their dependencies from modules.dep, in load order. Each modules.dep
/// line lists the module's whole dependency closure, last-loaded first.
fn boot_modules(modules_dir: &Path) -> anyhow::Result<Vec<String>> {
    let dep_file = modules_dir.join("modules.dep");
    let deps = fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    let by_name: HashMap<String, (&str, Vec<&str>)> = deps
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(path, rest)| (module_name(path), (path, rest.split_whitespace().collect())))
        .collect();
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let mut order: Vec<String> = Vec::new();
    for wanted in BOOT_MODULES {
        let name = module_name(wanted);
        let Some((module, deps)) = by_name.get(&name) else {
            if builtin.lines().any(|l| module_name(l) == name) {
                continue;
            }
            bail!("module {wanted} is neither in {} nor built in", dep_file.display());
        };
        for path in deps.iter().rev().chain(std::iter::once(module)) {
            if !order.iter().any(|p| p == path) {
                order.push((*path).to_owned());
            }
        }
    }
    Ok(order)
}

/// `kernel/net/9p/9pnet_virtio.ko.xz` -> `9pnet_virtio`; modprobe treats `-` and `_` alike.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// A minimal writer of the "newc" cpio format the kernel unpacks.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, (rdev_major, rdev_minor): (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // major of the device holding the file
            0, // minor of the device holding the file
            rdev_major,
            rdev_minor,
            name.len() as u32 + 1, // with the terminating NUL
            0,                     // checksum, unused in newc
        ];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}
