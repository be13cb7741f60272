//! `vmsniff collect`: the collector's side. Receives vmsniff's (and Open vSwitch's) GRE and
//! ERSPAN copies over IPv4 and IPv6, and VXLAN on a UDP port, through a TPACKET_V3 ring, and writes
//! pcapng with one interface per sender and session, each packet's direction in its flags.
use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::Args;

use crate::fleet::{self, etcd::EtcdArgs};
use crate::{
    collect::{
        copies::{Cidr, Options, parse_cidr},
        fanout::MAX_THREADS,
        names::{Names, NamesArg, parse_names_arg},
        pcapng::{Destination, Rotate, parse_rotate},
        receive::{self, Ended},
        ring::DEFAULT_RING_MIB,
        stats::{DEFAULT_MAX_STREAMS, MAX_STREAMS_LIMIT, ShardedStats, SharedStats, render_summary},
    },
    metrics,
    model::listen::parse_listen_addr,
};

#[derive(Args, Debug)]
pub struct CollectArgs {
    /// Where to write pcapng: a file, or `-` for stdout (`vmsniff collect -w - | wireshark -k -i -`).
    #[arg(short = 'w', long = "write", value_name = "FILE|-")]
    pub write: PathBuf,

    /// Only copies from these senders (an address or a network, IPv4 or IPv6; repeatable).
    /// Default: every sender. Packets from others are counted and dropped.
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    pub from: Vec<Cidr>,

    /// Receive VXLAN copies (`attach --encap vxlan`) on this UDP port too, over IPv4 and IPv6
    /// (4789 is VXLAN's). A UDP port needs no privilege (above 1023 without
    /// CAP_NET_BIND_SERVICE): without CAP_NET_RAW, collect receives VXLAN only.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub vxlan_port: Option<u16>,

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

    /// Record plain GRE too: Ethernet in GRE without vmsniff's sequence numbers whose key no
    /// `--names` OVS-mode session or `--fleet` mirror names. Off by default: a node's GRE tenant
    /// networks look the same, and are no mirror (they are counted, not written).
    #[arg(long)]
    pub plain_gre: bool,

    /// Streams (sender, session, direction) counted at most; copies of further streams are
    /// counted as refused, not written. Bounds what the network can make the collector keep
    /// (512 bytes of sequence window per stream).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_STREAMS, value_parser = parse_max_streams)]
    pub max_streams: usize,

    /// The receive ring's size in MiB, per reading thread: the kernel holds copies there until
    /// collect writes them (bursts from many hypervisors at once). What does not fit is counted
    /// as socket drops.
    #[arg(short = 'B', long, value_name = "MIB", default_value_t = DEFAULT_RING_MIB,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(4..=4096))]
    pub buffer_size: usize,

    /// Read with N threads, each with its own ring, for more copies a second than one core
    /// decodes and writes: the kernel hands each sender's copies to one thread (a
    /// PACKET_FANOUT group hashing the sender's address), so they stay in order. One capture
    /// file still: each sender's copies in order, senders interleaved block by block.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_THREADS as u64))]
    pub threads: usize,

    #[command(flatten)]
    pub etcd: EtcdArgs,
}

fn parse_max_streams(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_STREAMS_LIMIT).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a number of streams from 1 to {MAX_STREAMS_LIMIT}")),
    }
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
    let stats = SharedStats::new(ShardedStats::new(args.max_streams, args.threads));
    // Before the socket and the capture file: a bad address leaves no file behind.
    if let Some(addr) = args.metrics {
        let listener = metrics::bind(addr).await?;
        log::info!("metrics on http://{addr}/metrics");
        tokio::spawn(metrics::serve(listener, metrics::collector::scrape(stats.clone())));
    }
    let options = Arc::new(Options {
        from: args.from,
        vxlan_port: args.vxlan_port,
        destination,
        rotate: args.rotate,
        count: args.count,
        names,
        plain_gre: args.plain_gre,
        ring_mib: args.buffer_size,
        threads: args.threads,
    });
    let ended = receive::run(&options, &stats).await?;
    let stats = stats.snapshot();
    match ended {
        Ended::Signal(signal) => log::info!("{signal}: stopping"),
        // Said when it was reached, before the rings were freed.
        Ended::Count => {}
        Ended::PipeClosed => log::info!("the reader of stdout went away: stopping"),
    }
    eprint!("{}", render_summary(&stats, |key| options.names.interface_name(key)));
    Ok(())
}
