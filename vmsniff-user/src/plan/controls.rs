//! The mirror controls of a session: which of the tap's frames are copied (`--filter`,
//! `--sample`, `--rate-limit`) and how much of each (`--snaplen`). Parsed and checked here,
//! before anything is attached or changed.
use std::fmt;

use vmsniff_ebpf::{MAX_SNAPLEN, MAX_TOKEN_UNITS, RATE_BITS, RATE_NONE, RATE_PACKETS, SessionConfig};

use super::filter::CompiledFilter;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Controls {
    pub filter: Option<CompiledFilter>,
    /// `--sample N`: 1 frame in N, drawn at random; 1 = every frame.
    pub sample_every: u32,
    pub rate_limit: Option<RateLimit>,
    /// `--snaplen N`: copies cut to N bytes; 0 = whole frames.
    pub snaplen: u32,
}

impl Controls {
    /// Writes the controls' fields of a session's configuration (the filter program itself
    /// goes to the `FILTERS` map).
    pub fn apply_to(&self, config: &mut SessionConfig) {
        config.snaplen = self.snaplen;
        config.sample_every = self.sample_every.max(1);
        set_rate_limit(config, self.rate_limit.as_ref());
    }
}

/// Writes a session's rate limit fields; `None` = no limit.
pub fn set_rate_limit(config: &mut SessionConfig, rate_limit: Option<&RateLimit>) {
    {
        match rate_limit {
            Some(limit) => {
                config.rate_unit = match limit.unit {
                    RateUnit::Bits => RATE_BITS,
                    RateUnit::Packets => RATE_PACKETS,
                };
                config.rate = limit.rate;
                config.burst = limit.burst;
            }
            None => {
                config.rate_unit = RATE_NONE;
                config.rate = 0;
                config.burst = 0;
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateUnit {
    Bits,
    Packets,
}

/// `--rate-limit RATE`: a token bucket per session, shared by its directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub unit: RateUnit,
    /// Per second, in `unit`.
    pub rate: u64,
    /// The bucket's depth, in `unit`: 100 ms of the rate, and at least one 64 KiB frame (a
    /// GSO frame from a virtio NIC) or 8 packets, so that a limit never starves one frame.
    pub burst: u64,
}

impl RateLimit {
    fn new(unit: RateUnit, rate: u64) -> RateLimit {
        let floor = match unit {
            RateUnit::Bits => 65_536 * 8,
            RateUnit::Packets => 8,
        };
        RateLimit { unit, rate, burst: (rate / 10).max(floor).min(MAX_TOKEN_UNITS) }
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (value, suffixes): (u64, &[&str]) = match self.unit {
            RateUnit::Bits => (self.rate, &["bit", "kbit", "mbit", "gbit", "tbit"]),
            RateUnit::Packets => (self.rate, &["pps", "kpps", "mpps", "gpps", "tpps"]),
        };
        let mut scaled = value;
        let mut index = 0;
        while scaled >= 1000 && scaled % 1000 == 0 && index + 1 < suffixes.len() {
            scaled /= 1000;
            index += 1;
        }
        write!(f, "{scaled}{}", suffixes[index])
    }
}

/// Highest rates accepted: 1 Tbit/s, 1 G copies/s. Beyond that a limit limits nothing.
const MAX_BITS_PER_SECOND: u64 = 1_000_000_000_000;
const MAX_PACKETS_PER_SECOND: u64 = 1_000_000_000;

/// Parses tc's rate syntax (`10mbit`, `1.5gbit`, `500kbps` = bytes, `100kibit`) and packet
/// rates (`50kpps`, `1000pps`).
pub fn parse_rate_limit(text: &str) -> Result<RateLimit, String> {
    let lower = text.trim().to_ascii_lowercase();
    let split = lower.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let bad = || {
        format!(
            "--rate-limit {text:?}: give a number and a unit as tc does, for example 10mbit, 1.5gbit, \
             500kbps (bytes) or 50kpps (copies per second)"
        )
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    let (factor, kind): (f64, RateUnit) = match unit {
        "bit" => (1.0, RateUnit::Bits),
        "kbit" => (1e3, RateUnit::Bits),
        "mbit" => (1e6, RateUnit::Bits),
        "gbit" => (1e9, RateUnit::Bits),
        "tbit" => (1e12, RateUnit::Bits),
        "kibit" => (1024.0, RateUnit::Bits),
        "mibit" => (1024.0 * 1024.0, RateUnit::Bits),
        "gibit" => (1024.0 * 1024.0 * 1024.0, RateUnit::Bits),
        "bps" => (8.0, RateUnit::Bits),
        "kbps" => (8e3, RateUnit::Bits),
        "mbps" => (8e6, RateUnit::Bits),
        "gbps" => (8e9, RateUnit::Bits),
        "kibps" => (8.0 * 1024.0, RateUnit::Bits),
        "mibps" => (8.0 * 1024.0 * 1024.0, RateUnit::Bits),
        "gibps" => (8.0 * 1024.0 * 1024.0 * 1024.0, RateUnit::Bits),
        "pps" => (1.0, RateUnit::Packets),
        "kpps" => (1e3, RateUnit::Packets),
        "mpps" => (1e6, RateUnit::Packets),
        _ => return Err(bad()),
    };
    let rate = (value * factor).round();
    let max = match kind {
        RateUnit::Bits => MAX_BITS_PER_SECOND,
        RateUnit::Packets => MAX_PACKETS_PER_SECOND,
    };
    // Also refuses NaN, which no comparison lets through.
    if rate.partial_cmp(&1.0).is_none_or(|order| order.is_lt()) {
        return Err(format!(
            "--rate-limit {text:?}: the rate must be more than zero; leave the option out for no limit"
        ));
    }
    if rate > max as f64 {
        return Err(format!(
            "--rate-limit {text:?}: above {max} per second, a limit limits nothing: leave it out"
        ));
    }
    Ok(RateLimit::new(kind, rate as u64))
}

/// `--sample N`: N >= 1.
pub fn parse_sample(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(0) => Err("--sample 0 would mirror nothing: give N >= 1 (1 in N frames; 1 = all)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("--sample {text:?}: give a whole number N >= 1 (mirror 1 frame in N)")),
    }
}

/// `--snaplen N`: 1..=65535, as tcpdump takes it (except 0, which tcpdump reads as 262144:
/// here whole frames are the default, so 0 would only be a surprise).
pub fn parse_snaplen(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(n @ 1..=MAX_SNAPLEN) => Ok(n),
        Ok(0) => Err("--snaplen 0 would cut copies to nothing: give 1..65535 bytes, or leave --snaplen \
                      out for whole frames"
            .into()),
        Ok(_) => {
            Err(format!("--snaplen {text}: the most is {MAX_SNAPLEN} bytes (leave it out for whole frames)"))
        }
        Err(_) => Err(format!("--snaplen {text:?}: give a number of bytes, 1..65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_as_tc_writes_them() {
        let bits = |t: &str| parse_rate_limit(t).map(|r| (r.unit, r.rate));
        assert_eq!(bits("10mbit"), Ok((RateUnit::Bits, 10_000_000)));
        assert_eq!(bits("1.5gbit"), Ok((RateUnit::Bits, 1_500_000_000)));
        assert_eq!(bits("500kbps"), Ok((RateUnit::Bits, 4_000_000)));
        assert_eq!(bits("100KIBIT"), Ok((RateUnit::Bits, 102_400)));
        assert_eq!(bits("50kpps"), Ok((RateUnit::Packets, 50_000)));
        assert_eq!(bits("1000pps"), Ok((RateUnit::Packets, 1000)));
        for bad in ["", "10", "mbit", "10 mbit x", "-5mbit", "0mbit", "0.1bit", "10furlongs", "2tbit"] {
            let err = parse_rate_limit(bad).unwrap_err();
            assert!(err.contains("--rate-limit"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_burst_covers_a_tenth_of_a_second_and_at_least_one_big_frame() {
        assert_eq!(parse_rate_limit("1gbit").unwrap().burst, 100_000_000);
        assert_eq!(parse_rate_limit("1mbit").unwrap().burst, 65_536 * 8);
        assert_eq!(parse_rate_limit("10pps").unwrap().burst, 8);
        assert_eq!(parse_rate_limit("50kpps").unwrap().burst, 5_000);
    }

    #[test]
    fn rates_print_back_in_tc_units() {
        assert_eq!(parse_rate_limit("10mbit").unwrap().to_string(), "10mbit");
        assert_eq!(parse_rate_limit("50kpps").unwrap().to_string(), "50kpps");
        assert_eq!(parse_rate_limit("1500bit").unwrap().to_string(), "1500bit");
    }

    #[test]
    fn sample_needs_a_positive_whole_number() {
        assert_eq!(parse_sample("10"), Ok(10));
        assert_eq!(parse_sample("1"), Ok(1));
        assert!(parse_sample("0").unwrap_err().contains("nothing"));
        assert!(parse_sample("x").is_err());
        assert!(parse_sample("-1").is_err());
    }

    #[test]
    fn snaplen_takes_what_tcpdump_takes_but_zero() {
        assert_eq!(parse_snaplen("96"), Ok(96));
        assert_eq!(parse_snaplen("65535"), Ok(65535));
        assert!(parse_snaplen("0").unwrap_err().contains("nothing"));
        assert!(parse_snaplen("65536").unwrap_err().contains("65535"));
        assert!(parse_snaplen("1k").is_err());
    }

    #[test]
    fn controls_fill_the_session_configuration() {
        let mut config = SessionConfig::EMPTY;
        let controls = Controls {
            filter: None,
            sample_every: 4,
            rate_limit: Some(parse_rate_limit("8kbit").unwrap()),
            snaplen: 96,
        };
        controls.apply_to(&mut config);
        assert_eq!((config.sample_every, config.rate_unit, config.rate), (4, RATE_BITS, 8000));
        Controls::default().apply_to(&mut config);
        assert_eq!((config.sample_every, config.rate_unit, config.rate), (1, RATE_NONE, 0));
    }
}
