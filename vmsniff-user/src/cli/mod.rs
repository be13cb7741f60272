//! The command line: one clap enum, one module per command.
pub mod attach;
pub mod controls;
pub mod detach;
pub mod mirror;
pub mod status;
pub mod target;

use clap::{Parser, Subcommand};

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
}

#[derive(Subcommand)]
pub enum Command {
    /// Start mirroring a tap; prints the session id and returns. The mirror persists.
    Attach(attach::AttachArgs),
    /// Stop mirroring: one session, every session of a tap, or all.
    Detach(detach::DetachArgs),
    /// Show every mirror session with its counters.
    Status(status::StatusArgs),
    /// Mirror in the foreground with live counters; Ctrl-C or SIGTERM detaches.
    Mirror(attach::AttachArgs),
}
