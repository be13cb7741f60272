//! `vmsniff collect`: the collector's side. Receives vmsniff's (and Open vSwitch's) GRE and
//! ERSPAN copies through a raw socket and writes pcapng with one interface per sender and
//! session, each packet's direction in its flags.
use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::Args;

use crate::fleet::{self, etcd::EtcdArgs};
use crate::{
    collect::{
        names::{Names, NamesArg, parse_names_arg},
        pcapng::{Destination, Rotate, parse_rotate},
        receive::{self, Cidr, Ended, Options, parse_cidr},
        stats::{SharedStats, lock, render_summary},
    },
    metrics,
    model::listen::parse_listen_addr,
};

#[derive(Args, Debug)]
pub struct CollectArgs {
    /// Where to write pcapng: a file, or `-` for stdout (`vmsniff collect -w - | wireshark -k -i -`).
    #[arg(short = 'w', long = "write", value_name = "FILE|-")]
    pub write: PathBuf,

    /// Only copies from these senders (an address or a network, IPv4; repeatable). Default:
    /// every sender. Packets from others are counted and dropped.
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    pub from: Vec<Cidr>,

    /// Start a new file when the current one reaches SIZE (100M, 1G) or every TIME (30s, 10m,
    /// 1h): FILE, then FILE's name with .1, .2, ... before its extension.
    #[arg(long, value_name = "SIZE|TIME", value_parser = parse_rotate)]
    pub rotate: Option<Rotate>,

    /// Stop after N copies.
    #[arg(short = 'c', long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Name the capture's interfaces after VMs and taps: the JSON `vmsniff status --json` printed
    /// on a hypervisor, for every sender or for SENDER only (repeatable).
    #[arg(long, value_name = "[SENDER=]FILE", value_parser = parse_names_arg)]
    pub names: Vec<NamesArg>,

    /// Serve Prometheus/OpenMetrics text on http://ADDR:PORT/metrics: per sender, key and
    /// direction the copies, bytes, lost, reordered, duplicates and restarts; what was
    /// undecodable or refused, by reason; socket drops.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen_addr)]
    pub metrics: Option<SocketAddr>,

    /// Name interfaces after the fleet's mirrors (`NAME (VM nic N)`, followed in etcd as they
    /// are declared), one interface per mirror whichever node sends it, and count its moves
    /// between nodes apart from lost copies. etcd is reached with the same options as `vmsniff fleet`.
    #[arg(long)]
    pub fleet: bool,

    #[command(flatten)]
    pub etcd: EtcdArgs,
}

pub async fn run(args: CollectArgs) -> anyhow::Result<()> {
    let destination = if args.write.as_os_str() == "-" {
        if args.rotate.is_some() {
            anyhow::bail!("--rotate starts new files: it needs -w FILE, not -w - (stdout)");
        }
        Destination::Stdout
    } else {
        Destination::File(args.write)
    };
    let mut names = Names::load(&args.names)?;
    if args.fleet {
        let fleet = fleet::names::follow(args.etcd.settings())
            .await
            .context("reading the fleet's mirrors for --fleet")?;
        names.set_fleet(fleet);
    }
    let stats = SharedStats::default();
    // Before the socket and the capture file: a bad address leaves no file behind.
    if let Some(addr) = args.metrics {
        let listener = metrics::bind(addr).await?;
        log::info!("metrics on http://{addr}/metrics");
        tokio::spawn(metrics::serve(listener, metrics::collector::scrape(stats.clone())));
    }
    let options = Options { from: args.from, destination, rotate: args.rotate, count: args.count, names };
    let ended = receive::run(&options, &stats).await?;
    let stats = lock(&stats);
    match ended {
        Ended::Signal(signal) => log::info!("{signal}: stopping"),
        Ended::Count => log::info!("{} copies collected (--count)", stats.written),
        Ended::PipeClosed => log::info!("the reader of stdout went away: stopping"),
    }
    eprint!("{}", render_summary(&stats, |key| options.names.interface_name(key)));
    Ok(())
}
