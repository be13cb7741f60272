//! `--filter EXPR`: a tcpdump expression, compiled by libpcap (the compiler tcpdump itself
//! uses, so every construct means what it means there) into classic BPF, checked, and laid out
//! as the `FILTERS` map value the tap programs interpret.
use vmsniff_ebpf::filter::{
    FILTER_EXPRESSION_BYTES, Filter, FilterInsn, InvalidFilter, MAX_FILTER_INSNS, validate,
};

/// A compiled filter, ready for a session's filter slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledFilter {
    pub expression: String,
    pub insns: Vec<FilterInsn>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("--filter {expression:?}: {message} (the syntax is tcpdump's: see `man pcap-filter`)")]
    Syntax { expression: String, message: String },
    #[error(
        "--filter {expression:?} compiles to {len} classic BPF instructions; the mirror runs at \
         most {MAX_FILTER_INSNS} per frame in the kernel: split it across sessions or simplify it \
         (`tcpdump -d 'EXPR'` shows the program)"
    )]
    TooLong { expression: String, len: usize },
    #[error(
        "--filter is {len} bytes long; vmsniff keeps expressions of up to {} bytes: shorten it \
         (for example with `net` instead of many `host` terms)",
        FILTER_EXPRESSION_BYTES - 1
    )]
    ExpressionTooLong { len: usize },
    #[error("--filter {expression:?} cannot run on a tap: {reason}")]
    Unsupported { expression: String, reason: String },
    #[error("--filter is empty: leave it out to mirror every frame")]
    Empty,
}

