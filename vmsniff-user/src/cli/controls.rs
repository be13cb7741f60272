//! The arguments that choose which frames a session copies.
use clap::Args;

use crate::plan::{
    controls::{Controls, RateLimit, parse_rate_limit, parse_sample, parse_snaplen},
    filter::{FilterError, compile},
};

#[derive(Args, Debug, Clone, Default)]
pub struct ControlArgs {
    /// Mirror only frames matching this tcpdump (pcap-filter) expression, evaluated in the
    /// kernel before the copy: 'tcp port 443 and net 10.0.0.0/8', 'not arp', 'vlan 100'.
    #[arg(long, value_name = "EXPR")]
    pub filter: Option<String>,

    /// Mirror 1 frame in N (chosen at random) of those the filter selects.
    #[arg(long, value_name = "N", value_parser = parse_sample)]
    pub sample: Option<u32>,

    /// Send copies at most at this rate (tc units: 10mbit, 1gbit, 500kbps; or 50kpps); copies
    /// over it are counted and not sent. The VM's own traffic is never limited.
    #[arg(long, value_name = "RATE", value_parser = parse_rate_limit)]
    pub rate_limit: Option<RateLimit>,

    /// Cut each copy to its first N bytes (1..65535); the VM's frame is never cut. The
    /// original length stays in the copy's IP header (see the README).
    #[arg(long, value_name = "N", value_parser = parse_snaplen)]
    pub snaplen: Option<u32>,
}

impl ControlArgs {
    /// Checks and compiles everything, before anything is attached.
    pub fn controls(&self) -> Result<Controls, FilterError> {
        Ok(Controls {
            filter: self.filter.as_deref().map(compile).transpose()?,
            sample_every: self.sample.unwrap_or(1),
            rate_limit: self.rate_limit,
            snaplen: self.snaplen.unwrap_or(0),
        })
    }
}
