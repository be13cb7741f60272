//! Network namespaces owned by a test.
use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use nix::sched::{CloneFlags, setns};

use crate::run;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A named namespace (`ip netns`), deleted with everything in it on drop, together with any
/// vmsniff pins made for it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Netns {
        let name = format!("vmsn-{}-{}-{role}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.sh("ip link set lo up; sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
        ns
    }

    /// Runs a shell line inside (test-controlled text only), panicking on failure.
    pub fn sh(&self, line: &str) -> String {
        run("ip", &["netns", "exec", &self.name, "sh", "-ec", line])
    }

    /// Runs a shell line inside and returns (success, stdout, stderr).
    pub fn try_sh(&self, line: &str) -> (bool, String, String) {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", line])
            .output()
            .expect("ip netns exec");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// The namespace's inode: vmsniff keys its pins by it.
    pub fn inode(&self) -> u64 {
        std::fs::metadata(self.path()).expect("netns file").ino()
    }

    /// vmsniff's pin directory for this namespace.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/vmsniff").join(self.inode().to_string())
    }

    /// Runs `f` on a thread inside the namespace: sockets and taps it opens live there.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in netns panicked")
    }

    /// The names of every interface inside, sorted (`peer1@peer0` is `peer1`).
    pub fn link_names(&self) -> Vec<String> {
        let mut names: Vec<String> = run("ip", &["-n", &self.name, "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or("").to_owned()))
            .collect();
        names.sort();
        names
    }

    /// Names of the TCX programs on both hooks of an interface inside (none on kernels without
    /// TCX).
    pub fn tcx_programs(&self, dev: &str) -> Vec<String> {
        let dev = dev.to_owned();
        self.enter(move || {
            use aya::programs::{SchedClassifier, TcAttachType};
            let mut names = Vec::new();
            for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
                if let Ok((_, programs)) = SchedClassifier::query_tcx(&dev, hook) {
                    names.extend(programs.iter().map(|p| p.name_as_str().unwrap_or("?").to_owned()));
                }
            }
            names
        })
    }

    /// The ifindex of an interface inside.
    pub fn ifindex(&self, name: &str) -> u32 {
        self.sh(&format!("cat /sys/class/net/{name}/ifindex")).trim().parse().expect("ifindex")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let pins = self.path().exists().then(|| self.pin_dir());
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
        // The namespace's devices (taps, GRE devices) went with it; its pins would not.
        if let Some(pins) = pins {
            let _ = std::fs::remove_dir_all(pins);
        }
    }
}