/// Compiles `expression` as tcpdump would for an Ethernet capture (optimised, like tcpdump).
pub fn compile(expression: &str) -> Result<CompiledFilter, FilterError> {
    let trimmed = expression.trim();
    if trimmed.is_empty() {
        return Err(FilterError::Empty);
    }
    if expression.len() >= FILTER_EXPRESSION_BYTES {
        return Err(FilterError::ExpressionTooLong { len: expression.len() });
    }
    let syntax = |message: String| FilterError::Syntax { expression: expression.into(), message };
    let capture = pcap::Capture::dead(pcap::Linktype::ETHERNET).map_err(|e| syntax(e.to_string()))?;
    let program = capture.compile(expression, true).map_err(|e| syntax(libpcap_message(e)))?;
    let insns = program
        .get_instructions()
        .iter()
        .map(|insn| parse_insn(&insn.to_string()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| FilterError::Unsupported {
            expression: expression.into(),
            reason: "libpcap printed an instruction vmsniff cannot read".into(),
        })?;
    if insns.len() > MAX_FILTER_INSNS {
        return Err(FilterError::TooLong { expression: expression.into(), len: insns.len() });
    }
    validate(&insns)
        .map_err(|e| FilterError::Unsupported { expression: expression.into(), reason: reason(e) })?;
    Ok(CompiledFilter { expression: expression.into(), insns })
}

impl CompiledFilter {
    /// The `FILTERS` map value.
    pub fn to_map_value(&self) -> Filter {
        let mut value = Filter::EMPTY;
        value.len = self.insns.len() as u32;
        value.insns[..self.insns.len()].copy_from_slice(&self.insns);
        value.expression[..self.expression.len()].copy_from_slice(self.expression.as_bytes());
        value
    }
}

/// The expression stored in a `FILTERS` map value.
pub fn stored_expression(value: &Filter) -> String {
    let end = value.expression.iter().position(|&b| b == 0).unwrap_or(value.expression.len());
    String::from_utf8_lossy(&value.expression[..end]).into_owned()
}

/// The pcap crate shows an instruction only as "code jt jf k" (its fields are private).
fn parse_insn(text: &str) -> Option<FilterInsn> {
    let mut fields = text.split_whitespace();
    let insn = FilterInsn {
        code: fields.next()?.parse().ok()?,
        jt: fields.next()?.parse().ok()?,
        jf: fields.next()?.parse().ok()?,
        k: fields.next()?.parse().ok()?,
    };
    fields.next().is_none().then_some(insn)
}

fn libpcap_message(error: pcap::Error) -> String {
    match error {
        pcap::Error::PcapError(message) => message,
        other => other.to_string(),
    }
}

fn reason(error: InvalidFilter) -> String {
    match error {
        InvalidFilter::AncillaryLoad { .. } => {
            "it reads Linux socket metadata (an SKF_AD load), which a tc program does not have".into()
        }
        other => format!("libpcap produced a program vmsniff cannot run ({other:?})"),
    }
}

#[cfg(test)]
mod tests {
    use vmsniff_ebpf::filter::{Bytes, Machine, matches};

    use super::*;

    /// Test frames: a builder for the headers each case needs.
    mod frames {
        pub const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
        pub const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

        pub fn ethernet(ethertype: u16, vlan: Option<u16>, payload: &[u8]) -> Vec<u8> {
            let mut f = Vec::new();
            f.extend_from_slice(&B);
            f.extend_from_slice(&A);
            if let Some(id) = vlan {
                f.extend_from_slice(&0x8100u16.to_be_bytes());
                f.extend_from_slice(&id.to_be_bytes());
            }
            f.extend_from_slice(&ethertype.to_be_bytes());
            f.extend_from_slice(payload);
            while f.len() < 60 {
                f.push(0);
            }
            f
        }

        pub fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, fragment: u16, l4: &[u8]) -> Vec<u8> {
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 1]);
            ip.extend_from_slice(&fragment.to_be_bytes());
            ip.extend_from_slice(&[64, protocol, 0, 0]);
            ip.extend_from_slice(&src);
            ip.extend_from_slice(&dst);
            ip.extend_from_slice(l4);
            ip
        }

        pub fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, l4: &[u8]) -> Vec<u8> {
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            ip.extend_from_slice(&[next, 64]);
            ip.extend_from_slice(&src);
            ip.extend_from_slice(&dst);
            ip.extend_from_slice(l4);
            ip
        }

        pub fn ports(src: u16, dst: u16, rest: usize) -> Vec<u8> {
            let mut l4 = src.to_be_bytes().to_vec();
            l4.extend_from_slice(&dst.to_be_bytes());
            l4.resize(4 + rest, 0);
            l4
        }

        pub fn arp(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
            let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
            a.extend_from_slice(&A);
            a.extend_from_slice(&sender);
            a.extend_from_slice(&[0; 6]);
            a.extend_from_slice(&target);
            a
        }

        pub fn broadcast(mut frame: Vec<u8>) -> Vec<u8> {
            frame[..6].copy_from_slice(&[0xff; 6]);
            frame
        }

        pub fn v6(last: u8) -> [u8; 16] {
            let mut a = [0u8; 16];
            a[0] = 0xfd;
            a[15] = last;
            a
        }
    }

    fn table() -> Vec<(&'static str, Vec<u8>)> {
        use frames::*;
        let tcp = |s, d, sp, dp: u16| {
            let mut l4 = ports(sp, dp, 96);
            // Data offset 5 words; SYN toward port 443, ACK otherwise.
            l4[12] = 0x50;
            l4[13] = if dp == 443 { 0x02 } else { 0x10 };
            ethernet(0x0800, None, &ipv4(s, d, 6, 0, &l4))
        };
        let udp = |s, d, sp, dp| ethernet(0x0800, None, &ipv4(s, d, 17, 0, &ports(sp, dp, 4)));
        vec![
            ("tcp 10.0.0.1:40000 > 10.0.0.2:443", tcp([10, 0, 0, 1], [10, 0, 0, 2], 40000, 443)),
            ("tcp 192.168.1.1:443 > 172.19.1.3:5000", tcp([192, 168, 1, 1], [172, 19, 1, 3], 443, 5000)),
            ("udp 10.0.0.1:53 > 10.0.0.9:5050", udp([10, 0, 0, 1], [10, 0, 0, 9], 53, 5050)),
            ("udp 172.19.1.3:68 > 255.255.255.255:67", udp([172, 19, 1, 3], [255; 4], 68, 67)),
            (
                "icmp echo",
                ethernet(0x0800, None, &ipv4([10, 0, 0, 1], [8, 8, 8, 8], 1, 0, &[8, 0, 0, 0, 0, 0, 0, 0])),
            ),
            (
                "tcp fragment, not first",
                ethernet(0x0800, None, &ipv4([10, 0, 0, 1], [10, 0, 0, 2], 6, 0x0010, &[0x01, 0xbb, 0, 0])),
            ),
            (
                "arp who-has 172.19.1.3, broadcast",
                broadcast(ethernet(0x0806, None, &arp([172, 19, 1, 1], [172, 19, 1, 3]))),
            ),
            (
                "ipv6 tcp fd00::1 > fd00::2:443",
                ethernet(0x86dd, None, &ipv6(v6(1), v6(2), 6, &ports(1234, 443, 16))),
            ),
            (
                "ipv6 udp fd00::3 > fd00::1:5060",
                ethernet(0x86dd, None, &ipv6(v6(3), v6(1), 17, &ports(5060, 5060, 4))),
            ),
            ("ipv6 icmp6", ethernet(0x86dd, None, &ipv6(v6(1), v6(2), 58, &[128, 0, 0, 0, 0, 0, 0, 0]))),
            (
                "vlan 100 udp 172.19.1.3",
                ethernet(
                    0x0800,
                    Some(100),
                    &ipv4([172, 19, 1, 3], [10, 0, 0, 1], 17, 0, &ports(5000, 5100, 4)),
                ),
            ),
            (
                "vlan 200 tcp 10.0.0.1:443",
                ethernet(0x0800, Some(200), &ipv4([10, 0, 0, 1], [10, 0, 0, 2], 6, 0, &ports(443, 1000, 16))),
            ),
            ("vlan 100 ipv6 udp", ethernet(0x86dd, Some(100), &ipv6(v6(1), v6(2), 17, &ports(5001, 53, 4)))),
            ("lldp", ethernet(0x88cc, None, &[0; 30])),
            ("runt ipv4 header", ethernet(0x0800, None, &[0x45, 0, 0, 20, 0, 0])[..20].to_vec()),
        ]
    }

    const EXPRESSIONS: &[&str] = &[
        "tcp",
        "not arp",
        "arp",
        "ip6",
        "tcp port 443 and net 10.0.0.0/8",
        "icmp or udp portrange 5000-5100",
        "vlan 100 and host 172.19.1.3",
        "vlan",
        "src host 10.0.0.1",
        "dst net 172.19.0.0/16",
        "host 172.19.1.3",
        "(tcp or udp) and not port 53",
        "udp and (port 67 or port 68)",
        "ether broadcast",
        "ether host 52:54:00:00:00:01",
        "ip6 and dst port 443",
        "host fd00::1",
        "ip[6:2] & 0x1fff != 0",
        "greater 100",
        "len <= 64",
        "tcp[tcpflags] & tcp-syn != 0",
        "icmp6",
        "port 443 or port 5060 or port 53 or port 67 or port 68 or portrange 5000-5100 or host \
         10.0.0.9 or net 172.19.0.0/16 or ip6 or arp",
    ];

    #[test]
    fn verdicts_equal_libpcaps_for_every_expression_and_frame() {
        let capture = pcap::Capture::dead(pcap::Linktype::ETHERNET).unwrap();
        let mut machine = Machine::default();
        let mut checked = 0;
        for expression in EXPRESSIONS {
            let compiled = compile(expression).unwrap_or_else(|e| panic!("{expression}: {e}"));
            let value = compiled.to_map_value();
            let libpcap = capture.compile(expression, true).unwrap();
            let mut matched = 0;
            for (what, frame) in table() {
                let ours = matches(&value, &Bytes(&frame), &mut machine);
                assert_eq!(ours, libpcap.filter(&frame), "{expression:?} on {what}");
                matched += usize::from(ours);
                checked += 1;
            }
            assert!(matched > 0, "{expression:?} matched no frame of the table: the case proves nothing");
            assert_eq!(stored_expression(&value), *expression);
        }
        assert_eq!(checked, EXPRESSIONS.len() * table().len());
    }

    #[test]
    fn bad_expressions_name_the_problem() {
        let err = compile("tcp port").unwrap_err();
        assert!(matches!(err, FilterError::Syntax { .. }), "{err:?}");
        assert!(err.to_string().contains("pcap-filter"), "{err}");
        assert_eq!(compile("  "), Err(FilterError::Empty));
        let long = vec!["host 10.0.0.1"; 30].join(" or ");
        assert!(matches!(compile(&long), Err(FilterError::ExpressionTooLong { .. })));
        let chains = "ip6 protochain 6 or ip6 protochain 17 or ip6 protochain 58 or ip6 protochain 132";
        match compile(chains) {
            Err(FilterError::TooLong { len, .. }) => assert!(len > MAX_FILTER_INSNS),
            other => panic!("{chains:?} compiles to more than {MAX_FILTER_INSNS} instructions: {other:?}"),
        }
    }

    #[test]
    fn the_stored_value_holds_the_program_and_the_expression() {
        let compiled = compile("udp").unwrap();
        let value = compiled.to_map_value();
        assert_eq!(value.len as usize, compiled.insns.len());
        assert_eq!(&value.insns[..compiled.insns.len()], compiled.insns.as_slice());
        assert_eq!(stored_expression(&value), "udp");
    }
}
