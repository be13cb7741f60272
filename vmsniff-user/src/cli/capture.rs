//! `vmsniff capture VM`: the local sniff on a VM's tap, both directions, without hunting for the
//! tap. It runs Debian's tcpdump on the resolved tap rather than capturing itself: tcpdump's
//! pcap writer, filter compiler and decoder are what operators already trust and read, and
//! Wireshark reads its files; vmsniff's part is finding the tap.
use std::{io::IsTerminal as _, os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{
    model::sources::Sources,
    service::files::create_safely,
    service::{describe, flags::NicArgs, inventory},
};

#[derive(Args, Debug)]
pub struct CaptureArgs {
    /// The VM: its Nova name, UUID, libvirt domain, MAC or tap. With --tap, this is the
    /// filter's first word.
    #[arg(value_name = "VM")]
    pub vm: Option<String>,

    /// A pcap filter expression (`icmp or arp`), in one or several words.
    #[arg(value_name = "FILTER")]
    pub filter: Vec<String>,

    /// Capture on this interface instead of a VM's tap.
    #[arg(long, value_name = "TAP")]
    pub tap: Option<String>,

    #[command(flatten)]
    pub nic: NicArgs,

    /// Write pcap to FILE (`-` for stdout: `vmsniff capture VM -w - | wireshark -k -i -`)
    /// instead of printing decoded frames.
    #[arg(short = 'w', value_name = "FILE")]
    pub write: Option<PathBuf>,

    /// Stop after COUNT frames.
    #[arg(short = 'c', value_name = "COUNT", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
}

pub async fn run(sources: &Sources, args: CaptureArgs) -> anyhow::Result<()> {
    let (vm, filter): (Option<&str>, Vec<&str>) = match &args.tap {
        Some(_) => (None, args.vm.iter().chain(&args.filter).map(String::as_str).collect()),
        None => (args.vm.as_deref(), args.filter.iter().map(String::as_str).collect()),
    };
    if args.write.as_deref() == Some(std::path::Path::new("-")) && std::io::stdout().is_terminal() {
        bail!(
            "-w - writes binary pcap to stdout, which is a terminal: pipe it (| tcpdump -r - or | wireshark -k -i -) or give -w FILE"
        );
    }
    let resolved = inventory::capture_tap(sources, vm, args.tap.as_deref(), args.nic.choice()).await?;
    let tap = &resolved.tap().name;
    let mut tcpdump = Command::new("tcpdump");
    // -Q inout: both directions (the default, said explicitly). -Z root: Debian's tcpdump
    // otherwise drops to user tcpdump before opening the -w file, which then cannot be written
    // where the caller may write.
    tcpdump.args(["-i", tap, "-Q", "inout", "-Z", "root"]);
    match args.write.as_deref() {
        Some(path) if path == std::path::Path::new("-") => tcpdump.args(["-U", "-w", "-"]),
        // vmsniff opens the file, so that root never writes through a link someone planted
        // (in /tmp, say), and tcpdump writes to it as its stdout.
        Some(path) => tcpdump.args(["-U", "-w", "-"]).stdout(
            create_safely(path, 0o600)
                .with_context(|| format!("opening {} for the capture", path.display()))?,
        ),
        None => tcpdump.args(["-n", "-e"]),
    };
    if let Some(count) = args.count {
        tcpdump.arg("-c").arg(count.to_string());
    }
    if !filter.is_empty() {
        tcpdump.arg("--").args(&filter);
    }
    log::info!("capturing {} with tcpdump, both directions", describe(&resolved));
    // exec: tcpdump takes over this process, so Ctrl-C and its exit status are its own.
    let error = tcpdump.exec();
    if error.kind() == std::io::ErrorKind::NotFound {
        bail!("tcpdump is not installed: apt-get install tcpdump (vmsniff capture runs it on the tap)");
    }
    Err(anyhow::Error::new(error).context("starting tcpdump"))
}
