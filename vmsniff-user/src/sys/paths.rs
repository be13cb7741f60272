//! Where vmsniff keeps its pinned state, and the names of what it creates. Pure functions: the
//! one place that knows the layout, so that attach, detach, status and tests agree.
use std::path::{Path, PathBuf};

use vmsniff_ebpf::{Direction, TcHook};

/// The bpffs mount point.
pub const BPFFS: &str = "/sys/fs/bpf";
/// vmsniff's directory on bpffs; one subdirectory per network namespace below it.
pub const VMSNIFF_DIR: &str = "vmsniff";

/// Pin paths of one network namespace's state: `/sys/fs/bpf/vmsniff/<netns inode>/...`, so that
/// sessions in two namespaces never see or clean each other's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinPaths {
    root: PathBuf,
}

impl PinPaths {
    pub fn for_netns(bpffs: &Path, netns_inode: u64) -> Self {
        Self { root: vmsniff_dir(bpffs).join(netns_inode.to_string()) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Where the programs of one build of the eBPF object (`tag`: a hash of its bytes) are
    /// pinned, so that a later attach in this namespace needs no verifier run.
    pub fn programs_dir(&self, tag: &str) -> PathBuf {
        self.programs_root().join(tag)
    }

    pub fn programs_root(&self) -> PathBuf {
        self.root.join("programs")
    }

    /// A TCX link of one tap hook. Keyed by ifindex, which a re-created tap never reuses while
    /// the old link is pinned.
    pub fn link(&self, tap_ifindex: u32, hook: TcHook) -> PathBuf {
        self.links_dir().join(format!("{tap_ifindex}-{}", hook.as_str()))
    }
}

/// The lock every state-changing command holds: one per host, because bpffs is. Outside bpffs,
/// so that vmsniff's directory there can go once the last session does.
pub const LOCK_FILE: &str = "/run/lock/vmsniff.lock";

/// vmsniff's directory on bpffs, the parent of every namespace's pins.
pub fn vmsniff_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(VMSNIFF_DIR)
}

/// The GRE device that carries one direction of one session: `vms<id>-out`, `vms<id>-in`
/// (at most 11 characters, below IFNAMSIZ).
pub fn gre_device_name(session_id: u32, direction: Direction) -> String {
    format!("vms{session_id}-{}", direction.as_str())
}

/// The interface alias that marks a device as vmsniff's: detach deletes a device only when its
/// name and this alias both match.
pub fn gre_device_alias(session_id: u32, direction: Direction) -> String {
    format!("vmsniff session {session_id} {}", direction.as_str())
}

/// The session and direction of a device that carries both vmsniff's GRE device name and its
/// alias ([`gre_device_name`], [`gre_device_alias`]); `None` for any other device.
pub fn gre_device_session(name: &str, alias: Option<&str>) -> Option<(u32, Direction)> {
    Direction::ALL.into_iter().find_map(|direction| {
        let id = name.strip_prefix("vms")?.strip_suffix(&format!("-{}", direction.as_str()))?.parse().ok()?;
        let ours =
            gre_device_name(id, direction) == name && alias == Some(gre_device_alias(id, direction).as_str());
        ours.then_some((id, direction))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_per_network_namespace() {
        let a = PinPaths::for_netns(Path::new(BPFFS), 4026531840);
        let b = PinPaths::for_netns(Path::new(BPFFS), 4026532000);
        assert_eq!(a.root(), Path::new("/sys/fs/bpf/vmsniff/4026531840"));
        assert_ne!(a.root(), b.root());
        assert_eq!(a.link(7, TcHook::Egress), Path::new("/sys/fs/bpf/vmsniff/4026531840/links/7-egress"));
        assert!(a.map("VMSNIFF_TAPS").starts_with(a.maps_dir()));
    }

    #[test]
    fn device_names_fit_ifnamsiz() {
        assert_eq!(gre_device_name(1, Direction::Out), "vms1-out");
        assert!(gre_device_name(vmsniff_ebpf::MAX_SESSION_ID, Direction::Out).len() < 16);
        assert_ne!(gre_device_name(3, Direction::In), gre_device_name(3, Direction::Out));
    }

    #[test]
    fn gre_devices_are_known_by_name_and_alias_together() {
        for (id, direction) in [(1, Direction::Out), (1023, Direction::In)] {
            let (name, alias) = (gre_device_name(id, direction), gre_device_alias(id, direction));
            assert_eq!(gre_device_session(&name, Some(&alias)), Some((id, direction)));
        }
        assert_eq!(gre_device_session("vms3-in", None), None);
        assert_eq!(gre_device_session("vms3-in", Some("vmsniff session 3 out")), None);
        assert_eq!(gre_device_session("vms3-in", Some("vmsniff session 4 in")), None);
        assert_eq!(gre_device_session("vms+3-in", Some("vmsniff session 3 in")), None);
        assert_eq!(gre_device_session("vms03-in", Some("vmsniff session 3 in")), None);
        assert_eq!(gre_device_session("gre0", Some("vmsniff session 3 in")), None);
    }
}
