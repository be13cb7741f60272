use std::{io, path::PathBuf};

use thiserror::Error;

/// A kernel operation that failed, with what it was doing and on what.
#[derive(Debug, Error)]
pub enum KernelError {
    #[error(
        "{} belongs to uid {uid}, not root: another user made it and could hold it for ever; \
         remove it (`rm {}`) and run the command again",
        path.display(),
        path.display()
    )]
    LockNotRoots { path: PathBuf, uid: u32 },
    #[error(
        "another vmsniff{} has held {} for {} s: wait for it to finish, or stop it if it hangs \
         (`ps -p PID`); nothing was changed",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default(),
        path.display(),
        waited.as_secs()
    )]
    LockHeld { path: PathBuf, waited: std::time::Duration, holder: Option<u32> },
    #[error("bpffs is not mounted at {} and vmsniff cannot mount it; mount it with `mount -t bpf bpf {}`", path.display(), path.display())]
    BpffsUnavailable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "vmsniff's pinned maps at {} do not match this vmsniff ({detail}); they were made by \
         another version: detach their sessions with that version, or remove them all with \
         `vmsniff detach --all`",
        path.display()
    )]
    AbiMismatch { path: PathBuf, detail: String },
    #[error(
        "vmsniff's state at {} was made by a vmsniff of ABI version {found}{}, and this vmsniff \
         is of ABI version {ours}: it cannot read that state and changed nothing. Detach those \
         sessions with the vmsniff that made them, or remove them all with `vmsniff detach \
         --all` (this one finds another version's tc filters, GRE devices and pins by name)",
        path.display(),
        if *recorded { "" } else { " (made before versions were recorded)" }
    )]
    AbiVersion { path: PathBuf, found: u32, recorded: bool, ours: u32 },
    #[error(
        "this kernel cannot create {kind} devices (the {} module is missing); load it with \
         `modprobe {}`, use another --encap, or mirror into a local interface with --to-dev",
        tunnel_module(kind),
        tunnel_module(kind)
    )]
    NoTunnelSupport { kind: &'static str },
    #[error(
        "an interface named {name} exists and is not vmsniff's; rename or delete it (vmsniff \
         names its GRE devices vms<session>-<direction>)"
    )]
    DeviceNameTaken { name: String },
    #[error(
        "{name} has a legacy `ingress` qdisc, which leaves no room for the clsact qdisc vmsniff \
         attaches to; move its filters under clsact (`tc qdisc del dev {name} ingress`, `tc qdisc \
         add dev {name} clsact`, then re-add them), or use --attach-mode tcx on Linux >= 6.6"
    )]
    LegacyIngressQdisc { name: String },
    #[error(
        "a GRE device toward {remote} with wire key {wire_key} exists already (another tool's, or \
         a leftover); delete it, or give this session another --key"
    )]
    TunnelExists { remote: std::net::IpAddr, wire_key: u32 },
    #[error(
        "a VXLAN device with VNI {vni} on UDP port {port} exists already in this network namespace \
         (the kernel allows one per VNI and port, whatever the collector: another session's with the \
         same --key, another tool's, or a tenant network's); give this session another --key, or \
         another --port"
    )]
    VniInUse { vni: u32, port: u16 },
    #[error(
        "UDP port {port} is taken on this host by a socket of another kind (Open vSwitch's \
         vxlan_sys_{port}, or a VXLAN device with other flags), and a VXLAN device opens its \
         destination port to receive as well: give another --port (the collector must listen \
         there), or use --encap gre"
    )]
    UdpPortInUse { port: u16 },
    #[error(
        "this process runs in a mount namespace of its own (as under `ip netns exec`), and the \
         host has no bpffs at {} (seen here as {}); a bpffs mounted from here would vanish with \
         this process, and every pin with it. Mount it in the host's namespace (`mount -t bpf \
         bpf {}`, outside `ip netns exec`), or run vmsniff there: `nsenter --net=/run/netns/NAME \
         vmsniff ...`",
        path.display(),
        through.display(),
        path.display()
    )]
    HostBpffsMissing { path: PathBuf, through: PathBuf },
    #[error(
        "vmsniff's maps are not pinned under {} right after loading its eBPF object: something \
         removed them meanwhile (a tool cleaning bpffs?); stop it and run the command again",
        path.display()
    )]
    MapsVanished { path: PathBuf },
    #[error(
        "vmsniff has no pinned maps under {}: no session exists in this network namespace any \
         more (`vmsniff status` lists the sessions)",
        path.display()
    )]
    NoPinnedMaps { path: PathBuf },
    #[error(
        "the embedded eBPF object has no program {name}: this vmsniff was built from mismatched \
         sources; rebuild it (`cargo build --release`)"
    )]
    ProgramMissing { name: String },
    #[error(
        "GRE device {name} vanished right after its creation: something deletes interfaces it does \
         not know (a network manager?); make it leave vmsniff's vms* devices alone and run the \
         command again"
    )]
    DeviceVanished { name: String },
    #[error(
        "tap {tap} has no free session slot, although it had one when this attach was planned: \
         another process changed vmsniff's maps meanwhile; run the command again (`vmsniff \
         status` lists the tap's sessions)"
    )]
    TapSlotsTaken { tap: String },
    #[error(
        "{name} is no longer ifindex {ifindex} ({now}): it was deleted (and perhaps created again) \
         while vmsniff waited for its lock, so it may be another interface now; run the command \
         again to mirror the one that is there"
    )]
    InterfaceChanged { name: String, ifindex: u32, now: String },
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("{op}")]
    Map {
        op: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("{op}")]
    Program {
        op: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{op}")]
    Link {
        op: String,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("pinning {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("{op}")]
    Ebpf {
        op: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("{op}")]
    Netlink {
        op: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
}

impl KernelError {
    pub fn io(op: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let op = op.into();
        move |source| KernelError::Io { op, source }
    }

    pub fn link(op: impl Into<String>) -> impl FnOnce(aya::programs::links::LinkError) -> Self {
        let op = op.into();
        move |source| KernelError::Link { op, source: Box::new(source) }
    }

    pub fn map(op: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> Self {
        let op = op.into();
        move |source| KernelError::Map { op, source: Box::new(source) }
    }

    pub fn program(op: impl Into<String>) -> impl FnOnce(aya::programs::ProgramError) -> Self {
        let op = op.into();
        move |source| KernelError::Program { op, source: Box::new(source) }
    }

    pub fn netlink(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let op = op.into();
        move |source| KernelError::Netlink { op, source: Box::new(source) }
    }
}

/// The module that provides a tunnel link kind.
fn tunnel_module(kind: &str) -> &'static str {
    match kind {
        "vxlan" => "vxlan",
        "ip6gretap" | "ip6erspan" => "ip6_gre",
        _ => "ip_gre",
    }
}
