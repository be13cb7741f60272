//! The command line: one clap enum, one module per command.
pub mod attach;
pub mod capture;
pub mod collect;
pub mod daemon;
pub mod detach;
pub mod docs;
pub mod fleet;
pub mod install;
pub mod list;
pub mod mirror;
pub mod sessions;
pub mod show;
pub mod status;
pub mod update;

use clap::{Parser, Subcommand};

use crate::model::sources::{LibvirtUri, Sources};

#[derive(Parser)]
#[command(
    name = "vmsniff",
    version,
    about = "Mirror a VM's frames, both directions, from the hypervisor to a remote collector over GRE",
    long_about = "Mirror a VM's frames, both directions, from the hypervisor to a remote collector \
                  over GRE.\n\nvmsniff attaches tc programs to the VM's tap and clones every frame \
                  into a GRE tunnel; the VM's own frames pass untouched. At the collector: \
                  `tcpdump -n -i eth0 proto 47`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// The libvirt to read VMs from (read-only), before or after the command. Default:
    /// LIBVIRT_DEFAULT_URI, else libvirt's own default (qemu:///system).
    #[arg(long, global = true, value_name = "URI")]
    pub connect: Option<String>,

    /// The OVSDB to read OVS ports from. Default: /run/openvswitch/db.sock, else
    /// /var/run/openvswitch/db.sock.
    #[arg(long, global = true, value_name = "unix:PATH", env = "VMSNIFF_OVSDB")]
    pub ovsdb: Option<String>,
}

impl Cli {
    pub fn sources(&self) -> Sources {
        Sources { libvirt: LibvirtUri::new(self.connect.clone()), ovsdb: self.ovsdb.clone() }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Start mirroring a VM's NIC; prints the session id and returns. The mirror persists.
    Attach(attach::AttachArgs),
    /// Stop mirroring: one session, every session of a tap, or all.
    Detach(detach::DetachArgs),
    /// Change a running session's --filter, --snaplen, --sample or --rate-limit, with no gap.
    Update(update::UpdateArgs),
    /// Show every mirror session with its counters.
    Status(status::StatusArgs),
    /// Mirror in the foreground with live counters; Ctrl-C or SIGTERM detaches.
    Mirror(attach::AttachArgs),
    /// Every VM NIC of this host: names, UUID, state, MAC, tap, plug, OVS port, sessions.
    List(list::ListArgs),
    /// One VM's NICs and the path their frames take now (tap, bridges, veths, OVS), checked.
    Show(show::ShowArgs),
    /// Capture a VM's frames locally with tcpdump (decoded, or pcap with -w).
    Capture(capture::CaptureArgs),
    /// Keep the mirrors of a config file (systemd service): re-attach when VMs reboot or come
    /// back, reload on SIGHUP, adopt running mirrors when restarted.
    Daemon(daemon::DaemonArgs),
    /// Make the running daemon re-read its config; fails with the config's error if it is
    /// refused (the daemon then keeps the previous one).
    Reload(daemon::ReloadArgs),
    /// Install this binary, the systemd unit and an example config on this node.
    Install(install::InstallArgs),
    /// Remove what `install` put (a config that is no longer the example stays).
    Uninstall(install::InstallArgs),
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// On the collector: receive GRE and ERSPAN copies and write pcapng, one interface per
    /// sender and session, the direction of every frame in its flags.
    Collect(collect::CollectArgs),
    /// Mirrors declared once in etcd for a whole cloud, kept by every compute node's daemon and
    /// following the VM when it migrates.
    Fleet(fleet::FleetArgs),
}
